"""What a run executes on: package versions, the git commit, the hardware, and content digests of files."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate",
            "tokenizers", "bitsandbytes", "deepspeed", "huggingface_hub", "safetensors")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes; for a folder, of its files' names and digests (model folders hashed once)."""
    if path.is_file():
        stat = path.stat()
        return _bytes_digest(path.resolve(), stat.st_mtime_ns, stat.st_size)
    listing = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{p.relative_to(path)}:{file_digest(p)}\n" for p in listing).encode()).hexdigest()

@functools.lru_cache(maxsize=4096)
def _bytes_digest(path: Path, mtime_ns: int, size: int) -> str:
    """A file's sha256, computed once per content version: the runner's fingerprints and the manifest both
    ask for every input, and a model folder is gigabytes. A file written since has a new mtime, so a new key."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions

def git_state(where: Path) -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")  # empty outside a repository (git prints its error to stderr)
        if not commit:
            return {"commit": None, "dirty": None}
        return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}

def hardware() -> dict[str, object]:
    info: dict[str, object] = {"platform": platform.platform(), "python": sys.version.split()[0],
                               "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
