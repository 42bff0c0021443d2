"""DPO (`algorithm: dpo`): Rafailov et al. 2023, as TRL's DPOTrainer (sigmoid, hinge, IPO, robust).

`loss.py`: the losses of SPEC §6 (label-smoothed sigmoid as written there; IPO on length-averaged
log-probs, its TRL-style summed-log-ratio rewards logged beside); `config.py`: the `dpo:` section;
`run.py`: the frozen reference (precomputed or on the fly) and the loop; `self_pairs.py`: pairs
from the initial policy's own right and wrong answers.
"""
