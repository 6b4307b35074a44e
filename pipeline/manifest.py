"""`manifest.json`: everything needed to rerun a run and get the same numbers."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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
    import torch

    info: dict[str, object] = {"platform": platform.platform(), "python": sys.version.split()[0],
                               "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def launch() -> dict[str, object]:
    """How the run was launched: process count and the launcher's settings (accelerate passes its config
    to each process as ACCELERATE_*/FSDP_* variables; the launch command itself is not visible here)."""
    from accelerate import PartialState

    from pipeline.distributed import launch_record

    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("ACCELERATE_", "FSDP_", "DS_"))}
    return {**launch_record(PartialState()), "environment": settings}


def launch_history(previous: dict | None, current: dict[str, object]) -> list[dict[str, object]]:
    """Every launch into a run directory, oldest first: the earlier manifest's list with this launch's entry
    (named by its `started` time) added or brought up to date. A manifest from before the history
    existed contributes its single `launch` record."""
    previous = previous or {}
    history = previous.get("launches")
    if history is None:
        history = [previous["launch"]] if "launch" in previous else []
    return [entry for entry in history if entry.get("started") != current["started"]] + [current]


def write_manifest(run_dir: Path, recipe, fingerprints: dict[str, str], timings: dict[str, float],
                   started: str) -> None:
    """Write manifest.json. `timings` are the stages this launch ran; `stage_seconds` also has those an earlier
    launch ran (skipped now), from their result.json. `launches` is the history of launches into the run
    directory, `launch` the latest."""
    from pipeline.runner import input_files, read_json, write_json

    inputs: dict[str, str] = {}
    for stage in recipe.stages:
        inputs.update(input_files(recipe, stage))
    where = recipe.path.resolve().parent if recipe.path else Path.cwd()
    previous = read_json(run_dir / "manifest.json") or {}
    seconds = {}  # of every stage whose result stands, whichever launch ran it
    for name, expected in fingerprints.items():
        result = read_json(run_dir / name / "result.json") or {}
        if result.get("fingerprint") == expected and "seconds" in result:
            seconds[name] = result["seconds"]
    current = {"started": started, "argv": sys.argv, **launch(), "stage_seconds": dict(timings)}
    write_json(run_dir / "manifest.json", {
        "recipe": recipe.raw, "recipe_path": str(recipe.path), "seed": recipe.seed,
        "argv": sys.argv, "packages": package_versions(), "git": git_state(where), "hardware": hardware(),
        "launch": current, "launches": launch_history(previous, current),
        "inputs": inputs, "stage_fingerprints": fingerprints, "stage_seconds": {**seconds, **timings},
    })
