"""``python -m medjax.predict`` on the session's smoke run: folder search, CSV rows, probabilities equal to
``TrainedModel.predict_proba`` on the same preprocessed images, CAM overlays, and bad files reported by name
without stopping the others."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medjax import predict, run_dir
from medjax.data import images

from .conftest import ROOT
from .test_images import write_dicom


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two folders: PNGs (grey, RGB), a nested JPEG, a DICOM with and one without suffix, a corrupt PNG
    and a text file that the folder search must skip; plus one PNG in a second folder."""
    root = tmp_path_factory.mktemp("predict_inputs")
    rng = np.random.default_rng(0)
    (root / "a" / "nested").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 50), np.uint8)).save(root / "a" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / "a" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (48, 36, 3), np.uint8)).save(root / "a" / "nested" / "photo.jpg")
    write_dicom(root / "a" / "nested" / "slice.dcm", rng.integers(0, 4000, (40, 40)))
    write_dicom(root / "a" / "nested" / "IM0001", rng.integers(0, 4000, (30, 30)))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "a" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(root / "b" / "other.png")
    return root


def test_find_images_searches_folders_and_keeps_named_files(files):
    found = predict.find_images([files / "a", files / "b" / "other.png", files / "missing.png"])
    names = [p.name for p in found]
    assert names == [
        "broken.png",
        "grey.png",
        "IM0001",  # No suffix, found by its DICM magic.
        "photo.jpg",
        "slice.dcm",
        "rgb.png",
        "other.png",
        "missing.png",  # Named explicitly: kept, so its row reports the error.
    ]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "medjax.predict", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_cli_csv_matches_predict_proba(smoke_run, files, tmp_path):
    output, cam_dir = tmp_path / "preds.csv", tmp_path / "cams"
    result = _run_cli(
        f"--workdir={smoke_run}",
        f"--output={output}",
        f"--cam_dir={cam_dir}",
        "--batch_size=4",  # Two batches for the seven files.
        str(files / "a"),
        str(files / "b"),
    )
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr
    with output.open() as f:
        rows = list(csv.DictReader(f))
    model = run_dir.load_run(smoke_run)
    prob_columns = [f"prob_{name}" for name in model.class_names]
    assert list(rows[0]) == ["path", "prediction", *prob_columns, "error", "cam"]
    assert [os.path.basename(r["path"]) for r in rows] == [
        "broken.png",
        "grey.png",
        "IM0001",
        "photo.jpg",
        "slice.dcm",
        "rgb.png",
        "other.png",
    ]

    broken, good = rows[0], rows[1:]
    assert "broken.png" in broken["error"] and broken["prediction"] == "" and broken["cam"] == ""
    assert all(r["error"] == "" for r in good)
    decoded = [images.decode_image(r["path"], channels=model.config.data.channels) for r in good]
    expected = model.predict_proba(np.stack([model.preprocess(image) for image in decoded]))
    got = np.array([[float(r[c]) for c in prob_columns] for r in good])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["prediction"] for r in good] == [model.class_names[k] for k in expected.argmax(axis=1)]
    for row, image in zip(good, decoded, strict=True):  # Overlays at each file's own resolution.
        with Image.open(row["cam"]) as overlay:
            assert overlay.mode == "RGB" and overlay.size == (image.shape[1], image.shape[0])


def test_cli_fails_only_when_nothing_could_be_predicted(smoke_run, files, tmp_path):
    output = tmp_path / "preds.csv"
    result = _run_cli(f"--workdir={smoke_run}", f"--output={output}", str(files / "a" / "broken.png"))
    assert result.returncode == 1
    assert "broken.png" in result.stderr
    with output.open() as f:
        (row,) = list(csv.DictReader(f))
    assert "truncated or corrupt" in row["error"]
