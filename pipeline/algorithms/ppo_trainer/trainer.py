"""PPO for RLHF, read top to bottom: rollout -> score -> advantages -> update.

TRL removed its `PPOTrainer` in 2026; this is the project's own, in the spirit of CleanRL's
`ppo.py` and of "The N Implementation Details of RLHF with PPO" (Huang et al., 2024).

One PPO step (`PPOTrainer.step`), for a batch of prompts x:
  1. rollout     y ~ pi_theta(.|x)  (sampling with a KV cache, stopped at EOS or `max_new_tokens`)
  2. score       s(x, y) = sum_k w_k R_k(x, y)  (reward-model stages and rule rewards),
                 minus `missing_eos_penalty` when y never ended; then the KL-shaped per-token reward
                 r_t = -beta * kl_t  for every response token t, plus s(x, y) on the last one,
                 kl_t = log pi(y_t) - log pi_ref(y_t) (k1) or (rho - 1) - log rho, rho = pi_ref/pi (k3)
  3. advantages  GAE: delta_t = r_t + gamma V(t+1) - V(t);  A_t = delta_t + gamma lam A(t+1);  R_t = A_t + V(t)
  4. update      for `ppo_epochs` x minibatches (stopping early once the approximate KL passes `target_kl`):
                   L_pi = E[max(-A rho_t, -A clip(rho_t, 1-eps, 1+eps))],  rho_t = pi_theta/pi_old
                   L_V  = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
                   L    = L_pi + vf_coef L_V - entropy_coef H
  5. KL control  beta fixed, or adapted towards `kl_target` (Ziegler et al., 2019)

On-policy by construction: every forward pass (rollout scoring, reference, updates) sees the same ids,
attention mask and positions that `generate` saw (prompts rendered by `pipeline.data.prompts`, the mask carried
with the rollout, never rebuilt from pad ids), and dropout is off in every model, so before the first
update pi_theta / pi_old is exactly 1.

Memory: with LoRA, policy and critic are two adapters on one shared base and the reference is
that base with adapters disabled: one copy of the base weights (plus the reward model). Without
LoRA, the critic is a separate copy of the policy's trunk and the reference a frozen copy. The critic
may instead start from a reward model (`value_model`), as in InstructGPT. Logits are computed only at
response positions, log-probs only for the sampled tokens, and the critic runs the trunk without the LM head.

The trainer knows nothing of files: checkpoints (`checkpointing`) and held-out evaluation (`evaluation`)
are the stage's, wired in through `train`'s `on_step_end` hooks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.maths import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)
from pipeline.algorithms.ppo_trainer.models import ActorCritic
from pipeline.data.prompts import encode_prompts
from pipeline.models.loading import process_defaults, use_bf16
from pipeline.training.trainers import TrainingDiverged

StepHook = Callable[[int, dict[str, float]], None]  # on_step_end(step, metrics), after the step is logged


@dataclass
class Rollout:
    """One batch of experience; every per-token tensor is aligned with `response` positions."""

    prompts: list[Any]
    rows: dict[str, list]
    query: torch.Tensor  # left-padded prompt ids
    query_mask: torch.Tensor  # their attention mask, from tokenization (never rebuilt from pad ids)
    response: torch.Tensor  # generated ids, padded after EOS
    mask: torch.Tensor  # 1 for response tokens up to and including EOS
    logprobs: torch.Tensor = field(default=None)
    ref_logprobs: torch.Tensor = field(default=None)
    values: torch.Tensor = field(default=None)
    scores: torch.Tensor = field(default=None)
    rewards: torch.Tensor = field(default=None)  # KL-shaped, per token
    advantages: torch.Tensor = field(default=None)
    returns: torch.Tensor = field(default=None)

    def sequence_inputs(self, idx: torch.Tensor | slice = slice(None)) -> dict[str, Any]:
        """input_ids, attention_mask, position_ids of query + response exactly as `generate` built them."""
        query, response = self.query[idx], self.response[idx]
        input_ids = torch.cat([query, response], dim=1)
        # generate() attends to every new token, the padding after an EOS included; that padding comes after
        # the response, so no response token sees it, and the losses mask it.
        attention_mask = torch.cat([self.query_mask[idx], torch.ones_like(response)], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response.shape[1] + 1)  # logits at t predict token t+1


class PPOTrainer:
    """Runs PPO on prompt rows (`prompt` plus any columns the reward functions use)."""

    def __init__(self, config: PPOConfig, model: ActorCritic, tokenizer, prompts_dataset,
                 reward_functions: list[Callable], reward_weights: list[float], reward_names: list[str],
                 ref_model: nn.Module | None = None):
        self.config = config
        bf16 = use_bf16() if config.bf16 is None else config.bf16
        report_to = None if config.report_to in ("none", ["none"], []) else config.report_to
        # The same process setup the runner and the Trainers use: CPU-only DDP over gloo needs `cpu`.
        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", log_with=report_to,
                                       project_dir=config.output_dir, cpu=process_defaults()["use_cpu"])
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None and deepspeed.zero_stage == 3:
            raise ValueError("PPO supports DeepSpeed ZeRO stages 0-2, not 3: rollouts would gather the sharded "
                             "weights for every generated token; use deepspeed_zero2.yaml or LoRA under DDP")
        if deepspeed is not None:  # no dataloader is prepared, so DeepSpeed cannot infer its batch sizes
            # (and an earlier stage's Trainer may have filled them in for its own batches)
            deepspeed.deepspeed_config.update(
                train_micro_batch_size_per_gpu=config.mini_batch_size, gradient_accumulation_steps=1,
                train_batch_size=config.mini_batch_size * self.accelerator.num_processes)
        set_seed(config.seed, device_specific=True)  # each rank samples different responses
        self.tokenizer = tokenizer
        self.dataset = prompts_dataset
        self.reward_functions, self.reward_weights, self.reward_names = reward_functions, reward_weights, reward_names
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters, on CPU too (measured 5x faster per step than the default loop)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.max_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if ref_model is not None:
            disable_dropout_in_model(ref_model)
            self.ref_model = ref_model.to(self.accelerator.device).eval()
        else:
            self.ref_model = None
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.global_step = 0  # PPO steps done
        self.log_history: list[dict[str, float]] = []
        # Each rank draws its own prompts; its generator's state is checkpointed per rank.
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        if report_to:
            self.accelerator.init_trackers("ppo", config={k: v for k, v in asdict(config).items()
                                                          if isinstance(v, (int, float, str, bool))})

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------- loop
    def train(self, on_step_end: Iterable[StepHook] = ()) -> list[dict[str, float]]:
        """PPO steps from `global_step` to `max_steps`; returns the log history. Each step's metrics are
        logged (every `logging_steps`) and then handed to every `on_step_end` hook."""
        hooks = list(on_step_end)
        progress = tqdm(total=self.config.max_steps, initial=self.global_step, desc="ppo",
                        disable=not self.accelerator.is_main_process)
        while self.global_step < self.config.max_steps:
            metrics = self.step()
            if self.global_step % self.config.logging_steps == 0 or self.global_step == self.config.max_steps:
                self.log_history.append(metrics)
                self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=self.global_step)
                progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
            for hook in hooks:
                hook(self.global_step, metrics)
            progress.update(1)
        progress.close()
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group later stages use
            tracker.finish()
        return self.log_history

    def step(self) -> dict[str, float]:
        """One PPO step: rollout -> score -> advantages -> update, then KL control; returns the step's metrics."""
        started = time.time()
        rollout = self.rollout()
        generation_seconds = time.time() - started
        metrics = self.score(rollout)
        metrics["time/generation_s"] = generation_seconds
        self.advantages(rollout)
        metrics.update(self.update(rollout))
        if self.config.adaptive_kl:  # 5. KL control: beta moves towards the target by this rollout's KL
            self.kl_controller.update(metrics["kl"], self.config.rollout_batch_size * self.accelerator.num_processes)
        self.global_step += 1
        metrics["step"] = self.global_step
        return metrics

    # ---------------------------------------------------------------------- 1. rollout
    def rollout(self) -> Rollout:
        """Responses sampled from the current policy to a fresh batch of training prompts."""
        prompts, rows = self.sample_prompts()
        return self.generate_responses(prompts, rows, do_sample=True)

    def sample_prompts(self) -> tuple[list[Any], dict[str, list]]:
        indices = torch.randint(len(self.dataset), (self.config.rollout_batch_size,), generator=self.generator)
        rows = self.dataset.select(indices.tolist())
        columns = {name: list(rows[name]) for name in rows.column_names}
        return columns["prompt"], columns

    @torch.no_grad()
    def generate_responses(self, prompts: list[Any], rows: dict[str, list], do_sample: bool) -> Rollout:
        """Responses from the current policy (with a KV cache) to prompts rendered as training saw them."""
        tokenizer, policy, device = self.tokenizer, self.unwrapped, self.accelerator.device
        query, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
        if policy.uses_adapters:
            policy.use_adapter("policy")
        policy.eval()
        sampling = dict(do_sample=True, temperature=self.config.temperature, top_k=self.config.top_k,
                        top_p=self.config.top_p) if do_sample else dict(do_sample=False)
        output = policy.policy.generate(input_ids=query, attention_mask=query_mask,
                                        max_new_tokens=self.config.max_new_tokens, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **sampling)
        response = output[:, query.shape[1]:]
        # Everything after the first EOS is padding; the EOS itself belongs to the response.
        is_eos = response == tokenizer.eos_token_id
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
        return Rollout(prompts, rows, query, query_mask, response.masked_fill(after_eos, tokenizer.pad_token_id),
                       (~after_eos).float())

    # ------------------------------------------------------------------------ 2. score
    @torch.no_grad()
    def score(self, rollout: Rollout) -> dict[str, float]:
        """Fill in log pi_old, V_old, log pi_ref, s(x, y) and the KL-shaped per-token rewards; returns metrics."""
        rollout.logprobs, values, _ = self.policy_outputs(self.unwrapped, rollout)
        rollout.values = values * rollout.mask
        rollout.ref_logprobs = self.reference_logprobs(rollout)
        rollout.scores = self.sequence_scores(rollout)
        mask = rollout.mask
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, self.config.kl_estimator) * mask
        scores = rollout.scores
        if self.config.whiten_rewards:
            scores = masked_whiten(scores, torch.ones_like(scores), shift_mean=False, all_reduce_sum=self.all_reduce_sum)
        rollout.rewards = shaped_rewards(scores, kl, mask, self.kl_controller.value)
        return {
            "reward": self.gather_mean(rollout.scores),
            "kl": self.gather_mean(kl.sum(1)),
            "kl_coef": self.kl_controller.value,
            "response_length": self.gather_mean(mask.sum(1)),
            "eos_fraction": self.gather_mean((rollout.response == self.tokenizer.eos_token_id).any(1).float()),
        }

    def policy_outputs(self, model, rollout: Rollout, idx: torch.Tensor | slice = slice(None),
                       with_entropy: bool = False, temperature: float | None = None):
        """(log pi(y_t), V(t), entropy or None) at the response positions, at the sampling temperature by default."""
        inputs = rollout.sequence_inputs(idx)
        logits, values = model(**inputs)
        logits = logits[:, :-1].float() / (temperature or self.config.temperature)
        logprobs = selective_log_softmax(logits, rollout.response[idx])
        entropy = None
        if with_entropy:  # a graph through the entropy only when it is part of the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.entropy_coef != 0):
                entropy = entropy_from_logits(logits)
        return logprobs, values[:, :-1], entropy

    @torch.no_grad()
    def reference_logits(self, rollout: Rollout) -> torch.Tensor:
        """The reference's logits at the response positions (the frozen copy, or the base with adapters off)."""
        inputs = rollout.sequence_inputs()
        if self.ref_model is not None:
            logits = self.ref_model(**inputs).logits
        else:
            policy = self.unwrapped.policy
            with policy.disable_adapter():
                logits = policy(**inputs).logits
        return logits[:, :-1].float()

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return selective_log_softmax(self.reference_logits(rollout) / self.config.temperature, rollout.response)

    def completions(self, rollout: Rollout) -> list[Any]:
        texts = self.tokenizer.batch_decode(rollout.response, skip_special_tokens=True)
        return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                for p, t in zip(rollout.prompts, texts)]

    def term_scores(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Each reward term's (unweighted) score of every response."""
        completions = self.completions(rollout)
        extra = {k: v for k, v in rollout.rows.items() if k != "prompt"}
        return {name: torch.tensor(function(prompts=rollout.prompts, completions=completions, **extra),
                                   dtype=torch.float32)
                for name, function in zip(self.reward_names, self.reward_functions)}

    def sequence_scores(self, rollout: Rollout) -> torch.Tensor:
        """s(x, y): the weighted sum of reward terms, minus the penalty for a response without EOS."""
        terms = self.term_scores(rollout)
        scores = sum(w * terms[name] for name, w in zip(self.reward_names, self.reward_weights))
        if self.config.missing_eos_penalty is not None:
            ended = (rollout.response == self.tokenizer.eos_token_id).any(dim=1).cpu()
            scores = scores - self.config.missing_eos_penalty * (~ended).float()
        return scores.to(self.accelerator.device)

    # ------------------------------------------------------------------- 3. advantages
    @torch.no_grad()
    def advantages(self, rollout: Rollout) -> None:
        """Fill in GAE advantages (whitened over the global batch if configured) and returns."""
        rollout.advantages, rollout.returns = gae(rollout.rewards, rollout.values, rollout.mask, self.config.gamma,
                                                  self.config.lam)
        if self.config.whiten_advantages:
            rollout.advantages = masked_whiten(rollout.advantages, rollout.mask, all_reduce_sum=self.all_reduce_sum)

    # ----------------------------------------------------------------------- 4. update
    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` of clipped minibatch updates on the rollout, then one scheduler step; returns metrics."""
        config = self.config
        # Dropout is disabled in every model; eval mode keeps anything else mode-dependent (MoE router
        # jitter, for one) identical between rollout and update, so rho_t starts at exactly 1.
        self.model.eval()
        names = ("policy_loss", "value_loss", "entropy", "clip_fraction", "value_clip_fraction", "approx_kl")
        totals = torch.zeros(len(names), device=rollout.mask.device)
        updates = epochs = 0
        started = time.time()
        for _ in range(config.ppo_epochs):
            epoch_kl = torch.zeros((), device=rollout.mask.device)
            order = torch.randperm(config.rollout_batch_size, generator=self.generator)
            for start in range(0, config.rollout_batch_size, config.mini_batch_size):
                idx = order[start:start + config.mini_batch_size].to(rollout.mask.device)
                mask = rollout.mask[idx]
                logprobs, values, entropy = self.policy_outputs(self.model, rollout, idx, with_entropy=True)
                pg_loss, clip_fraction, approx_kl = policy_loss(logprobs, rollout.logprobs[idx],
                                                                rollout.advantages[idx], mask, config.clip_range)
                vf_loss, vf_clip = value_loss(values, rollout.values[idx], rollout.returns[idx], mask,
                                              config.clip_range_value)
                entropy = masked_mean(entropy, mask)
                loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"PPO loss became {loss.item()} at step {self.global_step + 1}; "
                                           "lower the learning rate or check the reward functions")
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                totals += torch.stack([pg_loss, vf_loss, entropy, clip_fraction, vf_clip, approx_kl]).detach()
                epoch_kl += approx_kl.detach()
                updates += 1
            epochs += 1
            minibatches = config.rollout_batch_size // config.mini_batch_size
            # the same decision on every rank: the epoch's approximate KL averaged over all of them
            if config.target_kl is not None and float(self.all_reduce_sum(epoch_kl)) / (
                    minibatches * self.accelerator.num_processes) > config.target_kl:
                break
        self.scheduler.step()
        means = self.all_reduce_sum(totals / updates) / self.accelerator.num_processes
        metrics = dict(zip(names, means.tolist()))
        metrics["explained_variance"] = explained_variance(rollout.values, rollout.returns, rollout.mask)
        metrics["ppo_epochs"] = epochs
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/optimisation_s"] = time.time() - started
        return metrics

    # -------------------------------------------------------------- across processes
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def gather_mean(self, x: torch.Tensor) -> float:
        return float(self.accelerator.gather(x.detach().float().reshape(-1)).mean())
