"""Host memory while training on CPU: freed activations must leave the process, not just the tensors.

glibc's malloc serves allocations below its mmap threshold (which grows by itself up to 32 MiB) from its
heap, and keeps what is freed there. Training a real model on CPU allocates and frees tensors of 1-32 MiB
by the thousand (activations, their gradients, recomputed layers), and the heap fragments. Measured on one
LoRA step of SmolLM2-135M at 2 x 512 tokens with activation checkpointing (one thread): at most 0.45 GB of
live tensors, yet a 2.45 GB peak RSS (weights and libraries 1.0 GB); the `sft` stage around such steps
peaked at 2.66 GB. Two remedies, measured on the same step and stage:

- PyTorch's transparent-huge-page allocation (`THP_MEM_ALLOC_ENABLE=1`: tensors of 2 MB and more
  page-aligned and `madvise`d to huge pages): step 1.86 GB, stage 1.75 GB, at no measurable cost in time
  (13.5 s per step against 12.9 s; without checkpointing 9.7-10 s either way). The pipeline turns it on
  for every command (`use_huge_pages`, from `pipeline/__init__.py`).
- Allocations of 1 MiB and more in their own mappings, unmapped when freed (`freed_memory_returned`):
  step 1.41 GB, stage 1.75 GB, but each such tensor's pages are faulted in afresh: 19.1 s per step.
  Where huge pages are off (a kernel without them, or `THP_MEM_ALLOC_ENABLE=0`), a stage that turned on
  activation checkpointing, so chose memory over speed, gets this instead (`training.train`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20  # the smallest activation of a real model is ~1 MiB (SmolLM2-135M: 1024 tokens x 192 KV dims)
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # the ceiling glibc's own sliding threshold grows to, on 64-bit systems
THP_SWITCH = "/sys/kernel/mm/transparent_hugepage/enabled"


def use_huge_pages() -> None:
    """Ask PyTorch to back CPU tensors of 2 MB and more with transparent huge pages (`madvise`), on Linux
    kernels that offer them, unless the user chose (`THP_MEM_ALLOC_ENABLE` set). PyTorch reads the switch
    once, at its first such allocation, so this runs before anything imports torch (`pipeline/__init__.py`)."""
    try:
        with open(THP_SWITCH) as f:
            offered = "[never]" not in f.read()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return
    if offered:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def huge_pages_on() -> bool:
    """Whether PyTorch puts large CPU tensors on transparent huge pages in this process.

    Asked for is not enough: PyTorch reads the switch at its first allocation, so a process that made a
    tensor before importing the pipeline has them off. Its huge-page tensors are page-aligned, where its
    others are aligned to 64 bytes only (glibc puts a mapped one 64 bytes into its page).
    """
    if os.environ.get("THP_MEM_ALLOC_ENABLE", "").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    import torch  # lazy: this module runs before torch is first imported (`use_huge_pages`), and must not import it

    return all(torch.empty(2 << 20, dtype=torch.uint8).data_ptr() % 4096 == 0 for _ in range(2))


def glibc():
    """The process's C library if it is glibc (`mallopt`, `malloc_trim`), else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle for the process itself
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def user_tuned() -> bool:
    """Whether the user set glibc's mmap threshold (environment), which is then left alone."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


@contextlib.contextmanager
def freed_memory_returned(enabled: bool = True) -> Iterator[bool]:
    """While inside, allocations of 1 MiB and more get their own mapping, returned to the OS when freed.

    Entering also hands back the heap's free pages (what loading left there); leaving fixes the threshold
    at glibc's own ceiling (its default threshold slides up to it and cannot be restored once set).
    Yields whether it took effect: not when `enabled` is false, off glibc, or where the user tuned it.
    """
    libc = glibc() if enabled and not user_tuned() else None
    if libc is None:
        yield False
        return
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
