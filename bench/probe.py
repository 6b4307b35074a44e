"""Instruments one child process so both paths are measured by the same code.

The timed region is the training loop: inside `Trainer.train`, from the first `on_epoch_begin` to
`on_train_end`, which leaves out the evaluation `eval_on_start` runs before it (the pipeline's
starting-model metrics: extra work, not overhead); and all of `PPOTrainer.train`. Training tokens
are the non-padding tokens entering the trained model's embedding with gradients on (so
generation, reference and evaluation forwards are not counted); generated tokens are the
non-padding tokens `generate` returns past the prompt, inside the loop.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationMixin, Trainer, TrainerCallback

from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.models.loading import compute_dtype


@dataclass
class Measurement:
    """What one child process reports about its training loop."""

    loop_s: float = 0.0
    loop_cpu_s: float = 0.0  # CPU time of this process over the loop: what other processes' load disturbs least
    train_tokens: int = 0
    generated_tokens: int = 0
    generation_s: float = 0.0
    num_parameters: int = 0
    trainable_parameters: int = 0
    attn_implementation: str = ""
    partner_wait_s: float = 0.0  # time spent waiting for a concurrent partner's loop to start
    # Bytes held by the training state after the first optimizer step, counted from the tensors themselves
    # (what peak RSS mixes with activations, the allocator's cache and the libraries): parameters as stored
    # (4-bit ones packed), one gradient per trainable parameter, and the optimizer's state.
    weights_mb: float = 0.0
    gradients_mb: float = 0.0
    optimizer_state_mb: float = 0.0


class Probe:
    """Times the training loop and counts its tokens, by the same hooks on both paths."""

    def __init__(self, sync: dict[str, str] | None = None):
        self.sync = sync  # {"dir", "me", "partner"}: start the loop together with a concurrent partner process
        self.result = Measurement()
        self.started: float | None = None
        self.started_cpu = 0.0
        self.pad_id: int | None = None

    @property
    def in_loop(self) -> bool:
        return self.started is not None

    def begin(self, model, pad_id: int | None) -> None:
        self.pad_id = pad_id
        self.result.num_parameters = sum(p.numel() for p in model.parameters())
        self.result.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.result.attn_implementation = str(getattr(model.config, "_attn_implementation", ""))
        model.get_input_embeddings().register_forward_pre_hook(self.count_training_tokens)
        if self.sync:  # the two paths set up at different speeds; their loops must overlap to share conditions
            Path(self.sync["dir"], self.sync["me"]).touch()
            waiting = time.perf_counter()
            while not Path(self.sync["dir"], self.sync["partner"]).exists() and time.perf_counter() < waiting + 600:
                time.sleep(0.005)
            self.result.partner_wait_s = time.perf_counter() - waiting
        self.started, self.started_cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.result.loop_s += time.perf_counter() - self.started
        self.result.loop_cpu_s += time.process_time() - self.started_cpu
        self.started = None

    def non_pad(self, ids: torch.Tensor) -> int:
        return int(ids.numel() if self.pad_id is None else (ids != self.pad_id).sum())

    def count_training_tokens(self, module, inputs) -> None:
        if self.in_loop and torch.is_grad_enabled() and inputs:
            self.result.train_tokens += self.non_pad(inputs[0])

    def count_training_state(self, model, optimizer) -> None:
        mb = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 2**20  # noqa: E731
        self.result.weights_mb = mb(model.parameters())
        self.result.gradients_mb = mb(p for p in model.parameters() if p.requires_grad)
        self.result.optimizer_state_mb = mb(t for state in optimizer.state.values() for t in state.values()
                                            if isinstance(t, torch.Tensor))

    def install(self) -> None:
        """Wrap `Trainer.train`, `PPOTrainer.train` and `generate` (TRL's trainers inherit the first)."""

        probe = self

        class LoopTimer(TrainerCallback):
            def on_epoch_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
                if not probe.in_loop:  # the first epoch
                    probe.begin(model, getattr(processing_class, "pad_token_id", None))

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                if not probe.result.weights_mb and model is not None and optimizer is not None:
                    probe.count_training_state(model, optimizer)

            def on_train_end(self, args, state, control, **kwargs):
                probe.end()

        trainer_train, ppo_train, generate = Trainer.train, PPOTrainer.train, GenerationMixin.generate

        def train(trainer, *args, **kwargs):
            trainer.add_callback(LoopTimer())
            return trainer_train(trainer, *args, **kwargs)

        def train_ppo(trainer, *args, **kwargs):
            probe.begin(trainer.unwrapped.policy, trainer.tokenizer.pad_token_id)
            try:
                return ppo_train(trainer, *args, **kwargs)
            finally:
                probe.end()

        def timed_generate(model, *args, **kwargs):
            started = time.perf_counter()
            output = generate(model, *args, **kwargs)
            if probe.in_loop:
                probe.result.generation_s += time.perf_counter() - started
                sequences = output if isinstance(output, torch.Tensor) else output.sequences
                prompt = kwargs.get("input_ids", args[0] if args else None)
                probe.result.generated_tokens += probe.non_pad(sequences[:, prompt.shape[1]:])
            return output

        Trainer.train, PPOTrainer.train, GenerationMixin.generate = train, train_ppo, timed_generate

    def report(self) -> dict:
        return {**asdict(self.result), "peak_mem_mb": peak_memory_mb(), "threads": torch.get_num_threads()}


def peak_memory_mb() -> float:
    """This process's peak: GPU memory allocated by torch on CUDA, else the resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mb() -> float:
    """Memory in use now (the baseline a peak is read against): resident set size, or CUDA allocated."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_flops(seconds: float = 2.0, dtype: torch.dtype | None = None) -> float:
    """Measured peak FLOP/s of a square matmul in `dtype` (default: the compute dtype, fp32 on CPU and bf16 on GPU):
    the best of many."""

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 1024
    a, b = (torch.randn(n, n, dtype=dtype or compute_dtype(), device="cuda" if cuda else "cpu") for _ in range(2))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best
