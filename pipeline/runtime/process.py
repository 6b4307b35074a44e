"""What every `pipeline` command sets up in its own process before it works; importing the package changes nothing."""

from __future__ import annotations

import logging
import os
import warnings

from pipeline.runtime.memory import use_huge_pages


class UserError(Exception):
    """An error whose message says everything (bad data, a diverged loss, a `health.fail_on` finding, a failure the
    main process reported, a run that cannot go on as asked): the command prints it, with no traceback."""


def rank_label() -> str:
    """"[rank N] " under a multi-process launch (the launchers set RANK and WORLD_SIZE), else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def prepare_process() -> None:
    """Large CPU tensors on transparent huge pages (`use_huge_pages`: PyTorch reads the switch at its first large
    allocation), and library messages a user cannot act on silenced. The command line runs this first, before it
    imports the libraries its command needs (some of them warn on import)."""
    use_huge_pages()
    # bitsandbytes' CPU backend warns on import, so on every run, that it could not fetch an optional faster
    # 4-bit kernel from the Hub; its own fallback is correct, and the pipeline runs offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # TRL 1.16's generation helpers (trl/models/utils.py) read transformers 5's deprecated
    # `model.is_gradient_checkpointing`.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # TRL deprecates DPO's `truncation_mode: keep_end` for its 2.0; the dpo stage chooses it on purpose (the
    # compared replies are never what is cut), and pyproject pins trl<2.
    warnings.filterwarnings("ignore", message="The `'keep_end'` truncation mode is deprecated", category=FutureWarning)
    # accelerate's save_state drops the tied copy of the embedding (lm_head) from a PPO checkpoint and asks
    # to check that reloading works: tests/test_ppo.py resumes a killed run to the same numbers as an unbroken one.
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
    # DeepSpeed, when installed, logs on import in every process of a CPU machine that it chose the CPU.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    # `datasets` draws a progress bar for every map and filter (hundreds per run); the run's own progress lines
    # (pipeline.runtime.progress) say where it is. HF_DATASETS_DISABLE_PROGRESS_BARS=0 brings the bars back.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when `datasets` is imported
    # transformers 5.25 (whose dependencies now include `kernels`) swaps layers for kernels fetched from the Hub
    # when a model is loaded on a GPU and trains: code downloaded at run time that no recipe asked for (as
    # trust_remote_code stays off unless asked), and on an offline H200 it failed the sft stage (2026-12-04).
    # USE_HUB_KERNELS=1 turns them back on.
    os.environ.setdefault("USE_HUB_KERNELS", "0")
