"""Keeping the processes of one `accelerate launch` in step.

The main process decides (fingerprints, which stages to skip) and does the run's file work;
the other ranks wait for it inside one broadcast that carries its answer, or its failure, so
every rank acts on the same decision and a main-only failure stops every rank with its message.

A failure inside a stage's training is different: the other ranks may be inside a collective
(an all-reduce, a gather) that the failed rank will never join. Any collective it starts instead,
such as a status gather, mismatches theirs and hangs (measured with gloo: an all-reduce facing an
all-gather still waited after two minutes; the default timeout is 30). So such a rank raises at
once; its process exits non-zero, and the launcher (torchrun, under `accelerate launch`) stops
the other ranks and names the one that failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from pipeline.runtime.process import UserError

T = TypeVar("T")
R = TypeVar("R")


class MainProcessFailed(UserError, RuntimeError):
    """Raised on the other ranks when work done by the main process alone failed."""


class LaunchChanged(UserError, RuntimeError):
    """A stage's checkpoints were made under another launch (process count, distributed type, ZeRO stage)."""


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage of this launch, from what `accelerate launch` hands each process
    (ACCELERATE_DEEPSPEED_ZERO_STAGE, or the stage in its DeepSpeed config file); None without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config_file:
        stage = json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage")
    return None if stage in (None, "auto") else int(stage)


def launch_record(state) -> dict[str, Any]:
    """How this launch runs stages: process count, accelerate's distributed type, ZeRO stage (or None).

    `state` is accelerate's `PartialState`. FSDP asked for on CPU processes shows as what runs: DDP
    (MULTI_CPU), since accelerate enables FSDP only on GPUs.
    """
    return {"num_processes": state.num_processes, "distributed_type": state.distributed_type.value,
            "zero_stage": zero_stage()}


def launch_label(record: dict[str, Any] | None) -> str:
    """A launch record in words, for logs and the report: "2 processes, DEEPSPEED ZeRO-3", "1 process"."""
    if not record:
        return "not recorded"
    n, kind = record.get("num_processes", 1), record.get("distributed_type")
    label = f"{n} process{'es' if n != 1 else ''}" + (f", {kind}" if kind not in (None, "NO") else "")
    return label + (f" ZeRO-{record['zero_stage']}" if record.get("zero_stage") is not None else "")


def on_main(state, step: Callable[[], T], what: str) -> T:
    """`step()` run on the main process only; its result, or its failure, on every rank.

    `state` is accelerate's `PartialState`. The broadcast is also the barrier between the main
    process's work and whatever every rank does next.
    """
    if state.num_processes == 1:
        return step()

    result, failure = None, None
    if state.is_main_process:
        try:
            result = step()
        except Exception as err:  # told to the other ranks below, then raised here as it was
            failure = err
    message = f"{type(failure).__name__}: {failure}" if failure is not None else None
    from accelerate.utils import broadcast_object_list  # lazy: this module's launch helpers are read by light commands

    result, message = broadcast_object_list([result, message], from_process=0)
    if failure is not None:
        raise failure
    if message is not None:
        raise MainProcessFailed(f"{what} failed on the main process: {message}")
    return result


def map_shards(items: list[T], work: Callable[[list[T]], list[R]]) -> list[R]:
    """`work(items)` computed a share per process: each rank runs `work` on its contiguous share of `items`
    (accelerate's `split_between_processes`) and every rank gets back all the results, in item order.

    `work` returns one result per item and must not start collectives of its own: the shares differ in
    size, so ranks would call them a different number of times (under ZeRO-3, generate inside
    `trl`'s `unwrap_model_for_generation`, which gathers the weights once).
    """
    from accelerate import PartialState  # lazy: see on_main
    from accelerate.utils import gather_object  # lazy: see on_main

    state = PartialState()
    if state.num_processes == 1:
        return work(items)
    with state.split_between_processes(items) as share:
        mine = work(list(share))
        if len(mine) != len(share):
            raise ValueError(f"map_shards: {len(mine)} results for {len(share)} items")
    return gather_object(mine)


def summed_over_processes(counts: dict[str, float]) -> dict[str, float]:
    """Each count added up over the processes of the launch (each counted its own share of the work); every
    rank must call it, at the same point."""
    from accelerate import PartialState  # lazy: see on_main
    from accelerate.utils import gather_object  # lazy: see on_main

    state = PartialState()
    if state.num_processes == 1:
        return counts
    every = gather_object([counts])
    return {key: float(sum(share[key] for share in every)) for key in counts}


def forget_zero3_init() -> None:
    """Start a stage with no ZeRO-3 model-loading context left by an earlier stage's Trainer.

    A Trainer under DeepSpeed registers its config with transformers (a global weak reference to an
    `HfDeepSpeedConfig`), and accelerate's process-wide `AcceleratorState` keeps that object alive after
    the Trainer is gone. `is_deepspeed_zero3_enabled()` then stays true for the rest of the launch, and
    every later `from_pretrained` builds its model inside `deepspeed.zero.Init`: each rank holds empty
    placeholders that only a DeepSpeed engine can use, so a stage that calls the model directly (eval,
    generate, a held-out check before training) fails with "'weight' must be 2-D". Each stage loads its
    models as the first stage of a launch does; a training stage's own config registers ZeRO-3 again.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # lazy: see on_main

    unset_hf_deepspeed_config()


