"""Tokenizer training (SPEC §12): `python -m jaxreason.tokenizer train --corpus FILES --vocab-size N --out DIR`."""

from jaxreason.tokenizer.corpus import iter_documents
from jaxreason.tokenizer.train import CHATML_SPECIAL_TOKENS, KINDS, train_tokenizer

__all__ = ["CHATML_SPECIAL_TOKENS", "KINDS", "iter_documents", "train_tokenizer"]
