"""Logit distillation (`algorithm: distill`, SPEC §11): a teacher (HF dir or Orbax run, same
tokenizer) and a student; forward KL, reverse KL or generalised JSD(beta) at a temperature,
optionally mixed with the data's cross-entropy; `mode: offline` trains on the data's sequences
(response tokens), `mode: on_policy` on the student's own samples scored by the teacher (GKD with
lambda = 1, Thinking Machines' on-policy distillation: per-token reverse KL over the full
vocabulary). Deviations: none in the losses; every divergence carries the tau^2 factor (loss.py).
"""
