"""The training algorithms the project owns rather than takes from a library: `ppo_trainer`, PPO for RLHF
(TRL removed its `PPOTrainer`). The stage that runs one (`pipeline.stages.ppo`) only wires recipe to trainer."""
