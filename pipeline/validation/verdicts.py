"""Remembered `pipeline validate` verdicts: a recipe that passed is not checked again until something it
depends on changes.

Most of validate's time is importing what its checks use (torch, transformers, TRL, datasets: ~10 s on a
2-core CPU), not the checks themselves (~1 s). A passing verdict is stored under a key made of everything the
checks read: the recipe after `--set`, every local file and folder it names (path, size, modification time),
the Hugging Face cache entries of the Hub ids it names, the source files of `module:function` references, the
installed library versions, this package's own code, the launch and Hub environment variables and the hardware.
The same key later replays the stored output without importing any of it. A failing recipe is never stored:
it is checked in full every time. `pipeline validate --no-cache` always checks in full.

Secrets stay out: environment variables whose names hold TOKEN, KEY, SECRET or PASSWORD are not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config.paths import FUNCTION_REF, module_source, resolve_local, strings
from pipeline.runtime.cpu import cpu_has_amx
from pipeline.runtime.files import read_json, write_json

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub",
             "deepspeed", "bitsandbytes", "gguf", "jinja2", "pyyaml", "requests", "aiohttp")
ENV_PREFIXES = ("ACCELERATE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "PIPELINE_", "DS_", "CUDA_", "WORLD_SIZE",
                "RANK", "LOCAL_RANK", "XDG_CACHE_HOME")
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
HUB_REF = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_ENTRIES = 5000  # files listed per folder: a bigger folder is keyed by its first entries and its own mtime


def cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"


def _listing(path: Path) -> list[Any]:
    """(name, size, mtime) of a file, or of every file under a folder (up to MAX_ENTRIES)."""
    stat = path.stat()
    if not path.is_dir():
        return [[str(path), stat.st_size, stat.st_mtime_ns]]
    found: list[Any] = [[str(path), "dir", stat.st_mtime_ns]]
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if len(found) > MAX_ENTRIES:
                return found
            file = Path(folder) / name
            try:
                file_stat = file.stat()
            except OSError:  # a broken link: its name still counts
                found.append([str(file), None, None])
                continue
            found.append([str(file.relative_to(path)), file_stat.st_size, file_stat.st_mtime_ns])
    return found


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def referenced_files(data: dict[str, Any], recipe_path: Path) -> dict[str, Any]:
    """What every string of the recipe points at on this machine: a local file or folder (listed), a Hub id's
    cache entry (listed), a `module:function`'s source file (listed), or nothing."""
    found: dict[str, Any] = {}
    hub = _hub_cache()
    for text in sorted(set(strings(data))):
        if not text or len(text) > 4096 or "\n" in text:
            continue
        local = resolve_local(text, recipe_path)
        entry: dict[str, Any] = {}
        if local is not None:
            entry["local"] = _listing(local)
        if HUB_REF.match(text) and local is None:
            for kind in ("models", "datasets"):
                cached = hub / f"{kind}--{text.replace('/', '--')}"
                if cached.exists():
                    entry[kind] = _listing(cached)
        function = FUNCTION_REF.match(text)
        if function:
            source = module_source(function.group(1))
            entry["source"] = _listing(source) if source else None
        if entry:
            found[text] = entry
    return found


def _package_digest() -> str:
    """sha256 of this package's source files: a changed check is a changed verdict."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _environment() -> dict[str, str]:
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith(ENV_PREFIXES) and not any(word in name.upper() for word in SECRET_WORDS)}


def _hardware() -> dict[str, Any]:
    """What the checks' precision and device choices read, without importing torch."""
    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "amx": cpu_has_amx(),
            "nvidia": sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))}


def verdict_key(recipe_path: Path, data: dict[str, Any], mode: dict[str, Any]) -> str:
    """The key of a recipe's verdict: see the module docstring. `mode`: the command's own options."""
    recipe_path = recipe_path.resolve()
    key = {"recipe": str(recipe_path), "data": data, "mode": mode, "cwd": str(Path.cwd()),
           "files": referenced_files(data, recipe_path), "libraries": _versions(), "code": _package_digest(),
           "environment": _environment(), "hardware": _hardware()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def remembered(key: str) -> dict[str, Any] | None:
    """A stored passing verdict ({"output", "warnings", "checked"}) for this key, or None."""
    return read_json(cache_dir() / "validated" / f"{key}.json")


def remember(key: str, verdict: dict[str, Any]) -> None:
    """Store a passing verdict; a cache that cannot be written is only a slower next validate."""
    folder = cache_dir() / "validated"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{key}.json", verdict)
    except OSError:
        pass
