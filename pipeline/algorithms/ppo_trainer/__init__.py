"""PPO for RLHF, the project's own (TRL removed its `PPOTrainer`). Read in this order:

- `config`: `PPOConfig`, every hyper-parameter a recipe's `args` can set;
- `maths`: the losses, GAE, whitening and KL estimators, as pure tensor functions;
- `models`: `ActorCritic`, the policy and critic in one module;
- `trainer`: `PPOTrainer`, whose `step` is rollout -> score -> advantages -> update.

Outside the algorithm: `checkpointing` (save and resume, wired in through `PPOTrainer.train`'s hooks)
and `evaluation` (held-out greedy scores and KL), both driven by the `ppo` stage.
"""
