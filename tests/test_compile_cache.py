"""The GPU suite's compile cache (rnnops.bench.compile_cache): what it packs, in which order and
within which size, and a restore that lands where Triton's cache manager finds it and never
writes outside the caches, whatever the archive holds."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from rnnops.bench import compile_cache

SINCE = 1_700_000_000.0  # the run's start in these tests
HOUR = 3600.0


def _triton_entry(cache, key, kernel, mtime, atime, cubin_bytes=64):
    folder = cache / key
    folder.mkdir(parents=True)
    products = {f"{kernel}.{suffix}": folder / f"{kernel}.{suffix}" for suffix in ("json", "cubin", "ptx", "llir")}
    products[f"{kernel}.json"].write_text(json.dumps({"name": kernel, "num_warps": 4}))
    products[f"{kernel}.cubin"].write_bytes(os.urandom(cubin_bytes))  # incompressible: sizes are predictable
    products[f"{kernel}.ptx"].write_text("// ptx")
    products[f"{kernel}.llir"].write_text("; llir")
    group = folder / f"__grp__{kernel}.json"
    group.write_text(json.dumps({"child_paths": {name: str(path) for name, path in products.items()}}))
    for path in [*products.values(), group]:
        os.utime(path, (atime, mtime))


@pytest.fixture
def caches(tmp_path):
    """A Triton cache with an entry compiled in the run, one restored and read in it, one restored
    and unread, and a cupy cache with one file compiled in the run and one unread."""
    triton, cupy = tmp_path / "triton", tmp_path / "cupy"
    _triton_entry(triton, "KEYCOMPILED", "fwd_kernel", SINCE + 20, SINCE + 20)
    _triton_entry(triton, "KEYREAD", "bwd_kernel", SINCE - 5 * HOUR, SINCE + 10)
    _triton_entry(triton, "KEYUNREAD", "old_kernel", SINCE - 9 * HOUR, SINCE - 9 * HOUR)
    (triton / "KEYAUTOTUNED").mkdir()  # a peer's stored autotuning choice: carried per GPU model elsewhere
    (triton / "KEYAUTOTUNED" / "peer_kernel.autotune.json").write_text('{"configs_timings": []}')
    cupy.mkdir()
    for name, when in (("new_2.cubin", SINCE + 30), ("old_2.cubin", SINCE - HOUR)):
        (cupy / name).write_bytes(os.urandom(64))
        os.utime(cupy / name, (when, when))
    return triton, cupy


def test_pack_keeps_metadata_and_cubins_and_counts_what_the_run_used(tmp_path, caches):
    triton, cupy = caches
    archive = tmp_path / "cache.tar.xz"
    packed = compile_cache.pack(archive, SINCE, label="gpu-x", triton_dir=triton, cupy_dir=cupy)
    assert packed.counts == {"triton": {"compiled": 1, "read": 1, "unread": 1, "left out": 0},
                             "cupy": {"compiled": 1, "read": 0, "unread": 1, "left out": 0}}
    with tarfile.open(archive, "r:xz") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(compile_cache.MANIFEST).read())
    assert sorted(n for n in names if n.startswith("triton/KEYREAD/")) == [
        "triton/KEYREAD/__grp__bwd_kernel.json", "triton/KEYREAD/bwd_kernel.cubin", "triton/KEYREAD/bwd_kernel.json"]
    assert not [n for n in names if n.endswith((".ptx", ".llir", ".autotune.json"))]
    assert {"cupy/new_2.cubin", "cupy/old_2.cubin"} <= set(names)
    assert manifest["label"] == "gpu-x" and manifest["entries"] == packed.counts
    # used in the run first, cupy's before Triton's, each by last use
    entries = list(dict.fromkeys(n.split("/")[1] for n in names if "/" in n))
    assert entries == ["new_2.cubin", "KEYCOMPILED", "KEYREAD", "old_2.cubin", "KEYUNREAD"]


def test_pack_leaves_the_oldest_entries_out_at_its_size_limit(tmp_path):
    triton = tmp_path / "triton"
    for i in range(8):  # 8 entries of 128 KiB of incompressible cubin, entry 7 the newest
        _triton_entry(triton, f"KEY{i}", "k", SINCE + i, SINCE + i, cubin_bytes=128 << 10)
    archive = tmp_path / "cache.tar.xz"
    packed = compile_cache.pack(archive, SINCE - 1, limit_mib=0.5, triton_dir=triton, cupy_dir=tmp_path / "none")
    assert archive.stat().st_size <= 0.5 * 2**20 and packed.size == archive.stat().st_size
    with tarfile.open(archive, "r:xz") as tar:
        kept = {n.split("/")[1] for n in tar.getnames() if n.startswith("triton/")}
    assert packed.counts["triton"]["left out"] == 8 - len(kept) > 0 and kept
    assert kept == {f"KEY{i}" for i in range(8 - len(kept), 8)}


def test_restore_lands_where_triton_finds_it_and_overwrites_nothing(tmp_path, caches, monkeypatch):
    triton, cupy = caches
    archive = tmp_path / "cache.tar.xz"
    compile_cache.pack(archive, SINCE, triton_dir=triton, cupy_dir=cupy)
    here_triton, here_cupy = tmp_path / "here" / "triton", tmp_path / "here" / "cupy"
    restored = compile_cache.restore(archive, here_triton, here_cupy)
    assert restored.written == {"triton": 9, "cupy": 2} and restored.error is None and not restored.skipped
    group = json.loads((here_triton / "KEYREAD" / "__grp__bwd_kernel.json").read_text())
    assert group["child_paths"] == {f"bwd_kernel.{s}": str(here_triton / "KEYREAD" / f"bwd_kernel.{s}")
                                    for s in ("json", "cubin")}
    cubin = here_triton / "KEYREAD" / "bwd_kernel.cubin"
    stat = cubin.stat()  # access time = modification time = the packed file's: the first read shows
    assert stat.st_mtime == stat.st_atime == int(SINCE - 5 * HOUR)
    assert cubin.read_bytes() == (triton / "KEYREAD" / "bwd_kernel.cubin").read_bytes()
    triton_cache = pytest.importorskip("triton.runtime.cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(here_triton))
    found = triton_cache.FileCacheManager("KEYREAD").get_group("bwd_kernel.json")
    assert found == {"bwd_kernel.json": str(here_triton / "KEYREAD" / "bwd_kernel.json"),
                     "bwd_kernel.cubin": str(cubin)}

    (here_cupy / "old_2.cubin").write_bytes(b"this machine's")
    again = compile_cache.restore(archive, here_triton, here_cupy)
    assert again.written == {} and again.existing == 11
    assert (here_cupy / "old_2.cubin").read_bytes() == b"this machine's"


def test_restore_says_when_the_archive_was_packed_under_another_triton_build(tmp_path, caches, monkeypatch):
    # Triton's cache keys cover its own build: a seed packed under Triton 3.6.0 with Python 3.11 had
    # none of its 784 kernels read by the GPU's Triton 3.6.0 with Python 3.12 (2026-11-27)
    triton, cupy = caches
    archive = tmp_path / "cache.tar.xz"
    monkeypatch.setattr(compile_cache, "_triton_build", lambda: "build-a")
    compile_cache.pack(archive, SINCE, triton_dir=triton, cupy_dir=cupy)
    same = compile_cache.restore(archive, tmp_path / "same" / "triton", tmp_path / "same" / "cupy")
    assert not same.foreign_triton and "not this machine's" not in str(same)
    monkeypatch.setattr(compile_cache, "_triton_build", lambda: "build-b")
    other = compile_cache.restore(archive, tmp_path / "other" / "triton", tmp_path / "other" / "cupy")
    assert other.foreign_triton and "Triton build build-a is not this machine's build-b" in str(other)


def test_restore_of_a_truncated_or_foreign_archive_says_why_and_never_raises(tmp_path, caches):
    triton, cupy = caches
    archive = tmp_path / "cache.tar.xz"
    compile_cache.pack(archive, SINCE, triton_dir=triton, cupy_dir=cupy)
    data, groups_removed = archive.read_bytes(), 0
    for cut in range(64, len(data), 61):  # cuts between a group file and its kernel's files among them
        truncated = tmp_path / f"truncated{cut}.tar.xz"
        truncated.write_bytes(data[:cut])
        target = tmp_path / f"target{cut}"
        result = compile_cache.restore(truncated, target / "triton", target / "cupy")
        assert "stopped early" in str(result) if result.error else result.written == {"triton": 9, "cupy": 2}
        written = [p for p in target.rglob("*") if p.is_file()]
        assert sum(result.written.values()) == len(written)  # no partly written file
        for group in target.rglob("__grp__*"):  # none naming a kernel file that did not arrive
            assert all(Path(child).is_file() for child in json.loads(group.read_text())["child_paths"].values())
        groups_removed += result.skipped
    assert groups_removed
    assert compile_cache.restore(tmp_path / "missing.tar.xz", tmp_path / "t", tmp_path / "c").error
    (tmp_path / "garbage.tar.xz").write_bytes(b"not an archive")
    assert compile_cache.restore(tmp_path / "garbage.tar.xz", tmp_path / "t", tmp_path / "c").error


def test_restore_skips_members_outside_the_caches(tmp_path):
    archive, absolute = tmp_path / "evil.tar.xz", tmp_path.parent / f"{tmp_path.name}-absolute"
    with tarfile.open(archive, "w:xz") as tar:
        for name in ("../escaped", str(absolute), "triton/KEY/../../escaped", "triton/KEY/sub/deep", "other/file",
                     "triton/KEY/__grp__k.json"):
            data = b"{}" if name.endswith("__grp__k.json") else b"x"  # a group file without child_paths
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cupy/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    target = tmp_path / "deep" / "target"
    result = compile_cache.restore(archive, target / "triton", target / "cupy")
    assert result.skipped == 7 and not result.written and result.error is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p != archive] and not absolute.exists()


def test_cli_restore_without_an_archive_compiles_everything(tmp_path, capsys):
    assert compile_cache.main(["restore", str(tmp_path / "none.tar.xz")]) == 0
    assert "every kernel compiles" in capsys.readouterr().out


TINY_KERNEL = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource


    @triton.jit
    def doubled(x, y, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n) * 2, mask=i < n)


    signature = {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    source = ASTSource(doubled, signature, constexprs={"BLOCK": 64})
    print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).hash)
""")


def test_a_restored_triton_kernel_is_a_cache_hit_in_another_folder(tmp_path):
    """The mechanism end to end, with Triton's compiler for sm_90 (no GPU needed): a kernel compiled
    into one cache folder, packed and restored into another, is found there by Triton's own
    lookup, which then compiles nothing (a compile writes its intermediate forms, never packed)."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    script = tmp_path / "tiny_kernel.py"
    script.write_text(TINY_KERNEL)

    def compiled_hash(cache):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                                check=False)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout.strip()

    first = compiled_hash(tmp_path / "there")
    archive = tmp_path / "cache.tar.xz"
    compile_cache.pack(archive, triton_dir=tmp_path / "there", cupy_dir=tmp_path / "none")
    shutil.rmtree(tmp_path / "there")  # as on another machine
    here = tmp_path / "here"
    assert compile_cache.restore(archive, here, tmp_path / "none").written == {"triton": 3}
    assert compiled_hash(here) == first
    assert sorted(p.suffix for p in here.rglob("*") if p.is_file()) == [".cubin", ".json", ".json"]
