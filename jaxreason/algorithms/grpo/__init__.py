"""GRPO (`algorithm: grpo`): DeepSeekMath GRPO as TRL's GRPOTrainer, with Dr.GRPO, DAPO and GSPO.

`loss.py`: advantages, the clipped surrogate + k3 KL, the four aggregations and the train step's
loss (its docstring lists the deviations from TRL: global normalisers, token-level clip fractions
for GSPO, the entropy term's normalisation); `config.py`: the `grpo:` section; `run.py`:
rollouts, update rows and the loop (SPEC §5).
"""
