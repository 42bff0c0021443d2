"""Supervised fine-tuning and pre-training (`algorithm: sft`, `algorithm: pretrain`).

s1 / MiniMind reasoning distillation / CS336 SFT: completion-only cross-entropy with per-token
weights, normalised per trained token or per example over the global batch (`loss.py`, SPEC §2);
pretrain is the same loop on `pretrain_text` data (every token trained). Deviations: none from
the recipes' losses; the normalisers are global (accumulation equals one big batch).
"""
