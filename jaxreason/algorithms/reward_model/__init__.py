"""Reward model (`algorithm: reward_model`): pairwise Bradley-Terry, as TRL's RewardTrainer.

`loss.py`: a linear score head on the last token's final hidden state, -logsigmoid(r_chosen -
r_rejected) (+ TRL's optional centering term; no margin term), and `load_scorer` for GRPO's
`reward_model:PATH` reward; `config.py`: the `reward_model:` section; `run.py`: the loop.
"""
