"""The benchmark scripts' bookkeeping on made-up numbers: rotation, medians with their range, ratios, the
per-case summary, and the A/B comparison. Nothing is timed here."""

import argparse
import sys
from pathlib import Path

import ml_collections
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "launch"))
import ab_step
import benchmark
import timing


def test_rotation_puts_every_case_in_every_position():
    cases = ["a", "b", "c"]
    rounds = [timing.rotated(cases, r) for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [{r[i] for r in rounds} for i in range(3)] == [set(cases)] * 3
    assert timing.rotated(cases, 4) == ["b", "c", "a"]
    assert timing.rotated([], 2) == []


def test_spread_and_ratio_of_medians():
    fast, slow = timing.spread([4.0, 2.0, 3.0]), timing.spread([1.0, 2.0, 1.5, 1.2])
    assert fast == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert slow["median"] == pytest.approx(1.35)
    assert timing.ratio(fast, slow) == pytest.approx({"median": 3.0 / 1.35, "min": 1.0, "max": 4.0})
    assert timing.fmt(fast) == "3.00 [2.00-4.00]"


def _args(models: str) -> argparse.Namespace:
    return benchmark.parse_args([f"--models={models}", "--skip_torch_compile", "--allocator=hugepages"])


def test_cases_pair_medjax_with_its_peers_under_the_same_allocator():
    args = _args("convnext,mobilenet_v2")
    args.remat = ["none", "block"]
    cases = benchmark.make_cases(args, with_torch=True)
    assert [c["case"] for c in cases] == [
        "medjax:convnext:fast",
        "medjax:convnext:fast",
        "torch:convnext:eager",
        "medjax:mobilenet_v2:fast",
        "medjax:mobilenet_v2:fast",
        "torch:mobilenet_v2:eager",
    ]
    assert [c["remat"] for c in cases[:3]] == ["none", "block", "none"]
    assert {c["allocator"] for c in cases} == {"hugepages"}
    assert len(benchmark.make_cases(args, with_torch=False)) == 4


def test_summary_gives_medians_ranges_ratios_and_errors():
    args = _args("convnext")
    mj, pt = benchmark.make_cases(args, with_torch=True)

    def result(case, speed, rss, load):
        figures = dict.fromkeys(benchmark.FIGURES, 1.0)
        figures.update(train_images_per_s=speed, peak_rss_mb=rss, planned_mb={"total": 8000.0})
        return {**case, **figures, "load_before": load, "load_after": load + 1, "params": 28}

    rounds = [
        [result(mj, 4.0, 9000, 1.0), result(pt, 2.0, 5000, 1.0)],
        [result(pt, 2.5, 5100, 2.0), result(mj, 3.0, 9500, 2.0)],
        [{**mj, "error": "exit 137", "load_before": 3.0, "load_after": 3.0}, result(pt, 3.0, 5200, 3.0)],
    ]
    medjax_row, torch_row = benchmark.summarise([mj, pt], rounds)
    assert medjax_row["rounds_ok"] == 2 and medjax_row["errors"] == ["exit 137"]
    assert medjax_row["train_images_per_s"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert medjax_row["peak_rss_mb"]["max"] == 9500
    assert medjax_row["vs_torch_eager"] == pytest.approx({"median": 3.5 / 2.5, "min": 1.0, "max": 2.0})
    assert medjax_row["load"] == [[1.0, 2.0], [2.0, 3.0], [3.0, 3.0]]
    assert "vs_torch_eager" not in torch_row
    table = benchmark.markdown([medjax_row, torch_row])
    assert "| 3.50 [3.00-4.00] | 1.40 [1.00-2.00] | - |" in table
    assert "| 9250 [9000-9500] | 8000 |" in table


def test_ab_comparison_is_new_over_ref_in_images_per_second():
    runs = {
        "ref": [{"step_s": 2.0}, {"step_s": 4.0}, {"step_s": 2.5}],
        "new": [{"step_s": 1.0}, {"step_s": 2.0}],
    }
    result = ab_step.compare(runs, batch=8)
    assert result["ref"] == {"median": 3.2, "min": 2.0, "max": 4.0}
    assert result["new"] == {"median": 6.0, "min": 4.0, "max": 8.0}
    assert result["new_over_ref"] == pytest.approx({"median": 6.0 / 3.2, "min": 1.0, "max": 4.0})


def test_ab_overrides_take_literals_and_strings():
    config = ml_collections.ConfigDict({"train": {"remat": "none"}, "data": {"batch_size": 32}})
    ab_step._apply(config, "train.remat=block")
    ab_step._apply(config, "data.batch_size=8")
    assert (config.train.remat, config.data.batch_size) == ("block", 8)
