"""Train a tokenizer on a corpus with HuggingFace `tokenizers` and save it as a HF tokenizer dir.

Kinds:
  byte_bpe     byte-level BPE as GPT-2 / Llama 3 / Qwen2: Qwen2's pre-tokenizer regex, then bytes
               mapped to printable characters; every string round-trips exactly (256 byte symbols
               are always in the vocabulary).
  spm_bpe      sentencepiece-style BPE (Metaspace "▁" word boundaries, byte fallback for unseen
               characters), trained by `tokenizers`' BpeTrainer.
  spm_unigram  sentencepiece-style unigram LM (Metaspace, trained by `tokenizers`' UnigramTrainer).
               The sentencepiece kinds replace every space run's first space by "▁" and restore it
               on decoding; leading spaces of a text are not kept by the Metaspace decoder.

Special tokens are those of ChatML (the template every jaxreason format renders: s1, think, boxed,
chat use `<|im_start|>` / `<|im_end|>`): `<|endoftext|>` (pad, id 0), `<|im_start|>`, `<|im_end|>`
(eos), ids 0-2, never split or merged. The chat template is Qwen2.5-Instruct's, so prompts render
as in s1. No BOS is added (as Qwen).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jaxreason.data.tokenizer import QWEN2_PATTERN, QWEN25_CHAT_TEMPLATE

KINDS = ("byte_bpe", "spm_bpe", "spm_unigram")
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _build(kind: str, vocab_size: int, specials: Sequence[str], min_frequency: int):
  if kind == "byte_bpe":
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  elif kind == "spm_bpe":
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[*specials, "<unk>", *byte_tokens], show_progress=False)
  elif kind == "spm_unigram":
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[*specials, "<unk>"], unk_token="<unk>",
                                      show_progress=False)
  else:
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
  return tok, trainer


def _specials_first(tok: Tokenizer, specials: Sequence[str]) -> Tokenizer:
  """Unigram: move the special tokens to ids 0.. (UnigramTrainer may place one it also saw in the
  corpus elsewhere)."""
  js = json.loads(tok.to_str())
  pieces = [p for p in js["model"]["vocab"] if p[0] not in specials]
  vocab = [[s, 0.0] for s in specials] + pieces
  js["model"]["vocab"] = vocab
  js["model"]["unk_id"] = list(specials).index("<unk>")
  ids = {p[0]: i for i, p in enumerate(vocab)}
  for t in js["added_tokens"]:
    t["id"] = ids[t["content"]]
  return Tokenizer.from_str(json.dumps(js))


def train_tokenizer(documents: Iterable[str], vocab_size: int, out: str | os.PathLike, *, kind: str = "byte_bpe",
                    min_frequency: int = 2, extra_special_tokens: Sequence[str] = (),
                    model_max_length: int = 131072):
  """Trains on `documents` and saves a HF tokenizer dir at `out` (tokenizer.json, tokenizer_config.json
  with the chat template). Returns the `PreTrainedTokenizerFast`."""
  from transformers import PreTrainedTokenizerFast
  specials = [*CHATML_SPECIAL_TOKENS, *extra_special_tokens]
  if vocab_size < len(specials) + 256 + 1:
    raise ValueError(f"vocab_size {vocab_size} is too small: the {len(specials)} special tokens and 256 byte "
                     f"symbols need at least {len(specials) + 257}")
  tok, trainer = _build(kind, vocab_size, specials, min_frequency)
  n_docs = 0

  def counted():
    nonlocal n_docs
    for d in documents:
      n_docs += 1
      yield d

  tok.train_from_iterator(counted(), trainer=trainer)
  if n_docs == 0:
    raise ValueError("the corpus has no documents")
  if kind == "spm_unigram":
    tok = _specials_first(tok, [*specials, "<unk>"])
  for i, s in enumerate(CHATML_SPECIAL_TOKENS):
    if tok.token_to_id(s) != i:
      raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>" if kind != "byte_bpe" else None,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
  fast.extra_special_tokens = ["<|im_start|>", *extra_special_tokens]
  fast.chat_template = QWEN25_CHAT_TEMPLATE
  fast.padding_side = "right"
  os.makedirs(out, exist_ok=True)
  fast.save_pretrained(out)
  with open(os.path.join(out, "training_args.json"), "w") as f:
    json.dump({"kind": kind, "vocab_size": vocab_size, "min_frequency": min_frequency, "documents": n_docs,
               "special_tokens": specials, "actual_vocab_size": len(fast)}, f, indent=2)
  return fast
