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

import os
from typing import Callable, TypeVar

T = TypeVar("T")


class MainProcessFailed(RuntimeError):
    """Raised on the other ranks when work done by the main process alone failed."""


def on_main(state, step: Callable[[], T], what: str) -> T:
    """`step()` run on the main process only; its result, or its failure, on every rank.

    `state` is accelerate's `PartialState`. The broadcast is also the barrier between the main
    process's work and whatever every rank does next.
    """
    if state.num_processes == 1:
        return step()
    from accelerate.utils import broadcast_object_list

    result, failure = None, None
    if state.is_main_process:
        try:
            result = step()
        except Exception as err:  # told to the other ranks below, then raised here as it was
            failure = err
    message = f"{type(failure).__name__}: {failure}" if failure is not None else None
    result, message = broadcast_object_list([result, message], from_process=0)
    if failure is not None:
        raise failure
    if message is not None:
        raise MainProcessFailed(f"{what} failed on the main process: {message}")
    return result


def rank_label() -> str:
    """"[rank N] " under a multi-process launch (the launchers set RANK and WORLD_SIZE), else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""
