"""medjax.allocator: which allocator a choice means, the environment it sets, and a real re-execution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medjax import allocator

ROOT = Path(__file__).resolve().parents[1]


def test_auto_prefers_tcmalloc_then_mimalloc_and_falls_back_to_hugepages(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/venv/cmeel.prefix/lib/libmimalloc.so")
    assert allocator.resolve("auto") == "tcmalloc"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.resolve("auto") == "mimalloc"
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: None)
    assert allocator.resolve("auto") == "hugepages"
    assert allocator.resolve("system") == "system"
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.resolve("jemalloc")


def test_environment_adds_to_existing_variables(monkeypatch):
    monkeypatch.setattr(allocator, "huge_cache", lambda: None)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    env = allocator.environment("tcmalloc", {"LD_PRELOAD": "/opt/lib/libfoo.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": "/opt/lib/libtcmalloc_minimal.so.4 /opt/lib/libfoo.so", "PATH": "/bin"}
    env = allocator.environment("hugepages", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert allocator.environment("system", {"A": "1"}) == {"A": "1"}


def test_tcmalloc_asked_for_but_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(FileNotFoundError, match="apt install libtcmalloc-minimal4.*--allocator=hugepages"):
        allocator.environment("tcmalloc", {})


def test_mimalloc_keeps_freed_pages_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.setattr(allocator, "huge_cache", lambda: None)
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/opt/lib/libmimalloc.so")
    env = allocator.environment("mimalloc", {})
    assert env == {"LD_PRELOAD": "/opt/lib/libmimalloc.so", "MIMALLOC_PURGE_DELAY": "-1"}
    assert allocator.environment("mimalloc", {"MIMALLOC_PURGE_DELAY": "50"})["MIMALLOC_PURGE_DELAY"] == "50"


def test_huge_block_cache_goes_first_except_for_the_system_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "huge_cache", lambda: "/cache/huge_cache-1.so")
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/opt/lib/libmimalloc.so")
    env = allocator.environment("mimalloc", {"LD_PRELOAD": "/opt/lib/libfoo.so"})
    assert env["LD_PRELOAD"] == "/cache/huge_cache-1.so /opt/lib/libmimalloc.so /opt/lib/libfoo.so"
    assert allocator.environment("hugepages", {})["LD_PRELOAD"] == "/cache/huge_cache-1.so"
    assert "LD_PRELOAD" not in allocator.environment("system", {})
    assert "LD_PRELOAD" not in allocator.environment("hugepages", {"MEDJAX_HUGE_CACHE": "0"})


_HUGE_BLOCKS = """
import resource
import numpy as np
n = 300 << 20
a = np.ones(n, np.uint8)
first = a.ctypes.data
del a
b = np.empty(n - 4096, np.uint8)
assert b.ctypes.data == first, "a freed huge block serves the next request of about its size"
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b[:] = 7
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
assert faults < 50, f"{faults} page faults: the block was mapped afresh"  # 150+ (2 MiB pages) if so
del b
c = np.zeros(n, np.uint8)
assert c.ctypes.data == first and not c.any(), "calloc zeroes a reused block"
del c
d = np.ones(2 * n, np.uint8)
assert d.ctypes.data != first and d.sum() == 2 * n, "a block too small is not reused"
def mapped(address):
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= address < hi:
            return True
    return False
inside_d = d.ctypes.data <= first < d.ctypes.data + d.nbytes
assert inside_d or not mapped(first), "a miss unmaps the cached blocks that cannot serve it"
small = [np.full(1000, i) for i in range(10000)]  # the next allocator's, freed through the cache
assert sum(int(x[0]) for x in small) == sum(range(10000))
grown = bytearray(n)
grown[-1] = 5
grown += b"x" * (n // 4)  # realloc out of a cached block into a new one
assert grown[n - 1] == 5 and len(grown) == n + n // 4
del small, grown, d
print("ok")
"""


@pytest.mark.skipif(allocator.huge_cache() is None, reason="no C compiler")
@pytest.mark.parametrize("below", ["system", "mimalloc"])
def test_huge_block_cache_reuses_freed_blocks_and_keeps_malloc_semantics(below):
    """Under the cache (over glibc, then over mimalloc): a freed 300 MiB block comes back for the next
    request of about its size without a page fault, calloc'd memory is zero, a larger request gets a new
    block and unmaps the cached one, realloc moves contents out of a cached block, and small allocations
    pass through. (Over glibc
    alone the reuse check fails; mimalloc alone keeps blocks up to about 1 GiB, XLA's are larger.)"""
    preload = " ".join(
        filter(None, (allocator.huge_cache(), allocator.find_mimalloc() if below == "mimalloc" else ""))
    )
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_BLOCKS],
        env={**os.environ, "LD_PRELOAD": preload},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_mimalloc_asked_for_but_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install cmeel-mimalloc==3.4.3.*--allocator=hugepages"):
        allocator.environment("mimalloc", {})


def test_mimalloc_comes_from_requirements_with_the_pin_the_advice_names():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith(allocator.FIX_COMMAND.removeprefix("pip install ") + ";") for line in lines)
    assert allocator.find_mimalloc() is not None, "pip install -r requirements.txt brings libmimalloc.so"


def test_first_log_line_says_what_speed_is_left_and_the_fix(monkeypatch):
    monkeypatch.setattr(allocator, "active", lambda: "hugepages")
    line = allocator.describe()
    assert line.startswith("hugepages (no fast allocator found") and "1.3-2.2x slower" in line
    assert "pip install cmeel-mimalloc==3.4.3" in line and "apt-get install libtcmalloc-minimal4" in line
    monkeypatch.setattr(allocator, "active", lambda: "mimalloc")
    assert allocator.describe() == "mimalloc"


def _run_reexec(choice: str, **env) -> str:
    code = f"from medjax import allocator; allocator.reexec({choice!r}); print(allocator.active())"
    ours = (
        "LD_PRELOAD",
        "GLIBC_TUNABLES",
        "MEDJAX_ALLOCATOR",
        "MEDJAX_ALLOCATOR_APPLIED",
        "MEDJAX_HUGE_CACHE",
    )
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


CACHE = " + huge-block cache" if allocator.huge_cache() else ""


def test_reexec_runs_the_same_command_once_under_the_allocator():
    assert _run_reexec("hugepages") == "hugepages" + CACHE
    assert _run_reexec("hugepages", MEDJAX_HUGE_CACHE="0") == "hugepages"
    assert _run_reexec("system") == "system"
    assert _run_reexec("hugepages", MEDJAX_ALLOCATOR="system") == "system"


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed")
def test_reexec_preloads_tcmalloc():
    assert _run_reexec("tcmalloc") == "tcmalloc" + CACHE
    assert _run_reexec("auto") == "tcmalloc" + CACHE


def test_reexec_preloads_mimalloc_from_its_wheel():
    assert _run_reexec("mimalloc") == "mimalloc" + CACHE
    assert _run_reexec("auto") == ("tcmalloc" if allocator.find_tcmalloc() else "mimalloc") + CACHE
