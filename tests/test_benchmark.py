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
import studies_table
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
        "medjax:matmul:roofline",
        "torch:matmul:roofline",
        "medjax:convnext:fast",
        "medjax:convnext:fast",
        "torch:convnext:eager",
        "medjax:mobilenet_v2:fast",
        "medjax:mobilenet_v2:fast",
        "torch:mobilenet_v2:eager",
    ]
    assert [c["remat"] for c in cases[2:5]] == ["none", "block", "none"]
    assert {c["allocator"] for c in cases} == {"hugepages"}
    assert len(benchmark.make_cases(args, with_torch=False)) == 5


def test_summary_gives_medians_ranges_ratios_and_errors():
    args = _args("convnext")
    roofline, _, mj, pt = benchmark.make_cases(args, with_torch=True)

    def result(case, speed, rss, load):
        figures = dict.fromkeys(benchmark.FIGURES, 1.0)
        figures.update(train_images_per_s=speed, peak_rss_mb=rss, planned_mb={"total": 8000.0})
        figures.update(gflop_per_s=30.0 * speed)
        return {**case, **figures, "load_before": load, "load_after": load + 1, "params": 28}

    def matmul(gflop_per_s, load):
        return {**roofline, "matmul_gflop_per_s": gflop_per_s, "load_before": load, "load_after": load}

    rounds = [
        [matmul(150.0, 1.0), result(mj, 4.0, 9000, 1.0), result(pt, 2.0, 5000, 1.0)],
        [result(pt, 2.5, 5100, 2.0), result(mj, 3.0, 9500, 2.0), matmul(140.0, 2.0)],
        [
            {**mj, "error": "exit 137", "load_before": 3.0, "load_after": 3.0},
            result(pt, 3.0, 5200, 3.0),
            matmul(160.0, 3.0),
        ],
    ]
    roofline_row, medjax_row, torch_row = benchmark.summarise([roofline, mj, pt], rounds)
    assert roofline_row["matmul_gflop_per_s"] == {"median": 150.0, "min": 140.0, "max": 160.0}
    # The step's XLA FLOPs per second (30 GFLOP per image here) over the matmul's, medians and extremes.
    assert medjax_row["vs_roofline"] == pytest.approx(
        {"median": 105 / 150, "min": 90 / 160, "max": 120 / 140}
    )
    assert medjax_row["rounds_ok"] == 2 and medjax_row["errors"] == ["exit 137"]
    assert medjax_row["train_images_per_s"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert medjax_row["peak_rss_mb"]["max"] == 9500
    assert medjax_row["vs_torch_eager"] == pytest.approx({"median": 3.5 / 2.5, "min": 1.0, "max": 2.0})
    assert medjax_row["load"] == [[1.0, 2.0], [2.0, 3.0], [3.0, 3.0]]
    assert "vs_torch_eager" not in torch_row
    table = benchmark.markdown([roofline_row, medjax_row, torch_row])
    assert "| 3.50 [3.00-4.00] | 1.40 [1.00-2.00] | - | 105.0 [90.0-120.0] | 0.70 [0.56-0.86] |" in table
    assert "| - | - | - | 150.0 [140.0-160.0] |" in table
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


def test_ab_switch_summary_is_ref_over_new_per_pair():
    pairs = [
        {"ref": 2.0, "new": 1.0},
        {"ref": 3.0, "new": 2.0},
        {"ref": 1.0, "new": 1.0},
        {"ref": 1.2, "new": 1.0},
    ]
    summary = ab_step.switch_summary(pairs)
    assert summary["step_s"] == {"ref": 1.6, "new": 1.0}
    # Ratios 2.0, 1.5, 1.0, 1.2: median 1.35; quartiles by the 'exclusive' method, 1.05 and 1.875.
    assert summary["ref_over_new"] == pytest.approx({"median": 1.35, "q1": 1.05, "q3": 1.875})


def test_ab_switch_names_a_module_constant():
    module, name, value = ab_step._switch("medjax.models.native.MAX_FORWARD_KERNEL_WIDTH=3")
    assert (module.__name__, name, value) == ("medjax.models.native", "MAX_FORWARD_KERNEL_WIDTH", 3)
    with pytest.raises(SystemExit, match="has no 'NOPE'"):
        ab_step._switch("medjax.models.native.NOPE=0")
    with pytest.raises(SystemExit, match="cannot import"):
        ab_step._switch("medjax.nowhere.X=1")


def _rate(median: float, low: float, high: float) -> dict[str, float]:
    return {"median": median, "min": low, "max": high}


def test_studies_table_projects_each_recipe_from_the_benchmark_rates():
    # Study C: 4,172 training images at 4172/60 img/s and 1,044 validation images at 104.4 img/s: a
    # 70-second epoch; configs/chest_xray.py trains 15 epochs.
    fast = {"case": "medjax:mobilenet_v2:fast", "train_images_per_s": _rate(4172 / 60, 4172 / 120, 4172 / 30)}
    fast["infer_images_per_s"] = _rate(104.4, 104.4, 104.4)
    slow = {**fast, "case": "torch:mobilenet_v2:eager", "train_images_per_s": _rate(4172 / 120, 1.0, 1e9)}
    bench = {"meta": {"argv": ["launch/benchmark.py"]}, "summary": [fast, slow]}
    medjax_row, torch_row = studies_table.rows(bench)
    assert medjax_row["study"].name.startswith("C:") and medjax_row["epochs"] == 15
    assert medjax_row["epoch_min"] == pytest.approx({"median": 70 / 60, "min": 40 / 60, "max": 130 / 60})
    assert medjax_row["total_h"] == pytest.approx(15 * 70 / 3600)
    assert torch_row["total_h"] == pytest.approx(15 * 130 / 3600)
    assert "| PyTorch eager | 2.2 [0.2-" in studies_table.markdown([medjax_row, torch_row], {"C": 1.5})
    assert "1.2 [0.7-2.2]; measured 1.5 | 0.29 | 1.00x |" in studies_table.markdown([medjax_row], {"C": 1.5})
    with pytest.raises(ValueError, match="data.image_size is 224, the benchmark ran 160"):
        studies_table.rows({**bench, "meta": {"argv": ["launch/benchmark.py", "--size=160"]}})


def test_step_flops_are_the_models_whichever_kernels_run_it(monkeypatch):
    """``TrainStep.gflops`` is XLA's count of the step traced with XLA's operations only: the same whether
    the step runs medjax's native kernels or not, where XLA's count of the native step misses the work
    inside them (its products, depthwise convolutions, LayerNorm and GELU)."""
    import medjax_step

    from medjax import config_lib, losses, models
    from medjax.evaluate import model_card
    from medjax.models import native

    def tiny_step():
        model = models.get_model("convnext", num_classes=2, depths=(1, 1, 1, 1), widths=(8, 8, 16, 16))
        return medjax_step.compile_train_step(
            model,
            optim_cfg=config_lib.base_config().optim,
            loss_fn=losses.make_loss_fn({"cross_entropy": {"weight": 1.0}}),
            batch_size=2,
            image_shape=(32, 32, 3),
            num_classes=2,
        )

    as_run = tiny_step()
    with monkeypatch.context() as patch:
        patch.setenv("MEDJAX_NATIVE", "0")
        native._registered.cache_clear()
        xla_run = tiny_step()
    native._registered.cache_clear()
    assert as_run.gflops() == pytest.approx(xla_run.gflops(), rel=1e-9)
    assert model_card.compiled_gflops(xla_run.compiled) == pytest.approx(xla_run.gflops(), rel=1e-9)
    if native.available():
        assert model_card.compiled_gflops(as_run.compiled) < 0.9 * as_run.gflops()
