"""medjax.allocator: which allocator a choice means, the environment it sets, and a real re-execution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medjax import allocator

ROOT = Path(__file__).resolve().parents[1]


def test_auto_prefers_tcmalloc_and_falls_back_to_hugepages(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    assert allocator.resolve("auto") == "tcmalloc"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.resolve("auto") == "hugepages"
    assert allocator.resolve("system") == "system"
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.resolve("jemalloc")


def test_environment_adds_to_existing_variables(monkeypatch):
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


def _run_reexec(choice: str, **env) -> str:
    code = f"from medjax import allocator; allocator.reexec({choice!r}); print(allocator.active())"
    ours = ("LD_PRELOAD", "GLIBC_TUNABLES", "MEDJAX_ALLOCATOR", "MEDJAX_ALLOCATOR_APPLIED")
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_reexec_runs_the_same_command_once_under_the_allocator():
    assert _run_reexec("hugepages") == "hugepages"
    assert _run_reexec("system") == "system"
    assert _run_reexec("hugepages", MEDJAX_ALLOCATOR="system") == "system"


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed")
def test_reexec_preloads_tcmalloc():
    assert _run_reexec("tcmalloc") == "tcmalloc"
    assert _run_reexec("auto") == "tcmalloc"
