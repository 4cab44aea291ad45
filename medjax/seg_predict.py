"""Masks for new images or volumes from a trained segmentation run (``python -m medjax.predict``).

2-D files (PNG, JPEG, BMP, TIFF, DICOM) are decoded like the run's data, normalised and padded exactly as
its evaluation (:func:`medjax.data.seg_transforms.build_eval_transforms`), predicted whole at native
resolution, and cropped back. Each gives ``<out>/<row>_<stem>_mask.png``: the class index per pixel
(0 = background, as ``seg_folder``'s ``label_mode='labels'`` reads it back), and with
``probabilities=True`` ``<row>_<stem>_prob.png`` (binary: the positive class's probability x 255) or
``<stem>_prob.npy`` (several classes: float16 (H, W, K)).

NIfTI volumes (``.nii``, ``.nii.gz``) are cut into slices as ``nifti_volumes`` prepares them (third voxel
axis, each slice transposed, intensities by the run's ``intensity`` rule, in-plane resampling undone on
the probabilities), predicted slice by slice and written back as ``<row>_<stem>_mask.nii.gz`` (uint8) with the
**source affine and header**, so the mask overlays the scan in any viewer; ``probabilities=True`` adds
``<row>_<stem>_prob.nii.gz`` (float32; binary: the positive class, else one volume per class on a 4th axis).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medjax import inference, metrics, run_dir
from medjax.data import images, seg_transforms
from medjax.data.builders import nifti_volumes

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:  # '.nii.gz' before '.nii'.
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def probabilities(model: run_dir.TrainedModel, planes: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """``(N, H, W, K)`` class probabilities of uint8 ``(N, H, W, C)`` images of one size, preprocessed and
    padded as the run's evaluation, cropped back to ``(H, W)``."""
    h, w = planes.shape[1:3]
    steps = seg_transforms.build_eval_transforms(model.config.data, shape=(h, w))
    inputs = []
    for plane in planes:
        element = {"image": plane, "label": np.zeros((h, w), np.uint8), "valid": np.ones((h, w), np.uint8)}
        for step in steps:
            element = step.map(element)
        inputs.append(element["image"])
    (logits,) = inference.map_batches(
        lambda x: (model.logits_fn(model.variables, x),), np.stack(inputs), batch_size=batch_size
    )
    return metrics.probabilities(logits[:, :h, :w])


def _save_probability_png(path: Path, probs: np.ndarray) -> str:
    if probs.shape[-1] == 2:
        Image.fromarray(np.round(probs[..., 1] * 255).astype(np.uint8)).save(path.with_suffix(".png"))
        return str(path.with_suffix(".png"))
    np.save(path.with_suffix(".npy"), probs.astype(np.float16))
    return str(path.with_suffix(".npy"))


def predict_image(model, path: Path, out: Path, *, with_probs: bool) -> dict[str, str]:
    """A 2-D file's mask (and probabilities): ``out`` + ``_mask.png`` (``_prob.png`` / ``.npy``)."""
    image = images.decode_image(path, channels=model.config.data.channels)
    probs = probabilities(model, image[None])[0]
    mask = probs.argmax(-1).astype(np.uint8)
    row = {"mask": f"{out}_mask.png"}
    Image.fromarray(mask).save(row["mask"])
    if with_probs:
        row["probabilities"] = _save_probability_png(Path(f"{out}_prob"), probs)
    row["foreground_fraction"] = f"{(mask > 0).mean():.6g}"
    return row


def _resize(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (H, W) or uint8 (H, W, 1) plane to ``shape`` (H, W)."""
    grey = plane.ndim == 3
    resized = Image.fromarray(plane[..., 0] if grey else plane).resize(shape[::-1], Image.Resampling.BILINEAR)
    out = np.asarray(resized)
    return out[..., None] if grey else out


def _model_grid(model, shape: tuple[int, int], zooms: Sequence[float]) -> tuple[int, int]:
    """The in-plane size slices were resampled to when the run's dataset was prepared."""
    kwargs = dict(model.config.data.builder_kwargs) if model.config.data.name == "nifti_volumes" else {}
    resample = kwargs.get("resample", "none")
    if resample == "size":
        size = int(kwargs.get("image_size", 224))
        return size, size
    if resample == "spacing":
        ty, tx = kwargs.get("target_spacing", (1.0, 1.0))
        return max(1, round(shape[0] * zooms[1] / ty)), max(1, round(shape[1] * zooms[0] / tx))
    return shape


def predict_volume(model, path: Path, out: Path, *, with_probs: bool) -> dict[str, str]:
    """A NIfTI volume's mask (and probabilities) as NIfTI with the source affine: ``out`` +
    ``_mask.nii.gz`` (``_prob.nii.gz``)."""
    import nibabel as nib

    source = nib.load(path)
    data = np.asarray(source.dataobj, dtype=np.float32)
    data_cfg = model.config.data
    # A run trained on 2-D images sees a volume's slices with per-volume percentile scaling (MRI's rule).
    kwargs = (
        dict(data_cfg.builder_kwargs) if data_cfg.name == "nifti_volumes" else {"intensity": "percentile"}
    )
    config = nifti_volumes.NiftiConfig(name="predict", **kwargs)
    if data.ndim == 4:
        data = data[..., config.channel]
    volume = nifti_volumes.volume_to_uint8(data, config)
    zooms = source.header.get_zooms()[:3]
    native = (volume.shape[1], volume.shape[0])  # A slice is transposed: rows follow the 2nd voxel axis.
    grid = _model_grid(model, native, zooms)
    planes = np.stack(
        [_resize(np.ascontiguousarray(volume[:, :, k].T)[..., None], grid) for k in range(volume.shape[2])]
    )
    probs = probabilities(model, planes)
    if grid != native:
        probs = np.stack(
            [np.stack([_resize(p[..., c], native) for c in range(p.shape[-1])], -1) for p in probs]
        )
    probs = probs.transpose(2, 1, 0, 3)  # (slice, row, col, K) -> voxel axes (x, y, z, K).
    mask = probs.argmax(-1).astype(np.uint8)
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    row = {"mask": f"{out}_mask.nii.gz"}
    nib.Nifti1Image(mask, source.affine, header).to_filename(row["mask"])
    if with_probs:
        values = probs[..., 1] if probs.shape[-1] == 2 else probs
        prob_header = source.header.copy()
        prob_header.set_data_dtype(np.float32)
        row["probabilities"] = f"{out}_prob.nii.gz"
        nib.Nifti1Image(values.astype(np.float32), source.affine, prob_header).to_filename(
            row["probabilities"]
        )
    row["foreground_fraction"] = f"{(mask > 0).mean():.6g}"
    return row


def predict_files(
    model: run_dir.TrainedModel, paths: Sequence[Path], *, out_dir: str | Path, with_probs: bool = False
) -> list[dict[str, str]]:
    """CSV rows ``path, mask, [probabilities,] foreground_fraction, error`` for ``paths``; a file that
    cannot be read is reported in its row and on stderr, and the others still run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, path in enumerate(map(Path, paths)):
        row = {"path": str(path), "mask": ""} | ({"probabilities": ""} if with_probs else {})
        row |= {"foreground_fraction": "", "error": ""}
        try:
            predict = predict_volume if is_nifti(path) else predict_image
            row |= predict(model, path, out / f"{i:05d}_{_stem(path)}", with_probs=with_probs)
        except (images.ImageDecodeError, OSError, ValueError) as e:
            row["error"] = str(e)
            print(f"medjax.predict: skipped {path}: {e}", file=sys.stderr)
        rows.append(row)
    return rows
