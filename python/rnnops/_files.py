"""Files that other processes may read while they are written: the autotune cache, the Triton
compile checks' stored ptxas reports, the peers' restored autotuning choices."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never
    part of it: a uniquely named temporary file in the same directory (concurrent writers never
    share one), flushed to disk, then renamed over ``path``. Raises OSError as writing does (the
    temporary file removed)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
