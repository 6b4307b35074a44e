"""The models PPO trains: `ActorCritic`, policy logits and per-token values from one forward call."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
import torch.nn as nn
from transformers.modeling_layers import GradientCheckpointingLayer
from trl.trainer.utils import disable_dropout_in_model

# peft names an adapter's weights `<module>.lora_A.<adapter>.weight` (lora_B, lora_embedding_A, lora_magnitude_vector...)
VALUE_ADAPTER_PARAMETER = re.compile(r"\.lora_[A-Za-z_]+\.value(\.|$)")


def decoder_trunk(causal_lm: nn.Module) -> nn.Module:
    """The transformer of a causal LM (or of a PeftModel around one) without its LM head."""
    model = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return getattr(model, model.base_model_prefix)


class ActorCritic(nn.Module):
    """Policy logits and per-token values from one forward call (one call keeps DDP happy).

    Three layouts of the critic:
    - a LoRA adapter (`value_head` given, `critic_trunk` None): `policy` is a PeftModel with adapters "policy" and
      "value"; the critic runs the same base's trunk under "value", the reference is the base with adapters off;
    - a separate transformer (`critic_trunk`): a copy of the policy's, or a reward model's;
    - none (`value_head` None): the critic-free estimators; `forward` returns no values.
    """

    def __init__(self, policy: nn.Module, critic_trunk: nn.Module | None, value_head: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.critic_trunk = critic_trunk
        self.value_head = value_head
        for module in (policy, critic_trunk):  # PPO's ratio must be exactly 1 before the first update
            if module is not None:
                disable_dropout_in_model(module)
        self.active_adapter: str | None = None
        if self.value_adapter:
            # peft leaves the adapter it added last frozen; the optimizer is built from what is trainable now, so
            # without this the critic's adapter got gradients that nothing applied or cleared
            self.lora_parameters = [p for n, p in policy.named_parameters() if "lora_" in n]
            self.use_adapter("policy")

    @classmethod
    def with_new_head(cls, policy: nn.Module, critic_trunk: nn.Module | None, hidden_size: int,
                      init_std: float) -> ActorCritic:
        head = nn.Linear(hidden_size, 1)
        nn.init.normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
        return cls(policy, critic_trunk, head)

    def enable_activation_checkpointing(self) -> None:
        """Keep only each layer's input in the forward pass and recompute the rest in the backward pass."""
        # non-reentrant: gradients reach the LoRA weights without the inputs requiring grad
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if self.value_adapter:  # the backward pass runs after `forward` went back to the policy's adapter
            kwargs["context_fn"] = self.recompute_under_active_adapter
        for module in (self.policy, self.critic_trunk):
            if module is not None:  # the value adapter runs the policy's own layers
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        self.checkpointed_layers = [m for m in self.modules() if getattr(m, "gradient_checkpointing", False)
                                    and isinstance(m, GradientCheckpointingLayer)]
        self.train(self.training)

    def recompute_under_active_adapter(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """`torch.utils.checkpoint`'s contexts for a layer's forward pass and for its recomputation: the
        recomputation runs under the adapter the forward pass ran under (the critic's layers under "value")."""
        adapter = self.active_adapter

        @contextlib.contextmanager
        def under_that_adapter() -> Iterator[None]:
            current = self.active_adapter
            self.use_adapter(adapter)
            try:
                yield
            finally:
                self.use_adapter(current)
        return contextlib.nullcontext(), under_that_adapter()

    def train(self, mode: bool = True) -> ActorCritic:
        """PPO runs in eval mode throughout (see `PPOTrainer.update`), but transformers checkpoints a layer only
        in training mode: the checkpointed layers alone are marked training (their own flag, not their
        submodules'); they checkpoint only where gradients are recorded, and run as they are elsewhere."""
        super().train(mode)
        for layer in getattr(self, "checkpointed_layers", []):
            layer.training = True
        return self

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    @property
    def value_adapter(self) -> bool:
        """The critic is the "value" LoRA adapter on the policy's own base."""
        return self.has_critic and self.critic_trunk is None

    def use_adapter(self, name: str) -> None:
        """Activate one adapter; keep both trainable (peft freezes the inactive one). A switch walks every module
        (~20 ms for a 135M model), and checkpointed layers switch twice each as they are recomputed: the adapter
        already active is kept as it is, and the adapters' parameters are listed once."""
        if name == self.active_adapter:
            return
        self.policy.base_model.set_adapter(name)
        self.active_adapter = name  # peft's own `active_adapter` does not follow `base_model.set_adapter`
        for param in self.lora_parameters:
            param.requires_grad_(True)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's trainable parameters (its own learning rate and clipping); the rest are the policy's."""
        if not self.has_critic:
            return []
        if self.value_adapter:
            trunk = [p for n, p in self.policy.named_parameters() if VALUE_ADAPTER_PARAMETER.search(n) and p.requires_grad]
        else:
            trunk = [p for p in self.critic_trunk.parameters() if p.requires_grad]
        return trunk + [p for p in self.value_head.parameters() if p.requires_grad]

    def policy_parameters(self) -> list[nn.Parameter]:
        critic = {id(p) for p in self.critic_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in critic]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, values or None) at the last `logits_to_keep` positions only: the ones that predict the response."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.value_adapter:
            self.use_adapter("policy")
        logits = self.policy(**inputs, logits_to_keep=logits_to_keep).logits
        if not self.has_critic:
            return logits, None
        if self.value_adapter:
            self.use_adapter("value")
            hidden = decoder_trunk(self.policy)(**inputs).last_hidden_state
            self.use_adapter("policy")
        else:
            hidden = self.critic_trunk(**inputs).last_hidden_state
        hidden = hidden[:, -logits_to_keep:]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
