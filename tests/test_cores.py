"""config.cpu_cores: pinning a run to N cores before JAX starts, and the errors when that cannot work."""

import os
import subprocess
import sys

import jax
import pytest

from medjax import cores
from medjax.errors import ConfigError
from tests.conftest import ROOT

TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 cores")


@pytest.mark.parametrize("bad", [0, -1, 10_000, 1.5, True, "2"])
def test_impossible_counts_name_the_key_and_the_range(bad):
    with pytest.raises(ConfigError, match=rf"config.cpu_cores={bad!r}: expected a whole number from 1 to"):
        cores.limit(bad)


def test_none_and_every_core_change_nothing():
    before = cores.available()
    cores.limit(None)
    cores.limit(len(before))  # JAX is running in this process, yet nothing needs changing.
    assert cores.available() == before


@TWO_CORES
def test_after_jax_started_it_says_where_to_set_it():
    jax.devices()  # The CPU client exists from here on.
    with pytest.raises(ConfigError, match="already started its CPU client.*medjax.cores.limit"):
        cores.limit(1)
    assert len(cores.available()) == len(os.sched_getaffinity(0))  # Refused, not half-applied.


@TWO_CORES
def test_a_fresh_process_runs_jax_on_the_first_n_cores():
    code = (
        "import os; from medjax import cores; cores.limit(1); import jax, jax.numpy as jnp; "
        "print(jnp.ones((64, 64)).sum(), sorted(os.sched_getaffinity(0)))"
    )
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split(None, 1) == ["4096.0", f"[{cores.available()[0]}]\n"]
