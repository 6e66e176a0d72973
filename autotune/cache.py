"""The persistent autotune cache and the configuration look-up every kernel launch makes.

One JSON file per device, keyed by the GPU name, compute capability, driver, torch, triton and
rnnops versions; entries per op, backend and shape bucket hold the chosen configuration and its
measured time. Files are written atomically (a temporary file and os.replace, writers merging
under an flock), so concurrent processes never see half a file. A corrupt, truncated or foreign
file is ignored with a warning, a read-only directory keeps results in memory with a warning:
neither ever stops an op. Look-ups are served from memory after the first one per device.
A bucket that was not tuned takes the tuned entry of the nearest size with the same op, dtype,
head dims and variant; where nothing of that kind was tuned, the defaults shipped for the
matching offline GPU (autotune/defaults/*.json, ranked by the cost model and screened by ptxas;
again exact bucket or nearest size) apply, then the kernel's default config.

Location: $RNNOPS_CACHE_DIR, else ~/.cache/rnnops/autotune.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from rnnops._files import write_atomically

FORMAT = 1
DEFAULTS_DIR = Path(__file__).parent / "defaults"


def cache_dir() -> Path:
    return Path(os.environ.get("RNNOPS_CACHE_DIR") or Path.home() / ".cache" / "rnnops" / "autotune")


def identity(device: torch.device) -> dict:
    """What a cache file must match to be used on ``device``."""
    import rnnops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(device)
    driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "driver": driver,
            "torch": torch.__version__, "triton": triton_version, "rnnops": rnnops.__version__}


def _slug(name: str) -> str:
    """A GPU name as a file name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def key(op: str, backend: str, bucket: str) -> str:
    return f"{op}|{backend}|{bucket}"


def bucket_prefix(bucket_or_key: str) -> str:
    """Everything but the size: "bfloat16:K128:V128:none:tokens~524288" -> "...:tokens"."""
    return bucket_or_key.rpartition("~")[0]


def bucket_size(bucket_or_key: str) -> int | None:
    """The size a bucket ends with (tokens or batch, a power of two); None for a key
    without one (a foreign entry)."""
    size = bucket_or_key.rpartition("~")[2]
    return int(size) if size.isdigit() else None


def nearest(configs: dict[str, dict], k: str) -> dict | None:
    """``configs[k]``, else the configuration of the key with ``k``'s prefix whose size is nearest
    on a log scale (the larger of two equally near), else None."""
    if k in configs:
        return configs[k]
    prefix, size = bucket_prefix(k), bucket_size(k)
    sizes = {bucket_size(name): name for name in configs if bucket_prefix(name) == prefix}
    sizes.pop(None, None)  # a foreign key is no match
    if not sizes or size is None:
        return None
    closest = min(sizes, key=lambda s: (abs(math.log2(s) - math.log2(size)), -s))
    return configs[sizes[closest]]


class TuneCache:
    """The cache file of one device (``identity``), loaded on first use."""

    def __init__(self, path: Path, ident: dict):
        self.path, self.identity = Path(path), ident
        self._entries: dict | None = None
        self._chosen: dict = {}  # memoised look-ups: config_for and best_backend (backend "*")

    @classmethod
    def for_identity(cls, ident: dict) -> TuneCache:
        return cls(cache_dir() / f"{_slug(ident['gpu'])}-sm{ident['capability'].replace('.', '')}.json", ident)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            warnings.warn(f"rnnops autotune cache {self.path} is unreadable ({error}); ignoring it", RuntimeWarning)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("identity") != self.identity:
            warnings.warn(f"rnnops autotune cache {self.path} belongs to another device or version; ignoring it",
                          RuntimeWarning)
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    @property
    def entries(self) -> dict:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def config_for(self, k: str) -> dict | None:
        """The configuration for cache key ``k`` (op|backend|bucket): the tuned entry for its
        bucket, else the tuned entry of the nearest size with the same prefix (a measurement on
        this device at a neighbouring size beats a model ranking: sizes change a configuration's
        waves, not what compiles well), else the shipped default for the bucket, else the
        nearest shipped size. Memoised per key until the next put()."""
        if k not in self._chosen:
            tuned_entries = {name: entry["config"] for name, entry in self.entries.items()
                             if isinstance(entry, dict) and isinstance(entry.get("config"), dict)}
            self._chosen[k] = nearest(tuned_entries, k)
            if self._chosen[k] is None:
                self._chosen[k] = shipped_for(self.identity["gpu"], k)
        return self._chosen[k]

    def get(self, op: str, backend: str, bucket: str) -> dict | None:
        return self.entries.get(key(op, backend, bucket))

    def best_backend(self, op: str, bucket: str) -> str | None:
        """The backend with the fastest measured time for this op and bucket, if any was tuned
        (memoised until the next put(): backend="auto" asks on every call)."""
        k = key(op, "*", bucket)
        if k not in self._chosen:
            timed = [(entry["seconds"], name.split("|")[1]) for name, entry in self.entries.items()
                     if name.startswith(f"{op}|") and name.endswith(f"|{bucket}") and entry.get("seconds")]
            self._chosen[k] = min(timed)[1] if timed else shipped_backend(self.identity["gpu"], op, bucket)
        return self._chosen[k]

    def put(self, new_entries: dict) -> None:
        """Merge ``new_entries`` into memory and into the file (atomically; warns if it cannot)."""
        self.entries.update(new_entries)
        self._chosen.clear()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = self._read()
                merged.update(new_entries)
                write_atomically(self.path, json.dumps({"format": FORMAT, "identity": self.identity,
                                                        "entries": merged}, indent=1))
                self._entries = merged
                self._chosen.clear()
        except OSError as error:
            warnings.warn(f"rnnops autotune cache {self.path} cannot be written ({error}); results stay in memory",
                          RuntimeWarning)


_CACHES: dict[int, TuneCache] = {}
_OVERRIDES: dict[str, dict] = {}


def for_device(device: torch.device) -> TuneCache | None:
    """The cache of a CUDA device (None for other devices)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CACHES:
        _CACHES[index] = TuneCache.for_identity(identity(torch.device("cuda", index)))
    return _CACHES[index]


@functools.cache
def shipped_defaults(gpu_name: str) -> dict:
    """The model-ranked configurations shipped for the offline GPU ``gpu_name`` matches (read
    once per name: every kernel launch without a tuned entry looks here)."""
    from .hardware import match_name

    known = match_name(gpu_name)
    if known is None:
        return {}
    path = DEFAULTS_DIR / f"{_slug(known.name)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.cache
def _shipped_backends() -> dict:
    try:
        return json.loads((DEFAULTS_DIR / "backends.json").read_text())
    except (OSError, ValueError):
        return {}


def shipped_backend(gpu_name: str, op: str, bucket: str) -> str | None:
    """The backend a GPU suite run timed fastest forward+backward for ``op`` at the bucket
    ``bucket`` on the offline GPU ``gpu_name`` matches (autotune/defaults/backends.json: per GPU,
    "op|bucket" -> the backend and the measurement that chose it), or None: exact buckets only,
    since one backend beating another at one size says little about the next. A device's own
    tuned timings come first (TuneCache.best_backend)."""
    from .hardware import match_name

    known = match_name(gpu_name)
    entry = _shipped_backends().get(_slug(known.name), {}).get(f"{op}|{bucket}") if known else None
    return entry.get("backend") if isinstance(entry, dict) else None


def shipped_for(gpu_name: str, k: str) -> dict | None:
    """The configuration shipped for ``gpu_name`` for the cache key ``k``: its bucket's, else the
    nearest size's of the same kernel shape (:func:`nearest`), else None."""
    return nearest(shipped_defaults(gpu_name), k)


@contextlib.contextmanager
def override(op: str, backend: str, bucket: str, config: dict):
    """Make look-ups of (op, backend, bucket) return ``config`` (how the tuner times candidates)."""
    k = key(op, backend, bucket)
    _OVERRIDES[k] = config
    try:
        yield
    finally:
        del _OVERRIDES[k]


def tuned(op: str, backend: str, shape: dict, dtype: torch.dtype, device: torch.device, default):
    """The configuration a kernel launch uses: an override, the device's tuned or shipped entry
    (TuneCache.config_for: exact bucket or the nearest size), or ``default`` (a config
    dataclass instance of the same type)."""
    from .kernels import bucket

    k = key(op, backend, bucket(op, shape, dtype))
    values = _OVERRIDES.get(k)
    if values is None and (cache := for_device(device)) is not None:
        values = cache.config_for(k)
    if values is None:
        return default
    return dataclasses.replace(default, **values)


def preferred_backend(op: str, shape: dict, dtype: torch.dtype, device: torch.device) -> str | None:
    """The backend the device's cache measured fastest for this op and shape bucket, if any."""
    from .kernels import bucket

    device_cache = for_device(device)
    if device_cache is None:
        return None
    try:
        return device_cache.best_backend(op, bucket(op, shape, dtype))
    except (KeyError, ValueError):
        return None
