"""The training algorithms the project owns rather than takes from a library: `ppo_trainer`, PPO for RLHF
(TRL removed its `PPOTrainer`). The stage that runs one (`pipeline.stages.ppo`) wires recipe to trainer,
and adds what lies outside the algorithm: checkpoints and held-out evaluation. `dynamic_sampling`: DAPO's
dynamic sampling added to TRL's `GRPOTrainer` and `RLOOTrainer` (the `grpo` and `rloo` stages)."""
