"""Values a stage's config class accepts but that cannot train: checked on the built config, before any stage runs.

TrainingArguments and TRL's configs take a negative learning rate, `max_length: 0` or
`num_train_epochs: 0` without complaint; the stage then crashes mid-run or "completes" after zero
steps, and every later stage trains on an untrained model. Each rule names the key, the value and
what would be valid.
"""

from __future__ import annotations

from typing import Any

# key: (smallest valid value, whether that bound itself is valid, what is valid in words). Keys a config
# class lacks are skipped, so one table serves TrainingArguments, TRL's configs and PPOConfig.
BOUNDS: dict[str, tuple[float, bool, str]] = {
    "learning_rate": (0, False, "> 0"),
    "max_length": (1, True, "a positive number of tokens, or null"),
    "max_prompt_length": (1, True, "a positive number of tokens, or null"),
    "max_completion_length": (1, True, "a positive number of tokens, or null"),
    "max_new_tokens": (1, True, "a positive number of tokens"),
    "per_device_train_batch_size": (1, True, ">= 1"),
    "per_device_eval_batch_size": (1, True, ">= 1"),
    "gradient_accumulation_steps": (1, True, ">= 1"),
    "num_generations": (2, True, ">= 2 (GRPO compares completions within a group)"),
    "rollout_batch_size": (1, True, ">= 1"),
    "mini_batch_size": (1, True, ">= 1"),
    "ppo_epochs": (1, True, ">= 1"),
    "temperature": (0, False, "> 0"),
    "weight_decay": (0, True, ">= 0"),
    "max_grad_norm": (0, True, ">= 0"),
    "warmup_steps": (0, True, ">= 0"),
    "beta": (0, True, ">= 0"),
    "kl_coef": (0, True, ">= 0"),
}


def value_problems(config: Any, given: dict[str, Any]) -> list[str]:
    """Problems with a built config's values, each as `args.KEY: ...`; `given` are the keys the recipe set."""
    problems = []
    for key, (bound, inclusive, valid) in BOUNDS.items():
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value < bound or (value == bound and not inclusive):
            problems.append(f"args.{key}: must be {valid}, got {value!r}")
    max_steps = getattr(config, "max_steps", None)
    epochs = getattr(config, "num_train_epochs", None)
    if isinstance(max_steps, int) and (max_steps == 0 or max_steps < -1):
        problems.append(f"args.max_steps: must be > 0 (or -1 to train for num_train_epochs), got {max_steps}; "
                        "0 steps would leave the model untrained and every later stage would build on it")
    elif max_steps == -1 and isinstance(epochs, (int, float)) and epochs <= 0:
        key = "num_train_epochs" if "num_train_epochs" in given else "num_train_epochs (its default)"
        problems.append(f"args.{key}: must be > 0 when max_steps is not set, got {epochs}; "
                        "0 epochs would leave the model untrained and every later stage would build on it")
    return problems
