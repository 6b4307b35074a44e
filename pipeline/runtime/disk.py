"""One copy of each large file a run holds, and the disk each stage uses.

Stages write whole models: a merged or dequantized base in `<stage>/base/`, full weights in `<stage>/output/`.
Stages that start from the same adapter each merge it into the same weights (SmolLM2-135M: 517 MB in fp32
each); `share_identical` hard-links such files to one copy. Only published folders are linked: nothing writes
into them in place (a stage that runs again replaces them whole), so a change through one name never shows
through another.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

PUBLISHED = ("base", "output")  # a stage's folders that are written once, then only read or replaced
MIN_BYTES = 1 << 20  # smaller files are not worth hashing


def published_files(stage_dir: Path) -> Iterator[Path]:
    for folder in PUBLISHED:
        root = stage_dir / folder
        if root.is_dir():
            yield from (p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink())


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def share_identical(run_dir: Path, stage_dir: Path) -> int:
    """Hard-link each large published file of `stage_dir` that another stage of the run already holds, byte for
    byte, to that copy; returns the bytes freed. Only files of the same size are hashed."""
    others: dict[int, list[Path]] = {}
    for other in sorted(p for p in run_dir.iterdir() if p.is_dir() and p != stage_dir):
        for path in published_files(other):
            others.setdefault(path.stat().st_size, []).append(path)
    freed = 0
    digests: dict[Path, str] = {}
    for path in published_files(stage_dir):
        size = path.stat().st_size
        if size < MIN_BYTES:
            continue
        for candidate in others.get(size, []):
            if os.path.samefile(candidate, path):
                break
            if digests.setdefault(candidate, content_digest(candidate)) != digests.setdefault(path, content_digest(path)):
                continue
            temporary = path.with_name(f".{path.name}.link")
            try:
                os.link(candidate, temporary)
            except OSError:  # a filesystem without hard links: keep the copy
                break
            os.replace(temporary, path)
            freed += size
            break
    return freed


def disk_use(run_dir: Path, stages: list[str]) -> dict[str, tuple[int, int]]:
    """(bytes of its own, bytes shared with an earlier stage) of each stage's folder, in `stages` order: a file
    hard-linked into several stages counts once, for the first of them."""
    seen: set[tuple[int, int]] = set()
    use = {}
    for name in stages:
        own = shared = 0
        folder = run_dir / name
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if not path.is_file() or path.is_symlink():
                continue
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) in seen:
                shared += stat.st_size
            else:
                seen.add((stat.st_dev, stat.st_ino))
                own += stat.st_size
        use[name] = (own, shared)
    return use


def megabytes(count: int) -> str:
    return f"{count / 1e6:.0f} MB" if count >= 1e6 else f"{count / 1e6:.2f} MB"
