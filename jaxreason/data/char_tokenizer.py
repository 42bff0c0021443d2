"""A character-level HuggingFace tokenizer for tiny from-scratch models (the quickstart).

Every printable ASCII character and newline is one token; the ChatML specials (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`) are added tokens, so the s1 format works unchanged, and so are the
format's own words (`think`, `answer`, `Answer:`, `user`, `assistant`, ...), which keeps examples short. The chat
template is ChatML without a default system prompt (short prompts for tiny models). With a
~100-token vocabulary the output layer stays small; a 151k vocabulary would spend most of a
tiny model's compute there (ENV.md).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("system", "user", "assistant", "think", "answer", "Answer:", "Final", "Wait")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
  chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  for c in chars:
    vocab[c] = len(vocab)
  vocab["<unk>"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
  fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
  # The format's words as single tokens: shorter sequences for the same content.
  fast.add_tokens([AddedToken(w, normalized=False, special=False) for w in WORDS])
  fast.chat_template = CHATML_TEMPLATE
  return fast
