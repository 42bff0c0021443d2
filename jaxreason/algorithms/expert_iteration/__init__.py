"""Expert iteration (`algorithm: expert_iteration`, CS336 assignment 5; SPEC §5).

Rounds of: sample from the current policy, keep the verified-correct completions (distinct per
question), SFT on them with the SFT loss and the same `fit` loop (`run.py`); `config.py`: the
`expert_iteration:` section. One train state and optimizer state carry across rounds; the
learning-rate schedule spans an upper bound of the SFT steps (every completion kept).
"""
