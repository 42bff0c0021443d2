"""Evaluation (SPEC §8): metrics (`metrics`: pass@k, maj@k, per-budget summaries) and reports
(`report`: per-sample JSONL, summary JSON, the s1 accuracy-vs-thinking-tokens plot, a console table).

Import the submodules directly; this package imports nothing, so reading results does not pay for JAX.
"""
