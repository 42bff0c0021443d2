"""PPO with a critic (`algorithm: ppo`; SPEC §9): policy, frozen reference, reward, critic.

`loss.py`: the value head, the clipped value loss and the joint policy + critic step; `config.py`:
the `ppo:` section; `run.py`: rollouts, GAE on the rollout models' log-probs and values, and the
ppo_epochs x mini-batch updates on the shared harness (`train.step`, `train.loop.fit`).
"""
