"""Export of a trained run or ensemble: jax.export round trip, params-only checkpoint, standalone loading,
ONNX parity."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from medjax import export
from medjax.errors import MedjaxError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def trained(smoke_run):
    """The smoke run's model with variables whose probabilities depend on the image.

    After its 8 steps the smoke run's features vary across inputs by ~1e-8 (its BatchNorm statistics
    do not match its activations), so its probabilities are one constant and a parity check on them
    could not fail. Re-estimating every BatchNorm's statistics on a batch of 32 (``bn_momentum=0`` in
    train mode; 8 images leave a net so sensitive that ONNX differs by 7e-5) and drawing a random head
    gives probabilities that differ from image to image; the export code sees an ordinary TrainedModel.
    """
    from medjax.run_dir import load_run

    model = load_run(smoke_run)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((32, *model.image_shape), dtype=np.float32)
    estimate = jax.jit(
        lambda v, x: model.model.clone(bn_momentum=0.0).apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        )[1]["batch_stats"]
    )
    params = dict(model.variables["params"])
    kernel = params["classifier"]["kernel"]
    params["classifier"] = {
        "kernel": (rng.standard_normal(kernel.shape) * 0.02).astype(np.float32),
        "bias": np.zeros(kernel.shape[1], np.float32),
    }
    variables = {"params": params, "batch_stats": jax.device_get(estimate(model.variables, batch))}
    return dataclasses.replace(model, variables=variables)


# An artifact against the run in this process: the artifact computes depthwise convolutions in plain XLA, the
# process with medjax's native kernels, so float32 sums run in another order. How far that moves a
# probability depends on the trained weights: 1.2e-6 seen, then 5.1e-6 once the smoke run trained with
# oneMKL's products (a wrong normalisation or layout moves them by 1e-2 and more).
ARTIFACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def export_dir(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export.export_trained(trained, out)
    return out


def test_exported_probabilities_equal_predict_proba_for_any_batch_size(trained, export_dir):
    predict = export.load_exported(export_dir)
    images = export.random_images(4, trained.image_shape, "float32", seed=1)
    expected = trained.predict_proba(images, batch_size=4)
    assert expected[:, 0].std() > 0.05  # Input-dependent, so the comparison below can fail.
    np.testing.assert_allclose(predict(images), expected, atol=ARTIFACT_ATOL)
    # Another batch size, against the model run at that size: XLA tiles each batch shape differently, so
    # the same image's float32 probabilities differ across batch sizes by float rounding (1.2e-6 seen).
    np.testing.assert_allclose(
        predict(images[:3]), trained.predict_proba(images[:3], batch_size=3), atol=ARTIFACT_ATOL
    )
    artifact = jax.export.deserialize(bytearray((export_dir / "probs_float32.jax").read_bytes()))
    assert str(artifact.in_avals[0].shape[0]) == "b"
    assert artifact.in_avals[0].shape[1:] == trained.image_shape


def test_uint8_artifact_normalises_like_the_eval_pipeline(trained, export_dir):
    pixels = export.random_images(3, trained.image_shape, "uint8", seed=2)
    # Same batch shape on both sides: XLA tiles each shape differently, which moves float32 sums by ~1e-6.
    expected = trained.predict_proba(np.stack([trained.preprocess(p) for p in pixels]), batch_size=3)
    np.testing.assert_allclose(export.load_exported(export_dir)(pixels), expected, atol=ARTIFACT_ATOL)


def test_params_checkpoint_restores_without_train_state(trained, export_dir):
    restored = export.load_params(export_dir)
    assert set(restored) == {"params", "batch_stats"}
    assert jax.tree.structure(restored) == jax.tree.structure(trained.variables)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(trained.variables), strict=True):
        np.testing.assert_array_equal(got, want)


def test_artifact_runs_in_a_process_without_medjax(trained, export_dir, tmp_path):
    """The deployer's snippet from ``load_exported``'s docstring, run as is, plus a parity check."""
    images = export.random_images(4, trained.image_shape, "uint8", seed=3)  # The snippet's batch size.
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", export.load_exported(export_dir)(images))
    snippet = textwrap.dedent(export.load_exported.__doc__.split("::\n\n")[1].split("\n\n")[0])
    check = """
        import sys
        assert probs.shape == (4, 2), probs.shape
        got = np.asarray(model.call(np.load("images.npy")))
        np.testing.assert_allclose(got, np.load("expected.npy"), atol=1e-6)
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"medjax", "flax", "orbax", "optax"})
        assert not loaded, loaded
        print("ok")
    """
    code = snippet.replace("export/", f"{export_dir}/") + textwrap.dedent(check)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m medjax.export ARGS`` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "medjax.export", *args],
        cwd=ROOT,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_reports_sizes_and_metadata(smoke_run, tmp_path):
    out = tmp_path / "export"
    args = [f"--workdir={smoke_run}", f"--out={out}", "--input_dtypes=uint8"]
    result = _export_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["sizes"]["probs_uint8.jax"] == (out / "probs_uint8.jax").stat().st_size
    params_size = sum(p.stat().st_size for p in (out / "params").rglob("*") if p.is_file())
    assert metadata["sizes"]["params"] == params_size
    assert f"({params_size:,} bytes)" in result.stdout
    info = json.loads((smoke_run / "dataset.json").read_text())
    assert metadata["class_names"] == info["class_names"]
    assert (metadata["input_shape"], metadata["channels"]) == ([32, 32, 1], 1)  # chest_xray:smoke.
    assert metadata["normalize"] == {"mean": 0.5, "std": 0.25}
    (run,) = metadata["members"]
    assert (run["config_name"], run["model_name"]) == ("chest_xray", "mobilenet_v2")
    assert run["workdir"] == str(smoke_run.absolute()) and metadata["ensemble"] is None
    assert metadata["jax_version"] == jax.__version__
    assert list(metadata["inputs"]) == ["uint8"]
    # 0.35-width MobileNetV2 with 2 classes: the artifact is its float32 weights plus a small graph.
    num_parameters = metadata["num_parameters"]
    assert num_parameters == run["num_parameters"]
    assert 4 * num_parameters < metadata["sizes"]["probs_uint8.jax"] < 5 * num_parameters


def test_onnx_matches_onnxruntime(trained, export_dir, tmp_path):
    pytest.importorskip("jax2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    artifact = jax.export.deserialize(bytearray((export_dir / "probs_float32.jax").read_bytes()))
    path = tmp_path / "probs.onnx"
    error = export.export_onnx(trained, path, input_dtype="float32", check_against=artifact)
    assert error <= export.ONNX_TOLERANCE
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = export.random_images(5, trained.image_shape, "float32", seed=4)  # Not the batch of 3 checked.
    expected = trained.predict_proba(images, batch_size=4)
    assert expected[:, 0].std() > 0.05
    np.testing.assert_allclose(session.run(None, {"images": images})[0], expected, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["probs.onnx"]  # No external-data sidecar.


@pytest.fixture(scope="module")
def second_member(trained):
    """The same network with another random head: a second ensemble member with its own predictions."""
    rng = np.random.default_rng(5)
    params = dict(trained.variables["params"])
    kernel = params["classifier"]["kernel"]
    params["classifier"] = {
        "kernel": (rng.standard_normal(kernel.shape) * 0.02).astype(np.float32),
        "bias": np.full(kernel.shape[1], 0.1, np.float32),
    }
    return dataclasses.replace(trained, variables={**trained.variables, "params": params})


def test_ensemble_artifact_is_the_mean_of_its_members(trained, second_member, tmp_path):
    metadata = export.export_trained([trained, second_member], tmp_path)
    images = export.random_images(4, trained.image_shape, "float32", seed=6)
    probs = [member.predict_proba(images, batch_size=4) for member in (trained, second_member)]
    assert np.abs(probs[0] - probs[1]).max() > 0.05  # Distinct members, so the mean is a real test.
    predict = export.load_exported(tmp_path)
    np.testing.assert_allclose(predict(images), np.mean(probs, axis=0), atol=ARTIFACT_ATOL)
    pixels = export.random_images(3, trained.image_shape, "uint8", seed=7)
    float_images = np.stack([trained.preprocess(p) for p in pixels])
    np.testing.assert_allclose(predict(pixels), predict(float_images), atol=1e-6)
    assert metadata["num_parameters"] == 2 * metadata["members"][0]["num_parameters"]
    assert metadata["ensemble"] == "mean of the members' class probabilities"
    restored = export.load_params(tmp_path)
    assert sorted(restored) == ["member_0", "member_1"]
    np.testing.assert_array_equal(
        restored["member_1"]["params"]["classifier"]["bias"],
        second_member.variables["params"]["classifier"]["bias"],
    )


def test_ensemble_members_must_share_their_input(trained, second_member, tmp_path):
    renamed = dataclasses.replace(second_member, class_names=("a", "b"))
    with pytest.raises(MedjaxError, match=r"class names \['a', 'b'\].*must share class names"):
        export.export_trained([trained, renamed], tmp_path)
    config = second_member.config.copy_and_resolve_references()
    config.data.normalize.mean = 0.4
    with pytest.raises(MedjaxError, match=r"normalisation \(mean, std\) \[0.4, 0.25\]"):
        export.export_trained([trained, dataclasses.replace(second_member, config=config)], tmp_path)
    assert not list(tmp_path.iterdir())  # Refused before writing anything.


def test_export_run_of_an_ensemble_needs_out(smoke_run, second_smoke_run, tmp_path):
    with pytest.raises(MedjaxError, match="pass --out"):
        export.export_run([smoke_run, second_smoke_run])
    metadata = export.export_run([smoke_run, second_smoke_run], out=tmp_path, input_dtypes=["uint8"])
    assert [run["workdir"] for run in metadata["members"]] == [str(smoke_run), str(second_smoke_run)]
    assert metadata["members"][1]["step"] == 1  # The second run trained one step.


def test_cli_refuses_an_ensemble_without_out(smoke_run, second_smoke_run):
    args = [f"--workdir={smoke_run}", f"--workdir={second_smoke_run}"]
    result = _export_cli(*args)
    assert result.returncode == 1
    assert "pass --out" in result.stderr and "Traceback" not in result.stderr
    assert not (smoke_run / "export").exists()  # Nothing written into the first run's directory.
