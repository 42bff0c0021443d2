"""Tokenizer training: exact round trip, AutoTokenizer and jaxreason's loader, chat formats."""

import glob
import os

import pytest

from jaxreason.tokenizer import train_tokenizer

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBES = [
  "Hello, world! The quick brown fox   jumps over 13 lazy dogs.\n\n\tIndented\r\nline",
  "def f(x):\n    return x ** 2  # square\n",
  "  leading spaces, trailing spaces   ",
  "Unicode: café, naïve, 東京, emoji 🙂, math ∑ x² ≤ π",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
  "",
]


def _corpus():
  files = sorted(glob.glob(os.path.join(_HERE, "jaxreason", "**", "*.py"), recursive=True))[:40]
  return [open(f).read() for f in files] + [open(os.path.join(_HERE, "README.md")).read()]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  return train_tokenizer(_corpus(), 1000, out, kind="byte_bpe"), str(out)


def test_byte_bpe_round_trips_exactly_and_keeps_specials(byte_bpe):
  tok, _ = byte_bpe
  assert len(tok) == 1000
  for text in PROBES:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
  assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
  ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  # trained merges: common words of the corpus are single tokens, and text compresses
  assert len(tok.encode(" return", add_special_tokens=False)) == 1
  text = max(_corpus(), key=len)
  assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_loads_with_autotokenizer_and_jaxreason_loader(byte_bpe):
  from transformers import AutoTokenizer
  from jaxreason.data.tokenizer import load_tokenizer
  tok, path = byte_bpe
  for loaded in (AutoTokenizer.from_pretrained(path, local_files_only=True), load_tokenizer(path)):
    for text in PROBES:
      assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
      assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0


def test_every_jaxreason_format_accepts_the_chat_template(byte_bpe):
  from jaxreason.data import formats
  from jaxreason.data.examples import ROW_FORMATS, encode_example
  tok, _ = byte_bpe
  assert formats.end_of_turn(tok) == "<|im_end|>"
  for name in formats.FORMATS:
    f = formats.get_format(name)
    prompt = f.prompt("What is 2+2?", tok)
    assert "What is 2+2?" in prompt
    if f.chat:
      assert prompt == formats.qwen_chatml(f.messages("What is 2+2?"), add_generation_prompt=True)
  row = {"question": "What is 2+2?", "thinking": "2+2=4", "answer": "4", "attempt": "4", "text": "plain text",
         "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "prompt": "p", "response": "r", "conversations": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}
  for fmt in ROW_FORMATS:
    ids, w = encode_example(row, fmt, tok)
    assert len(ids) == len(w) and w.sum() > 0, fmt


@pytest.mark.parametrize("kind", ["spm_bpe", "spm_unigram"])
def test_sentencepiece_kinds(kind, tmp_path):
  from transformers import AutoTokenizer
  tok = train_tokenizer(_corpus(), 600, tmp_path, kind=kind)
  loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  for text in ["Hello world, the function returns x.", "def f(x):\n    return x ** 2\n", "東京 🙂"]:
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    if kind == "spm_bpe" or text.isascii():
      assert loaded.decode(ids) == text
  assert loaded.convert_tokens_to_ids("<|im_end|>") == 2


def test_cli_and_errors(tmp_path):
  from jaxreason.tokenizer.__main__ import main
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(_corpus()[:5]))
  assert main(["train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "t")]) == 0
  assert (tmp_path / "t" / "tokenizer.json").exists()
  assert main(["train", "--corpus", str(tmp_path / "missing.txt"), "--vocab-size", "400", "--out", str(tmp_path / "u")]) == 2
  with pytest.raises(ValueError, match="too small"):
    train_tokenizer(["x"], 100, tmp_path / "v")
