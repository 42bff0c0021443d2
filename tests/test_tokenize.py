"""Tokenizers, formats and loss masks (jaxreason.data.{tokenizer,formats,tokenize}).

Expected ids are written by hand from Qwen2.5's vocabulary (printable ASCII byte c has id
ord(c) - 33, e.g. "!"=0, ","=11, "<"=27, ">"=29; "\n"=198, " "=220; "Hello"=9707, " world"=1879;
"system"=8948, "user"=872, "assistant"=77091), and expected strings from SPEC §1.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from jaxreason.data import formats as F
from jaxreason.data.tokenize import tokenize_chat, tokenize_chats, tokenize_prompt_and_output
from jaxreason.data.tokenizer import load_tokenizer

# Qwen2.5-Instruct tokenizer_config.json "added_tokens_decoder", ids 151643..151664 in order.
QWEN25_ADDED = [
  "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
  "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
IM_START, IM_END, EOT_PAD = 151644, 151645, 151643
NL = 198
HELLO_WORLD = [9707, 11, 1879, 0]  # "Hello, world!"
USER = [IM_START, 872, NL]  # "<|im_start|>user\n"
ASSISTANT = [IM_START, 77091, NL]  # "<|im_start|>assistant\n"
# "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
DEFAULT_SYSTEM = [IM_START, 8948, NL, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525,
                  264, 10950, 17847, 13, IM_END, NL]  # fmt: skip
QWEN_SYSTEM_TEXT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
S1_PROMPT_HELLO = (
  "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
  "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"
)
S1_PROMPT_HELLO_IDS = DEFAULT_SYSTEM + USER + HELLO_WORLD + [IM_END, NL] + ASSISTANT


# ----------------------------------------------------------------------------------------------
# Qwen2.5 tokenizer built offline


def test_qwen_known_encodings(qwen_tokenizer):
  tok = qwen_tokenizer
  assert tok.encode("Hello, world!") == HELLO_WORLD
  assert [tok.encode(c) for c in "!,<>: \n"] == [[0], [11], [27], [29], [25], [220], [NL]]
  assert tok.encode("12") == [16, 17]  # digits are split one by one
  assert tok.encode("<|im_start|>user\n") == USER
  assert [tok.convert_tokens_to_ids(t) for t in QWEN25_ADDED] == list(range(151643, 151665))
  assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
  assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
  assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
  assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
  assert len(tok) == 151665
  assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
  assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
  assert tok.bos_token is None
  # <tool_call> is an added token but not special: it survives skip_special_tokens, <|im_end|> does not.
  ids = tok.encode("<tool_call>x<|im_end|>")
  assert ids[0] == 151657 and ids[-1] == IM_END
  assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x"


def test_qwen_chat_template_system_user(qwen_tokenizer):
  messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
  text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == (
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  no_gen = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
  assert no_gen == text[: -len("<|im_start|>assistant\n")]


def test_qwen_chat_template_default_system(qwen_tokenizer):
  messages = [{"role": "user", "content": "Hello, world!"}]
  text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == S1_PROMPT_HELLO
  assert qwen_tokenizer.encode(text) == S1_PROMPT_HELLO_IDS
  # The pure-Python rendering matches the jinja template, multi-turn included.
  conv = [*messages, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
  for gen in (False, True):
    jinja = qwen_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert F.qwen_chatml(conv, gen) == jinja
  assert F.end_of_turn(qwen_tokenizer) == "<|im_end|>"


# ----------------------------------------------------------------------------------------------
# Formats: strings


def test_s1_strings(qwen_tokenizer):
  s1 = F.get_format("s1")
  assert s1.prompt("Hello, world!", qwen_tokenizer) == S1_PROMPT_HELLO
  assert s1.prompt("Hello, world!") == S1_PROMPT_HELLO  # no tokenizer: Qwen2.5's template in Python
  assert s1.response("4", thinking="2+2=4") == "<|im_start|>think\n2+2=4\n<|im_start|>answer\nAnswer: 4<|im_end|>"
  assert s1.response("Answer: 4", thinking=["a", "b"], tokenizer=qwen_tokenizer) == (
    "<|im_start|>think\na\nb\n<|im_start|>answer\nAnswer: 4<|im_end|>"
  )
  assert F.s1_answer("So. Answer: 7") == "So. Answer: 7"
  assert (F.S1_THINK_START, F.S1_THINK_END) == ("<|im_start|>think\n", "<|im_start|>answer")


def test_other_format_strings(qwen_tokenizer):
  think, r1, boxed, chat, raw = (F.get_format(n) for n in ("think", "r1_zero", "boxed", "chat", "raw"))
  assert think.prompt("Q?", qwen_tokenizer) == chat.prompt("Q?", qwen_tokenizer)
  assert think.response("4", thinking="2+2=4") == "<think>\n2+2=4\n</think>\n<answer>\n4\n</answer><|im_end|>"
  assert r1.prompt("What is 2+2?") == (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: What is 2+2?\nAssistant: <think>"
  )
  assert r1.response("4", thinking="2+2=4") == " 2+2=4 </think> <answer> 4 </answer>"
  assert boxed.prompt("What is 2+2?", qwen_tokenizer) == (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
  )
  assert boxed.response("2+2=4, so \\boxed{4}.") == "2+2=4, so \\boxed{4}.<|im_end|>"
  assert chat.prompt("Hi", qwen_tokenizer) == (
    f"<|im_start|>system\n{QWEN_SYSTEM_TEXT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  )
  assert (raw.prompt("2+2="), raw.response("4")) == ("2+2=", "4")
  with pytest.raises(ValueError, match="no thinking part"):
    chat.response("4", thinking="x")
  with pytest.raises(KeyError, match="Did you mean 'think'"):
    F.get_format("thinkk")


# ----------------------------------------------------------------------------------------------
# tokenize_prompt_and_output (CS336 a5 layout)


def test_tokenize_prompt_and_output_layout(qwen_tokenizer):
  out = tokenize_prompt_and_output(
    ["Hello,", "Hello", "Hello, world!"], [" world!", ", world!", "\n"], qwen_tokenizer
  )
  P = EOT_PAD
  # full sequences: [9707, 11 | 1879, 0, P], [9707 | 11, 1879, 0, P], [9707, 11, 1879, 0 | 198]
  np.testing.assert_array_equal(out["input_ids"], [[9707, 11, 1879, 0]] * 3)
  np.testing.assert_array_equal(out["labels"], [[11, 1879, 0, P], [11, 1879, 0, P], [11, 1879, 0, NL]])
  np.testing.assert_array_equal(out["response_mask"], [[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]])
  for v in out.values():
    assert v.dtype == np.int32 and v.shape == (3, 4)


def test_tokenize_prompt_and_output_goodbye(qwen_tokenizer):
  prompts, outputs = ["Hello,", "Hello, world!"], [" world!", " Goodbye!"]
  out = tokenize_prompt_and_output(prompts, outputs, qwen_tokenizer)
  bye = qwen_tokenizer.encode(" Goodbye!")
  width = 4 + len(bye)  # the longest prompt+output
  assert out["input_ids"].shape == out["labels"].shape == out["response_mask"].shape == (2, width - 1)
  full = [[9707, 11, 1879, 0] + [EOT_PAD] * (width - 4), HELLO_WORLD + bye]
  np.testing.assert_array_equal(out["input_ids"], np.asarray(full)[:, :-1])
  np.testing.assert_array_equal(out["labels"], np.asarray(full)[:, 1:])
  np.testing.assert_array_equal(out["response_mask"][0], [0, 1, 1] + [0] * (width - 4))
  np.testing.assert_array_equal(out["response_mask"][1], [0, 0, 0] + [1] * len(bye))


# ----------------------------------------------------------------------------------------------
# Format + tokenisation: which tokens are trained


def _masked(out, row=0):
  return out["labels"][row][out["response_mask"][row] == 1].tolist()


def test_s1_tokens_and_mask(qwen_tokenizer):
  tok, s1 = qwen_tokenizer, F.get_format("s1")
  prompt = s1.prompt("Hello, world!", tok)
  response = s1.response("2", thinking="Hello, world", tokenizer=tok)
  short = s1.response("2", thinking="", tokenizer=tok)
  out = tokenize_prompt_and_output([prompt, prompt], [response, short], tok)
  n_prompt = len(S1_PROMPT_HELLO_IDS)
  np.testing.assert_array_equal(out["input_ids"][0, :n_prompt], S1_PROMPT_HELLO_IDS)
  assert out["response_mask"][0, : n_prompt - 1].sum() == 0  # labels of prompt tokens
  assert out["response_mask"][0, n_prompt - 1] == 1  # first response token is a label
  masked = _masked(out)
  think, answer = tok.encode("think"), tok.encode("answer")
  k = 2 + len(think)
  assert masked[:k] == [IM_START, *think, NL]  # "<|im_start|>think\n"
  assert masked[k : k + 3] == [9707, 11, 1879]  # "Hello, world"
  # "\n<|im_start|>answer\nAnswer: 2<|im_end|>"
  assert masked[k + 3 : k + 6 + len(answer)] == [NL, IM_START, *answer, NL]
  assert masked[-4:] == [25, 220, 17, IM_END]  # ":", " ", "2", <|im_end|>
  assert tok.decode(masked) == response
  # The shorter row is right-padded with <|endoftext|> and its padding is not trained.
  n_short = n_prompt + len(tok.encode(short))
  assert (out["labels"][1, n_short - 1 :] == EOT_PAD).all()
  assert out["response_mask"][1, n_short - 1 :].sum() == 0
  assert _masked(out, 1)[-1] == IM_END


def test_think_tokens_and_mask(qwen_tokenizer):
  tok, think = qwen_tokenizer, F.get_format("think")
  response = think.response("4", thinking="2+2=4", tokenizer=tok)
  out = tokenize_prompt_and_output([think.prompt("2+2?", tok)], [response], tok)
  masked = _masked(out)
  # Qwen2.5 has no <think> token: the tags are several tokens each ("<think" is one pre-token).
  opening = tok.encode("<think>\n")
  assert masked[: len(opening)] == opening and len(opening) > 1
  assert 19 in masked  # "4"
  assert masked[-2:] == [29, IM_END]  # ">" of "</answer>", then <|im_end|>
  assert tok.decode(masked) == response
  assert out["response_mask"][0].sum() == len(tok.encode(response))


def test_r1_zero_tokens_and_mask(qwen_tokenizer):
  tok, r1 = qwen_tokenizer, F.get_format("r1_zero")
  response = r1.response("4", thinking="2+2=4")
  out = tokenize_prompt_and_output([r1.prompt("2+2?")], [response], tok)
  masked = _masked(out)
  assert masked[-1] == 29 and IM_END not in masked  # ends with ">" of "</answer>", no end token
  assert tok.decode(masked) == response


# ----------------------------------------------------------------------------------------------
# Multi-turn chat: every assistant turn trained


CONV = [
  {"role": "user", "content": "Hello"},
  {"role": "assistant", "content": "Hello, world!"},
  {"role": "user", "content": "1+1?"},
  {"role": "assistant", "content": "2"},
]


def test_render_chat_spans(qwen_tokenizer):
  r = F.render_chat(CONV, qwen_tokenizer)
  assert [r.text[a:b] for a, b in r.assistant_spans] == ["Hello, world!<|im_end|>", "2<|im_end|>"]
  assert F.render_chat(CONV).text == r.text  # Python ChatML == jinja template
  assert "".join(s for s, _ in r.segments()) == r.text


def test_tokenize_chat_masks_every_assistant_turn(qwen_tokenizer):
  out = tokenize_chat(CONV, qwen_tokenizer)
  expected = (
    DEFAULT_SYSTEM + USER + [9707, IM_END, NL]
    + ASSISTANT + HELLO_WORLD + [IM_END, NL]
    + USER + [16, 10, 16, 30, IM_END, NL]  # "1+1?"
    + ASSISTANT + [17, IM_END, NL]  # "2"
  )  # fmt: skip
  np.testing.assert_array_equal(out["input_ids"], expected)
  assert out["input_ids"].dtype == out["loss_mask"].dtype == np.int32
  trained = out["input_ids"][out["loss_mask"] == 1].tolist()
  assert trained == [*HELLO_WORLD, IM_END, 17, IM_END]
  assert out["loss_mask"][-1] == 0  # the newline after the last <|im_end|>
  batch = tokenize_chats([CONV, CONV[:2]], qwen_tokenizer)
  assert batch["labels"].shape == (2, len(expected) - 1)
  assert batch["labels"][0][batch["response_mask"][0] == 1].tolist() == trained
  assert batch["labels"][1][batch["response_mask"][1] == 1].tolist() == [*HELLO_WORLD, IM_END]


# ----------------------------------------------------------------------------------------------
# load_tokenizer: sentencepiece (Llama-2 style) directories and errors


def _corpus(n: int = 400) -> list[str]:
  """Pseudo-words from syllables (enough distinct substrings for a 200-piece unigram model)."""
  rng = random.Random(0)
  syllables = "the qu ick bro wn fox ju mps ov er la zy do g thi nk an sw st ep on tw ree na ïve ca fé".split()
  ends = [".", "!", "?", ", 12", " 345", "  x\ty"]
  words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n * 8)]
  return [" ".join(words[8 * i : 8 * i + rng.randint(3, 8)]) + rng.choice(ends) for i in range(n)]


def _train_spm(directory, **options) -> None:
  import sentencepiece

  directory.mkdir()
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(_corpus()))
  sentencepiece.SentencePieceTrainer.train(
    input=str(corpus), model_prefix=str(directory / "tokenizer"), character_coverage=1.0,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **options,
  )  # fmt: skip
  corpus.unlink()
  (directory / "tokenizer.vocab").unlink()


SPM_VARIANTS = {
  # Llama-2's options: BPE, byte fallback, identity normalisation, whitespace kept, digits split.
  "llama2_bpe": dict(model_type="bpe", vocab_size=320, byte_fallback=True, normalization_rule_name="identity",
                     remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True),
  # sentencepiece defaults: unigram, NFKC normalisation, whitespace collapsed, no byte fallback.
  "unigram_nfkc": dict(model_type="unigram", vocab_size=200),
}  # fmt: skip

STRINGS = ["the quick brown fox", "Hello  world é 12", " leading space", "alpha\nbeta", "  two  spaces ",
           "ﬁve ½ naïve", "x", ""]  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SPM_VARIANTS))
def spm_dir(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp("spm") / request.param
  _train_spm(directory, **SPM_VARIANTS[request.param])
  if request.param == "llama2_bpe":  # a minimal Llama-2 tokenizer_config.json
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  return directory


def test_sentencepiece_dir_matches_sentencepiece(spm_dir):
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
  tok = load_tokenizer(spm_dir)
  assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
  for s in STRINGS:
    assert tok.encode(s) == [sp.bos_id(), *sp.encode(s)], s  # Llama prepends BOS
    assert tok.encode(s, add_special_tokens=False) == sp.encode(s), s
    if sp.unk_id() not in sp.encode(s):  # sentencepiece decodes <unk> as " ⁇ ", HF skips it
      assert tok.decode(tok.encode(s), skip_special_tokens=True) == sp.decode(sp.encode(s)), s


def test_sentencepiece_dir_config_and_roundtrip(spm_dir, tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(spm_dir, directory)
  (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "pad_token": "</s>"}))
  tok = load_tokenizer(directory)
  assert tok.encode("the fox")[0] != 1 and tok.pad_token == "</s>"
  tok.save_pretrained(tmp_path / "saved")  # tokenizer.json now, loaded through AutoTokenizer
  again = load_tokenizer(tmp_path / "saved")
  assert all(again.encode(s) == tok.encode(s) for s in STRINGS)


def test_load_tokenizer_errors(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError) as e:
    load_tokenizer(tmp_path)
  msg = str(e.value)
  assert str(tmp_path) in msg and "config.json" in msg and "tokenizer.json" in msg and "Copy the tokenizer" in msg
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "missing")
