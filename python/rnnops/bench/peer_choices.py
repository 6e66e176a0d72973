"""Peers' autotuning choices, carried from one GPU run to the next in the results files.

A Triton autotuner created with ``cache_results`` (flash-linear-attention turns it on for its
kernels) stores the timings of its configurations, per tuning key, in Triton's cache directory
as ``<directory>/<hash>/<kernel>.autotune.json``, and a later process that finds the file takes
the fastest configuration from it without timing any (it compiles only that one). The hash
covers Triton (its sources and its ptxas), the target architecture, the kernel's source, the
environment, the tuning key and the list of configurations, so a file only ever answers the
question it was timed for; another Triton, peer version or GPU architecture hashes elsewhere and
tunes afresh.

A GPU machine starts with an empty cache, so every session compiled every configuration of
every peer kernel again (tens a kernel, about a second each: minutes a case, most of a short
bench budget). The bench therefore writes the choices it finds in the cache into results.json
(``peer_autotune``: {"<hash>/<kernel>.autotune.json": the file's JSON}) and, with
``--peer-choices-from``, restores those of earlier results files before it runs. The timings in
a restored file were measured by the peer's own autotuner on an idle GPU of the same model, as
its users' persistent cache would hold them.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .._files import write_atomically

# <hash>/<kernel>.autotune.json: one folder level below the cache directory, no other characters
_NAME = re.compile(r"[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+\.autotune\.json")
SUFFIX = ".autotune.json"


def triton_cache_dir() -> Path:
    """Triton's cache directory (``TRITON_CACHE_DIR``, else ~/.triton/cache)."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):  # Triton before its knobs (3.4)
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def collect(directory: Path | None = None) -> dict[str, dict]:
    """Every stored autotuning result under ``directory`` (default: Triton's cache), by name
    relative to it; unreadable files are left out."""
    directory = triton_cache_dir() if directory is None else directory
    choices = {}
    for path in sorted(directory.glob(f"*/*{SUFFIX}")):
        try:
            choices[f"{path.parent.name}/{path.name}"] = json.loads(path.read_text())
        except (OSError, ValueError):  # a file another process is writing, or a broken one
            continue
    return choices


def check(choices: dict) -> None:
    """ValueError unless ``choices`` maps names like "<hash>/<kernel>.autotune.json" to the JSON
    objects Triton writes (with "configs_timings"); a results file's content, so a wrong type
    is a malformed file (ValueError) rather than a caller's mistake."""
    if not isinstance(choices, dict):
        raise ValueError(  # noqa: TRY004 (malformed content)
            f"peer_autotune must be an object of stored autotuning results, got {type(choices).__name__}")
    for name, content in choices.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"peer_autotune entry {name!r} is not named <hash>/<kernel>{SUFFIX}")
        if not isinstance(content, dict) or not isinstance(content.get("configs_timings"), list):
            raise ValueError(  # noqa: TRY004 (malformed content)
                f"peer_autotune entry {name!r} holds no configs_timings list")


def from_results(paths: Iterable[Path]) -> dict[str, dict]:
    """The ``peer_autotune`` entries of the results files ``paths``, later files' entries over
    earlier ones' (ValueError naming a file that is not a results file with valid entries)."""
    merged = {}
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable results file ({error})") from None
        choices = results.get("peer_autotune", {}) if isinstance(results, dict) else None
        try:
            check(choices)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        merged.update(choices)
    return merged


def restore(choices: dict[str, dict], directory: Path | None = None) -> int:
    """Write ``choices`` (checked first) into ``directory`` (default: Triton's cache) where no
    file of that name exists yet; returns how many were written."""
    check(choices)
    directory = triton_cache_dir() if directory is None else directory
    written = 0
    for name, content in choices.items():
        path = directory / name
        if path.exists():  # this machine's own result stays
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(content))
        written += 1
    return written
