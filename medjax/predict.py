"""Class predictions for new image files from a trained run, as CSV, with optional Grad-CAM overlays.

``python -m medjax.predict --workdir=RUN --output=preds.csv [--cam_dir=DIR] PATH [PATH...]``

A segmentation run writes masks instead (``--mask_dir``, ``--probabilities``; NIfTI volumes too), one CSV
row per file naming them: see :mod:`medjax.seg_predict`.

Each PATH is a file or a folder (searched recursively for PNG, JPEG, BMP, TIFF and DICOM, the latter by
``.dcm``/``.dicom`` suffix or by the ``DICM`` magic at byte 128, since DICOM exports often have no suffix).
Files are decoded with :func:`medjax.data.images.decode_image` and preprocessed exactly as the run's
evaluation (:meth:`medjax.run_dir.TrainedModel.preprocess`), then predicted in batches. The CSV has one row
per file, in the order found: ``path``, ``prediction`` (class name), ``prob_<class>`` per class, ``cam``
(overlay file, with ``--cam_dir``) and ``error``. A file that cannot be read is reported on stderr and in
its row's ``error`` column, and the others still run; the exit status is non-zero only when no file could
be predicted at all.
"""

import csv
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from medjax import cli, gradcam, run_dir, seg_predict
from medjax.data import images
from medjax.errors import MedjaxError
from medjax.finite import check_outputs

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly (kept whatever their suffix, so a bad one is reported rather than skipped) and
    image files under folders, recursively, sorted per folder."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and (p.suffix.lower() in IMAGE_SUFFIXES or seg_predict.is_nifti(p) or _is_dicom(p))
            ]
        else:
            found.append(path)  # Missing files too: decoding reports them by name.
    return found


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(
    model: run_dir.TrainedModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    cam_dir: str | os.PathLike | None = None,
    cam_method: str = "gradcam",
) -> list[dict[str, str]]:
    """CSV rows (see the module docstring) for ``paths``, decoding and predicting ``batch_size`` at a time.

    Probabilities come from :meth:`TrainedModel.predict_proba`. With ``cam_dir``, the CAM of the predicted
    class is blended on the original image and saved as ``<cam_dir>/<row number>_<file stem>.png``.
    """
    names = model.class_names
    channels = model.config.data.channels
    if cam_dir is not None:
        Path(cam_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for chunk in _chunks(list(paths), batch_size):
        decoded, inputs = {}, []
        for path in chunk:
            row = {
                "path": images.printable(path),
                "prediction": "",
                **{f"prob_{n}": "" for n in names},
                "error": "",
            }
            if cam_dir is not None:
                row["cam"] = ""
            try:
                image = images.decode_image(path, channels=channels)
            except images.ImageDecodeError as e:
                row["error"] = str(e)
                print(f"medjax.predict: skipped {e}", file=sys.stderr)
            else:
                decoded[len(rows)] = image
                inputs.append(model.preprocess(image))
            rows.append(row)
        if not inputs:
            continue
        batch = np.stack(inputs)
        probs = model.predict_proba(batch, batch_size=batch_size)
        check_outputs(probs, what=f"{model.workdir} (best checkpoint, step {model.step})")
        cams = None
        if cam_dir is not None:
            cams = gradcam.cam(model, None, batch, method=cam_method, batch_size=batch_size)
        for j, (index, original) in enumerate(decoded.items()):
            row = rows[index]
            row["prediction"] = names[int(probs[j].argmax())]
            row.update({f"prob_{n}": f"{p:.6g}" for n, p in zip(names, probs[j], strict=True)})
            if cams is not None:
                out = Path(cam_dir) / f"{index:05d}_{Path(row['path']).stem}.png"
                Image.fromarray(gradcam.blend_overlay(original, cams[j])).save(out)
                row["cam"] = images.printable(out)
    return rows


def write_csv(rows: Sequence[dict[str, str]], path: str | os.PathLike) -> None:
    """Writes ``rows`` (all with the same keys) with a header line, as UTF-8, all or nothing: a failure
    midway (a full disk) leaves no truncated CSV behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path", "prediction", "error"])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _define_flags() -> None:
    """Flags exist only when run as a program (see :func:`medjax.gradcam._define_flags`)."""
    flags.DEFINE_string("workdir", None, "Run directory written by `python -m medjax.launch`.", required=True)
    flags.DEFINE_string("output", None, "CSV file to write.", required=True)
    flags.DEFINE_string("cam_dir", None, "Also save a Grad-CAM overlay PNG per image here.")
    flags.DEFINE_enum("cam_method", "gradcam", gradcam.METHODS, "CAM weighting for --cam_dir.")
    flags.DEFINE_integer("batch_size", 32, "Images decoded and predicted at a time.")
    flags.DEFINE_string(
        "mask_dir", None, "Segmentation runs: where masks go (default: a 'masks' folder beside --output)."
    )
    flags.DEFINE_bool("probabilities", False, "Segmentation runs: also write probability maps.")


def main(argv: list[str]) -> None:
    cli.setup()
    f, paths = flags.FLAGS, argv[1:]
    if not paths:
        raise SystemExit("medjax.predict: give at least one image file or folder after the flags.")
    files = find_images(paths)
    if not files:
        raise SystemExit(f"medjax.predict: no image files found under {', '.join(paths)}.")
    try:
        model = run_dir.load_run(f.workdir)
    except MedjaxError as e:
        raise SystemExit(f"medjax: error: {e}") from None
    if model.config.task == "segmentation":
        mask_dir = f.mask_dir or Path(f.output).parent / "masks"
        rows = seg_predict.predict_files(model, files, out_dir=mask_dir, with_probs=f.probabilities)
    else:
        rows = predict_files(
            model, files, batch_size=f.batch_size, cam_dir=f.cam_dir, cam_method=f.cam_method
        )
    write_csv(rows, f.output)
    predicted = sum(not row["error"] for row in rows)
    print(f"Predicted {predicted} of {len(rows)} files; CSV: {f.output}")
    if predicted == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
