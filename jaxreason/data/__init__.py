"""Data: tokenizers (`tokenizer`), prompt/response formats (`formats`), tokenisation with loss masks
(`tokenize`). Import the submodules directly; this package imports nothing so that light users
(formats, packing) do not pay for importing transformers."""
