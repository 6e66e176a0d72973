"""The GPU suite's compiled kernels, carried from one GPU run to the next.

A GPU machine starts bare, so every run of ``bench/gpu_suite.sh`` compiled every Triton kernel
(ours and the peers') and every NVRTC module again, about a second each: on 2026-11-27 (H200)
most of the GPU tests' 190 s and 76 s of the bench's 149 s, which then reached 2 of its 9 cases.
Both compilers keep their products on disk under keys that cover everything deciding them
(Triton: its own sources and ptxas, the target architecture, the kernel's source and first line,
its specialisation and options; cupy: the code text, the options, NVRTC's version and the
architecture). A product restored on another machine with the same toolchain and GPU
architecture is therefore exactly what that machine would compile, and a kernel changed since
hashes elsewhere and compiles afresh: a restored cache can save time, never change a result.

:func:`pack` writes the loadable part of both caches into one xz tarball: of Triton's, each key
folder's JSON files (the kernel's metadata, the group file naming its products) and cubins, not
autotuners' stored results (an H100's and an H200's hash alike, so a peer would run on one with
the choices timed on the other: rnnops.bench.peer_choices carries those per GPU model), nor the
intermediate forms (ttir, ttgir, llir, ptx and source: 80% of the bytes; a cache hit reads the
files its group file names, and the launch needs only the metadata and the cubin); of cupy's,
every file. Entries go in until the archive reaches its size limit: first those the run compiled
or read (a file's modification or access time after ``since``), cupy's modules before Triton's
kernels (NVRTC takes seconds to minutes a module, Triton about a second a kernel), then the rest;
within each group the most recently used first. :func:`restore` unpacks one into this machine's
caches without overwriting anything there, Triton's group files naming the restored files in
their new folder, each file's access time set to its modification time so that the file system
(``relatime``) records its first read and the next pack can tell used entries from unused ones.

``python -m rnnops.bench.compile_cache restore FILE`` and ``pack FILE --since EPOCH``: the suite
restores ``.whl/compile-cache.tar.xz`` (carried with the peers' wheels) before anything compiles,
and packs ``$OUT/compile-cache.tar.xz`` at its end; copy that to ``.whl/`` for the next run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .peer_choices import SUFFIX as AUTOTUNED
from .peer_choices import triton_cache_dir

ARCHIVE_LIMIT_MIB = 15  # the device tool returns files up to 16 MiB; .whl carries it beside ~43 MiB of wheels
MANIFEST = "rnnops-compile-cache.json"
_TRITON_KEPT = (".json", ".cubin")
_GROUP_PREFIX = "__grp__"
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MEMBER = re.compile(rf"(?P<kind>triton)/(?P<key>{_NAME})/(?P<file>{_NAME})|(?P<cupy>cupy)/(?P<cupy_file>{_NAME})")
_PRESET = 1  # about 6:1 on cubins at 20 MB/s a core; preset 6 gains 20% in size for 9x the time
_SLACK = 1 << 20  # compressed bytes the encoder may still hold when an entry is admitted


def cupy_cache_dir() -> Path:
    """cupy's kernel cache (``CUPY_CACHE_DIR``, else ~/.cupy/kernel_cache)."""
    return Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")


@dataclass(frozen=True)
class _Entry:
    """One cached product: a Triton key folder's kept files or one cupy file."""

    kind: str  # "triton" | "cupy"
    files: tuple[tuple[Path, str], ...]  # (path, name in the archive)
    written: float  # newest modification time
    used: float  # newest of modification and access times


def _entry(kind: str, files: list[tuple[Path, str]]) -> _Entry | None:
    stats = []
    for path, _ in files:
        try:
            stats.append(path.stat())
        except OSError:  # removed meanwhile
            return None
    if not stats:
        return None
    written = max(s.st_mtime for s in stats)
    return _Entry(kind, tuple(files), written, max(written, max(s.st_atime for s in stats)))


def _entries(triton_dir: Path, cupy_dir: Path, since: float) -> list[_Entry]:
    """Every packable entry of both caches (stat before anything reads them) in the order they are
    packed (module docstring)."""
    entries = []
    if triton_dir.is_dir():
        for folder in sorted(triton_dir.iterdir()):
            if folder.is_dir() and re.fullmatch(_NAME, folder.name):
                files = [(p, f"triton/{folder.name}/{p.name}") for p in sorted(folder.iterdir())
                         if p.is_file() and p.suffix in _TRITON_KEPT and not p.name.endswith(AUTOTUNED)
                         and re.fullmatch(_NAME, p.name)]
                entries.append(_entry("triton", files))
    if cupy_dir.is_dir():
        entries += [_entry("cupy", [(p, f"cupy/{p.name}")]) for p in sorted(cupy_dir.iterdir())
                    if p.is_file() and re.fullmatch(_NAME, p.name)]
    return sorted(filter(None, entries), key=lambda e: (e.used > since, e.kind == "cupy", e.used), reverse=True)


class _Counting(io.RawIOBase):
    """A binary sink counting the bytes written through it."""

    def __init__(self, handle):
        self.handle, self.count = handle, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.handle.write(data)
        self.count += written
        return written


@dataclass
class Packed:
    """What :func:`pack` wrote: per kind, entries compiled (written) since ``since``, restored
    ones read since, restored ones not read (or read where the file system records no reads),
    and entries left out at the size limit."""

    size: int = 0
    counts: dict = field(default_factory=dict)  # kind -> {"compiled": n, "read": n, "unread": n, "left out": n}

    def __str__(self) -> str:
        kinds = "; ".join(f"{kind}: " + ", ".join(f"{n} {what}" for what, n in counts.items())
                          for kind, counts in sorted(self.counts.items()))
        return f"{self.size / 2**20:.1f} MiB ({kinds or 'nothing cached'})"


def _write(archive: Path, entries: list[_Entry], since: float, limit: int, slack: int, label: str) -> Packed:
    """Write ``entries`` in order, admitting each while the compressed bytes so far are more than
    ``slack`` below ``limit``; the archive is kept only if it ends within ``limit``."""
    packed = Packed()
    temporary = archive.with_name(archive.name + ".tmp")
    with open(temporary, "wb") as handle:
        sink = _Counting(handle)
        with lzma.LZMAFile(sink, "wb", preset=_PRESET) as compressed, tarfile.open(fileobj=compressed,
                                                                                      mode="w|") as tar:
            for entry in entries:
                counts = packed.counts.setdefault(entry.kind, dict.fromkeys(("compiled", "read", "unread",
                                                                             "left out"), 0))
                if sink.count + slack > limit:
                    counts["left out"] += 1
                    continue
                try:
                    for path, name in entry.files:
                        tar.add(path, arcname=name, recursive=False)
                except OSError:  # a file removed meanwhile: a restore drops the group file of what went in
                    counts["left out"] += 1
                    continue
                counts["compiled" if entry.written > since else "read" if entry.used > since else "unread"] += 1
            manifest = json.dumps({"label": label, "packed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "triton": _triton_version(), "triton_build": _triton_build(),
                                   "entries": packed.counts}, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(manifest), int(time.time())
            tar.addfile(info, io.BytesIO(manifest))
    packed.size = temporary.stat().st_size
    if packed.size > limit:
        temporary.unlink()
    else:
        os.replace(temporary, archive)
    return packed


def pack(archive: Path, since: float = 0.0, limit_mib: float = ARCHIVE_LIMIT_MIB, label: str = "",
         triton_dir: Path | None = None, cupy_dir: Path | None = None) -> Packed:
    """Write both caches' loadable entries into the xz tarball ``archive``, at most ``limit_mib``
    MiB (the order in the module docstring decides which are left out); ``since``: the run's start
    (seconds since the epoch), which sorts the entries into compiled, read and unread.
    ``label`` (e.g. the GPU's name) goes into the archive's manifest."""
    entries = _entries(triton_cache_dir() if triton_dir is None else triton_dir,
                       cupy_cache_dir() if cupy_dir is None else cupy_dir, since)
    limit = int(limit_mib * 2**20)
    slack = min(_SLACK, limit // 4)
    while True:  # the encoder held back more than the slack: admit less
        packed = _write(archive, entries, since, limit, slack, label)
        if packed.size <= limit or slack >= limit:
            return packed
        slack *= 2


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _triton_build() -> str | None:
    """A digest of Triton's own part of every kernel's cache key (``triton_key()``: its compiler
    and language sources and its native library): the same version differs by build and Python
    ABI (Triton 3.6.0 under Python 3.11 and 3.12 share no key), and a restored kernel compiled under
    another build is never read. None without Triton."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return None
    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


@dataclass
class Restored:
    """What :func:`restore` did: files written per kind, files already there, members skipped
    (unexpected names or types, unreadable group files), the archive's manifest, the error
    that ended reading it early (a truncated or corrupt archive), if any, and this machine's
    Triton build, against which ``foreign_triton`` tells whether its Triton kernels were compiled
    under another (then none is read)."""

    written: dict = field(default_factory=dict)
    existing: int = 0
    skipped: int = 0
    manifest: dict = field(default_factory=dict)
    error: str | None = None
    triton_build: str | None = None  # this machine's (_triton_build)

    @property
    def foreign_triton(self) -> bool:
        """Whether Triton kernels came from another Triton build than this machine's."""
        packed_under = self.manifest.get("triton_build") if isinstance(self.manifest, dict) else None
        return bool(packed_under and self.written.get("triton") and packed_under != self.triton_build)

    def __str__(self) -> str:
        source = ", ".join(f"{k} {v}" for k, v in self.manifest.items() if k in ("label", "packed", "triton") and v)
        files = ", ".join(f"{n} {kind} files" for kind, n in sorted(self.written.items())) or "no files"
        text = f"restored {files} ({self.existing} already there, {self.skipped} skipped)"
        text += f" from a cache packed with {source}" if source else ""
        if self.foreign_triton:
            text += (f"; its Triton build {self.manifest['triton_build']} is not this machine's {self.triton_build}, so"
                     " none of its Triton kernels can be read here (pack it under this machine's Triton and Python)")
        return text + (f"; stopped early: {self.error}" if self.error else "")


def _repointed_group(data: bytes, folder: Path) -> bytes | None:
    """A Triton group file naming its packed children (metadata, cubin) in ``folder``; None if
    ``data`` is not one. (Triton 3.6 skips a named child that is missing; later versions miss.)"""
    try:
        children = json.loads(data)["child_paths"]
        if not isinstance(children, dict) or not all(isinstance(c, str) and re.fullmatch(_NAME, c) for c in children):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    kept = {child: str(folder / child) for child in children if Path(child).suffix in _TRITON_KEPT}
    return json.dumps({"child_paths": kept}).encode()


def restore(archive: Path, triton_dir: Path | None = None, cupy_dir: Path | None = None) -> Restored:
    """Unpack ``archive`` (written by :func:`pack`) into Triton's and cupy's caches, keeping any
    file already there. Never raises for the archive's content: a missing, truncated or corrupt
    archive restores what it can and says why it stopped (``Restored.error``); a Triton group file
    whose children did not all arrive is removed again (Triton then compiles that kernel)."""
    triton_dir = triton_cache_dir() if triton_dir is None else triton_dir
    cupy_dir = cupy_cache_dir() if cupy_dir is None else cupy_dir
    restored, groups = Restored(), []
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if member.name == MANIFEST and member.isfile():
                    restored.manifest = json.loads(tar.extractfile(member).read())
                    continue
                if match is None or not member.isfile():
                    restored.skipped += 1
                    continue
                kind = "triton" if match["kind"] else "cupy"
                target = (triton_dir / match["key"] / match["file"] if kind == "triton"
                          else cupy_dir / match["cupy_file"])
                data = tar.extractfile(member).read()
                if kind == "triton" and target.name.startswith(_GROUP_PREFIX):
                    data = _repointed_group(data, target.parent)
                    if data is None:
                        restored.skipped += 1
                        continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(target, "xb") as handle:
                        handle.write(data)
                except FileExistsError:
                    restored.existing += 1
                    continue
                os.utime(target, (member.mtime, member.mtime))
                restored.written[kind] = restored.written.get(kind, 0) + 1
                if kind == "triton" and target.name.startswith(_GROUP_PREFIX):
                    groups.append(target)
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, ValueError) as error:
        restored.error = f"{type(error).__name__}: {error}"
    restored.triton_build = _triton_build()
    for group in groups:  # (a truncated archive's last entry): Triton 3.6 would load a kernel without its cubin
        if not all(Path(child).is_file() for child in json.loads(group.read_text())["child_paths"].values()):
            group.unlink()
            restored.written["triton"] -= 1
            restored.skipped += 1
    return restored


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnops.bench.compile_cache", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write Triton's and cupy's compiled kernels into an xz tarball")
    packing.add_argument("archive", type=Path)
    packing.add_argument("--since", type=float, default=0.0, metavar="EPOCH",
                         help="the run's start: entries compiled or read after it are counted as such")
    packing.add_argument("--limit-mib", type=float, default=ARCHIVE_LIMIT_MIB,
                         help=f"the archive's largest size (default {ARCHIVE_LIMIT_MIB}): the oldest entries stay out")
    packing.add_argument("--label", default="", help="recorded in the archive's manifest (e.g. the GPU's name)")
    unpacking = commands.add_parser("restore", help="unpack a packed archive into this machine's caches")
    unpacking.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        packed = pack(args.archive, args.since, args.limit_mib, args.label)
        verdict = f"wrote {args.archive}" if packed.size <= args.limit_mib * 2**20 else "wrote nothing: over the limit"
        print(f"compile cache: {verdict}, {packed}")
        return 0
    if not args.archive.is_file():
        print(f"compile cache: no {args.archive}, every kernel compiles")
        return 0
    print(f"compile cache: {restore(args.archive)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
