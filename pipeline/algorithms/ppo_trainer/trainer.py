"""PPO for RLHF, read top to bottom: rollout -> score -> advantages -> update.

TRL removed its `PPOTrainer` in 2026; this is the project's own, in the spirit of CleanRL's
`ppo.py` and of "The N Implementation Details of RLHF with PPO" (Huang et al., 2024).

One PPO step (`PPOTrainer.step`), for a batch of prompts x:
  1. rollout     y ~ pi_theta(.|x), `samples_per_prompt` samples of each prompt (a group), with a KV cache,
                 stopped at EOS or `max_new_tokens`; each scored s(x, y) = sum_k w_k R_k(x, y) (reward-model stages
                 and rule rewards), minus `missing_eos_penalty` when y never ended. Dynamic sampling (DAPO) drops
                 groups whose samples all scored alike and samples more prompts until the batch is full.
  2. score       log pi_old, V_old (with a critic), log pi_ref; s normalised (running mean and std, clipped);
                 then the KL-shaped per-token reward: r_t = -beta * kl_t for every response token t, plus the
                 (normalised, for the critic-free estimators group-baselined) score on the last one,
                 kl_t = log pi(y_t) - log pi_ref(y_t) (k1) or (rho - 1) - log rho, rho = pi_ref/pi (k3)
  3. advantages  gae: delta_t = r_t + gamma V(t+1) - V(t);  A_t = delta_t + gamma lam A(t+1);  R_t = A_t + V(t)
                 rloo / reinforce_plus_plus / grpo (no critic): the score against its group's
                 (leave-one-out mean; mean, then whitened over the batch; mean and std), A_t = sum_{t'>=t} gamma^(t'-t) r_t'
  4. update      for `ppo_epochs` x minibatches (stopping early once the approximate KL passes `target_kl`):
                   L_pi = E[max(-A rho_t, -A clip(rho_t, 1-eps, 1+eps))],  rho_t = pi_theta/pi_old
                   L_V  = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]   (gae only)
                   L    = L_pi + vf_coef L_V - entropy_coef H
                 policy and critic each with its own learning rate and gradient-norm clip; during the first
                 `critic_warmup_steps` steps only the critic learns
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
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from peft import PeftModel
from peft.helpers import disable_input_dtype_casting
from transformers import get_scheduler
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from pipeline.algorithms.dynamic_sampling import zero_variance_groups
from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.maths import (
    AdaptiveKLController,
    RunningMoments,
    explained_variance,
    gae,
    group_baselined_scores,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    returns_to_go,
    shaped_rewards,
    value_loss,
)
from pipeline.algorithms.ppo_trainer.models import ActorCritic
from pipeline.data.prompts import encode_prompts
from pipeline.models.loading import autocast_as_trained, process_defaults, use_bf16
from pipeline.models.sampling import model_distribution, stop_token_ids
from pipeline.models.shared_prompts import generate_sharing_prompts
from pipeline.runtime.progress import StepLines
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
    ended: torch.Tensor  # True where the response emitted EOS (read at generation: pad may equal EOS)
    scores: torch.Tensor = field(default=None)  # s(x, y), raw
    logprobs: torch.Tensor = field(default=None)
    ref_logprobs: torch.Tensor = field(default=None)
    values: torch.Tensor | None = field(default=None)  # None without a critic
    rewards: torch.Tensor = field(default=None)  # KL-shaped, per token
    advantages: torch.Tensor = field(default=None)
    returns: torch.Tensor | None = field(default=None)  # the critic's targets

    def __len__(self) -> int:
        return len(self.prompts)

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

    def select(self, idx: torch.Tensor) -> Rollout:
        """The sampled rows `idx` (before scoring: responses and their scores)."""
        rows = idx.tolist()
        return Rollout([self.prompts[i] for i in rows], {k: [v[i] for i in rows] for k, v in self.rows.items()},
                       self.query[idx], self.query_mask[idx], self.response[idx], self.mask[idx], self.ended[idx],
                       self.scores[idx])

    @staticmethod
    def concatenate(parts: list[Rollout], pad_token_id: int) -> Rollout:
        """Sampled rollouts as one batch: queries padded on the left, responses on the right (both masked out)."""
        query_width = max(p.query.shape[1] for p in parts)
        response_width = max(p.response.shape[1] for p in parts)

        def pad(x: torch.Tensor, width: int, left: bool, value: float) -> torch.Tensor:
            extra = width - x.shape[1]
            return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

        return Rollout(
            [prompt for p in parts for prompt in p.prompts],
            {k: [v for p in parts for v in p.rows[k]] for k in parts[0].rows},
            torch.cat([pad(p.query, query_width, True, pad_token_id) for p in parts]),
            torch.cat([pad(p.query_mask, query_width, True, 0) for p in parts]),
            torch.cat([pad(p.response, response_width, False, pad_token_id) for p in parts]),
            torch.cat([pad(p.mask, response_width, False, 0) for p in parts]),
            torch.cat([p.ended for p in parts]), torch.cat([p.scores for p in parts]))


class PPOTrainer:
    """Runs PPO on prompt rows (`prompt` plus any columns the reward functions use)."""

    def __init__(self, config: PPOConfig, model: ActorCritic, tokenizer, prompts_dataset,
                 reward_functions: list[Callable], reward_weights: list[float], reward_names: list[str],
                 ref_model: nn.Module | None = None):
        self.config = config
        bf16 = use_bf16() if config.bf16 is None else config.bf16
        report_to = None if config.report_to in ("none", ["none"], []) else config.report_to
        # accelerate keeps one process-wide state, and refuses an Accelerator whose mixed precision differs from the
        # one an earlier stage's Trainer set; each Trainer's TrainingArguments starts it afresh, and so does PPO
        # (the process group, PartialState, stays).
        AcceleratorState._reset_state(reset_partial_state=False)
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
        # The policy and the critic: one optimizer, a parameter group (learning rate) each, clipped apart.
        self.policy_params, self.critic_params = model.policy_parameters(), model.critic_parameters()
        policy_lr, critic_lr = config.learning_rates(adapters=isinstance(model.policy, PeftModel))
        groups = [{"params": self.policy_params, "lr": policy_lr}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": critic_lr})
        # fused: one kernel for all parameters, on CPU too (measured 5x faster per step than the default loop)
        optimizer = torch.optim.AdamW(groups, lr=policy_lr, weight_decay=config.weight_decay, fused=True)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.max_steps)
        if config.activation_checkpointing:
            model.enable_activation_checkpointing()
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if ref_model is not None:
            disable_dropout_in_model(ref_model)
            self.ref_model = ref_model.to(self.accelerator.device).eval()
        else:
            self.ref_model = None
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.reward_moments = RunningMoments()  # every sequence score so far, for `reward_normalization: running`
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
        # Plain progress lines as the Trainer stages print them: a tqdm bar redrawn at every step fills a log file
        progress = StepLines(self.config.max_steps, self.global_step)
        while self.global_step < self.config.max_steps:
            metrics = self.step()
            if self.global_step % self.config.logging_steps == 0 or self.global_step == self.config.max_steps:
                self.log_history.append(metrics)
                self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=self.global_step)
            for hook in hooks:
                hook(self.global_step, metrics)
            if self.accelerator.is_main_process and progress.due():
                progress.show(self.global_step)
        for tracker in self.accelerator.trackers:  # not end_training(): it destroys the process group later stages use
            tracker.finish()
        return self.log_history

    def step(self) -> dict[str, float]:
        """One PPO step: rollout -> score -> advantages -> update, then KL control; returns the step's metrics."""
        started = time.time()
        rollout, sampling = self.rollout()
        generation_seconds = time.time() - started
        metrics = {**sampling, **self.score(rollout), "time/generation_s": generation_seconds}
        self.advantages(rollout)
        metrics.update(self.update(rollout))
        if self.config.adaptive_kl:  # 5. KL control: beta moves towards the target by this rollout's KL
            self.kl_controller.update(metrics["kl"], self.config.rollout_batch_size * self.accelerator.num_processes)
        self.global_step += 1
        metrics["step"] = self.global_step
        return metrics

    # ---------------------------------------------------------------------- 1. rollout
    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        """Scored responses of the current policy to fresh training prompts, and the sampling's metrics.

        With dynamic sampling, groups whose samples all scored alike are set aside and more prompts drawn, up to
        `dynamic_sampling_max_draws` rollouts; a batch still short then is topped up with set-aside groups.
        `reward` is the first draw's mean score: the policy's own, not the filtered batch's.
        """
        config, group = self.config, self.config.samples_per_prompt
        kept, set_aside, flat_groups = [], [], []
        batch = self.sample_responses()
        first_scores = batch.scores
        while True:  # no collective call inside: under DDP each process may draw a different number of times
            flat = zero_variance_groups(batch.scores, group)
            flat_groups.append(flat)
            if config.dynamic_sampling_max_draws is None:
                break
            flat_rows = flat.repeat_interleave(group)
            kept.append(batch.select(torch.nonzero(~flat_rows).squeeze(1)))
            set_aside.append(batch.select(torch.nonzero(flat_rows).squeeze(1)))
            if sum(map(len, kept)) >= config.rollout_batch_size or len(kept) == config.dynamic_sampling_max_draws:
                # whole groups either way: the batch size is a multiple of the group size
                batch = Rollout.concatenate(kept + set_aside, self.tokenizer.pad_token_id).select(
                    torch.arange(config.rollout_batch_size))
                break
            batch = self.sample_responses()
        # means over processes of per-process figures: the processes may have drawn different numbers of groups
        device = self.accelerator.device
        metrics = {"reward": self.gather_mean(first_scores)}
        if group > 1:
            metrics["zero_variance_fraction"] = self.gather_mean(torch.cat(flat_groups).float().mean().to(device))
        if kept:
            metrics["dynamic_sampling/draws"] = self.gather_mean(torch.tensor(float(len(kept)), device=device))
            filled = min(sum(map(len, kept)) / config.rollout_batch_size, 1.0)
            metrics["dynamic_sampling/filled_fraction"] = self.gather_mean(torch.tensor(filled, device=device))
        return batch, metrics

    def sample_responses(self) -> Rollout:
        """`samples_per_prompt` responses to each of a fresh batch of training prompts, each scored s(x, y)."""
        prompts, rows = self.sample_prompts()
        rollout = self.generate_responses(prompts, rows, do_sample=True)
        rollout.scores = self.sequence_scores(rollout)
        return rollout

    def sample_prompts(self) -> tuple[list[Any], dict[str, list]]:
        """A batch of prompt rows, each repeated `samples_per_prompt` times in a row (a group)."""
        indices = torch.randint(len(self.dataset), (self.config.prompts_per_rollout,), generator=self.generator)
        rows = self.dataset.select(indices.repeat_interleave(self.config.samples_per_prompt).tolist())
        columns = {name: list(rows[name]) for name in rows.column_names}
        return columns["prompt"], columns

    @torch.no_grad()
    def generate_responses(self, prompts: list[Any], rows: dict[str, list], do_sample: bool) -> Rollout:
        """Responses from the current policy (with a KV cache) to prompts rendered as training saw them."""
        tokenizer, policy, device = self.tokenizer, self.unwrapped, self.accelerator.device
        query, query_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
        if policy.value_adapter:
            policy.use_adapter("policy")
        policy.eval()
        sampling = dict(do_sample=True, temperature=self.config.temperature, top_k=self.config.top_k,
                        top_p=self.config.top_p) if do_sample else dict(do_sample=False)
        # under the autocast the prepared model scores and trains with, from the policy's own distribution (none of
        # its shipped penalties: pipeline.models.sampling); a group's rows share their prompt's cache
        stops = stop_token_ids(policy.policy, tokenizer)
        with autocast_as_trained(self.accelerator, policy), model_distribution(policy.policy):
            output = generate_sharing_prompts(policy.policy, policy.policy.generate, query, query_mask,
                                              max_new_tokens=self.config.max_new_tokens, use_cache=True,
                                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, **sampling)
        response = output[:, query.shape[1]:]
        # Everything after the first stop id is padding; the stop id itself belongs to the response.
        is_eos = torch.isin(response, torch.tensor(stops, device=response.device))
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
        return Rollout(prompts, rows, query, query_mask, response.masked_fill(after_eos, tokenizer.pad_token_id),
                       (~after_eos).float(), is_eos.any(1))

    # ------------------------------------------------------------------------ 2. score
    @torch.no_grad()
    def score(self, rollout: Rollout) -> dict[str, float]:
        """Fill in log pi_old, V_old, log pi_ref and the KL-shaped per-token rewards; returns metrics."""
        config = self.config
        rollout.logprobs, values, _ = self.policy_outputs(self.unwrapped, rollout)
        rollout.values = None if values is None else values * rollout.mask
        rollout.ref_logprobs = self.reference_logprobs(rollout)
        mask = rollout.mask
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * mask
        scores = self.normalized_scores(rollout.scores)
        if not config.uses_critic:
            scores = group_baselined_scores(scores, config.samples_per_prompt, config.advantage_estimator,
                                            config.scale_rewards, self.all_reduce_sum)
        rollout.rewards = shaped_rewards(scores, kl, mask, self.kl_controller.value)
        return {
            "kl": self.gather_mean(kl.sum(1)),
            "kl_coef": self.kl_controller.value,
            "response_length": self.gather_mean(mask.sum(1)),
            # a step's time follows its longest prompt (HH-RLHF's run to 857 tokens): logged to read slow steps by
            "prompt_length": self.gather_mean(rollout.query_mask.sum(1)),
            "prompt_length_max": self.gather_max(rollout.query_mask.sum(1)),
            "eos_fraction": self.gather_mean(rollout.ended.float()),
            "reward_mean": self.reward_moments.mean,
            "reward_std": self.reward_moments.var ** 0.5,
        }

    def normalized_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores standardised by the running (or this batch's) mean and std over all processes, then clipped."""
        mode = self.config.reward_normalization
        if mode == "none":
            return scores
        moments = self.reward_moments if mode == "running" else RunningMoments()
        total, squares, count = self.all_reduce_sum(
            torch.stack([scores.sum(), (scores * scores).sum(), torch.tensor(float(len(scores)), device=scores.device)]))
        moments.update(float(total), float(squares), float(count))
        return moments.normalize(scores, self.config.reward_clip or None)

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
        return logprobs, None if values is None else values[:, :-1], entropy

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
            scores = scores - self.config.missing_eos_penalty * (~rollout.ended.cpu()).float()
        return scores.to(self.accelerator.device)

    # ------------------------------------------------------------------- 3. advantages
    @torch.no_grad()
    def advantages(self, rollout: Rollout) -> None:
        """Fill in the advantages (GAE with the critic's returns, or rewards-to-go), whitened where configured."""
        config = self.config
        if config.uses_critic:
            rollout.advantages, rollout.returns = gae(rollout.rewards, rollout.values, rollout.mask, config.gamma,
                                                      config.lam)
        else:  # the group baseline is already in the rewards
            rollout.advantages = returns_to_go(rollout.rewards, rollout.mask, config.gamma)
        if config.whiten_advantages and config.advantage_estimator in ("gae", "reinforce_plus_plus"):
            rollout.advantages = masked_whiten(rollout.advantages, rollout.mask, all_reduce_sum=self.all_reduce_sum)

    # ----------------------------------------------------------------------- 4. update
    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` of clipped minibatch updates on the rollout, then one scheduler step; returns metrics."""
        # Under autocast (mixed precision bf16) every linear layer computes in bf16: peft's cast of each input to its
        # fp32 adapter's dtype, which autocast casts straight back, would only copy activations (measured on a
        # SmolLM2 LoRA update in bf16: 8-12% of its time, 9% of its peak memory; the same losses).
        with disable_input_dtype_casting(self.unwrapped, active=self.accelerator.native_amp):
            return self.clipped_updates(rollout)

    def clipped_updates(self, rollout: Rollout) -> dict[str, float]:
        config, critic = self.config, self.unwrapped.has_critic
        # Critic warm-up: the critic learns while the policy stays as it is (its loss term is weighted 0, which keeps
        # DDP's gradient all-reduce whole, and its gradients are dropped before the optimizer step).
        warming_up = critic and self.global_step < config.critic_warmup_steps
        # Dropout is disabled in every model; eval mode keeps anything else mode-dependent (MoE router
        # jitter, for one) identical between rollout and update, so rho_t starts at exactly 1.
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
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
                entropy = masked_mean(entropy, mask)
                terms = {"policy_loss": pg_loss, "entropy": entropy, "clip_fraction": clip_fraction,
                         "approx_kl": approx_kl}
                loss = (0.0 if warming_up else 1.0) * (pg_loss - config.entropy_coef * entropy)
                if critic:
                    terms["value_loss"], terms["value_clip_fraction"] = value_loss(
                        values, rollout.values[idx], rollout.returns[idx], mask, config.clip_range_value)
                    loss = loss + config.vf_coef * terms["value_loss"]
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"PPO loss became {loss.item()} at step {self.global_step + 1}; "
                                           "lower the learning rate or check the reward functions")
                self.accelerator.backward(loss)
                if warming_up:
                    for param in self.policy_params:
                        param.grad = None
                terms.update(self.clip_gradients(warming_up))
                self.optimizer.step()
                self.optimizer.zero_grad()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
                epoch_kl += approx_kl.detach()
                updates += 1
            epochs += 1
            minibatches = config.rollout_batch_size // config.mini_batch_size
            # the same decision on every rank: the epoch's approximate KL averaged over all of them
            if config.target_kl is not None and float(self.all_reduce_sum(epoch_kl)) / (
                    minibatches * self.accelerator.num_processes) > config.target_kl:
                break
        self.scheduler.step()
        names = list(sums)
        means = self.all_reduce_sum(torch.stack([sums[n] for n in names]) / updates) / self.accelerator.num_processes
        metrics = dict(zip(names, means.tolist()))
        if critic:
            metrics["explained_variance"] = explained_variance(rollout.values, rollout.returns, rollout.mask)
            metrics["critic_learning_rate"] = self.optimizer.param_groups[1]["lr"]
            metrics["critic_warmup"] = float(warming_up)
        metrics["ppo_epochs"] = epochs
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/optimisation_s"] = time.time() - started
        return metrics

    def clip_gradients(self, warming_up: bool) -> dict[str, torch.Tensor]:
        """Clip the policy's and the critic's gradients each to its own norm; returns the norms before clipping.

        Under DeepSpeed the engine clips (one norm over all parameters) and no norm is returned here.
        """
        norms = {}
        for name, params, max_norm in (("policy", self.policy_params, self.config.max_grad_norm),
                                       ("critic", self.critic_params, self.config.critic_max_grad_norm)):
            if not params or (name == "policy" and warming_up):
                continue
            norm = self.accelerator.clip_grad_norm_(params, max_norm or float("inf"))
            if norm is not None:
                norms[f"grad_norm/{name}"] = torch.as_tensor(norm, device=self.accelerator.device).float()
        return norms

    # -------------------------------------------------------------- across processes
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def gather_mean(self, x: torch.Tensor) -> float:
        return float(self.accelerator.gather(x.detach().float().reshape(-1)).mean())

    def gather_max(self, x: torch.Tensor) -> float:
        return float(self.accelerator.gather(x.detach().float().reshape(-1)).max())
