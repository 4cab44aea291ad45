"""Robust decoding of real-world medical image files into fixed-size uint8 arrays and PNG bytes.

Public archives mix every flavour Pillow knows (8/16-bit PNG, palette, RGBA, rotated phone JPEGs) plus
DICOM. Builders need one answer for all of them: a ``(H, W, C)`` uint8 array with ``C`` in {1, 3}, or a
clear :class:`ImageDecodeError` naming the file. Rules chosen here (documented because studies are silent):

* EXIF orientation is applied (``ImageOps.exif_transpose``): phone photos of skin lesions are stored
  rotated and a model must see what the clinician saw.
* Alpha (RGBA, LA, palette with transparency) is composited on **black**, so transparent borders of CT
  slices become the black background they stand for, instead of whatever colour the hidden pixels hold.
* High bit depth (16-bit/32-bit integer, float) is scaled to 8 bits by **per-image min-max**: medical
  16-bit PNGs often use only 10-12 bits, so a fixed ``/257`` would give near-black images. NaN and
  infinite pixels (float TIFFs mark missing data so) are left out of the min-max and become black; a file
  with no finite pixel is rejected.
* File names need not be UTF-8 (archives from other systems hold Latin-1 or Shift-JIS names):
  :func:`printable` turns a path into text that every writer accepts (undecodable bytes as ``\\xNN``),
  which is what ids, messages, reports and CSVs carry.
* DICOM: modality rescale (slope/intercept), then the window from ``window=(center, width)`` if given,
  else the file's first WindowCenter/WindowWidth, else min-max; MONOCHROME1 is inverted so that higher
  values are brighter, as in MONOCHROME2.
* Colour to grey uses Pillow's ITU-R 601-2 luma; grey to colour repeats the channel.
* Multi-frame files (GIF, TIFF stacks) use their first frame; multi-frame DICOM is rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medjax.data import near_duplicates
from medjax.errors import DataError

RESIZE_POLICIES = ("stretch", "pad", "crop")
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_TO_RGB_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


class ImageDecodeError(DataError):
    """A file could not be turned into an image; the message names the file and the reason."""


def printable(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: bytes of a non-UTF-8 file name appear as ``\\xNN`` escapes.

    Python holds such names with surrogate escapes, which UTF-8 writers (TFDS text features, CSV and JSON
    files, a UTF-8 terminal) refuse; this keeps the name readable and unique instead.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def decode_image(
    path: str | os.PathLike, *, channels: int = 3, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Decodes any supported image file to a ``(H, W, channels)`` uint8 array.

    Args:
      path: image file (PNG, JPEG, BMP, TIFF, GIF, ... anything Pillow reads, or DICOM).
      channels: 1 (grey) or 3 (RGB).
      window: DICOM display window ``(center, width)`` in rescaled units; ignored for other formats.

    Returns:
      The image as uint8 with the module's orientation, alpha and bit-depth rules applied.

    Raises:
      ImageDecodeError: empty, truncated or corrupt file, not an image, or an unsupported mode.
    """
    path = Path(path)
    shown = printable(path)
    _check_channels(channels)
    try:
        with path.open("rb") as file:
            head = file.read(132)
    except OSError as e:
        raise ImageDecodeError(f"{shown}: cannot read file ({e})") from e
    if not head:
        raise ImageDecodeError(f"{shown}: empty file (0 bytes)")
    if head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES:
        grey_or_rgb = _decode_dicom(path, window)
    else:
        grey_or_rgb = _decode_pillow(path)
    return to_channels(grey_or_rgb, channels)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _decode_pillow(path: Path) -> np.ndarray:
    """Returns a (H, W) or (H, W, 3) uint8 array, alpha composited on black."""
    shown = printable(path)
    try:
        with Image.open(path) as img:
            img.load()  # Force decoding now so truncation surfaces here, not in a later convert().
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{shown}: not an image file (Pillow cannot identify its format)") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{shown}: image too large for Pillow's decompression-bomb limit ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{shown}: truncated or corrupt image data ({e})") from e
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return _min_max_to_uint8(np.asarray(img), path)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # Honours palette transparency (tRNS) as alpha.
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        arr = np.asarray(img).astype(np.uint16)
        colour, alpha = arr[..., :-1], arr[..., -1:]
        out = ((colour * alpha + 127) // 255).astype(np.uint8)
        return out[..., 0] if mode == "LA" else out
    if mode in _TO_RGB_MODES:
        return np.asarray(img.convert("RGB"))
    if mode in ("L", "RGB"):
        return np.asarray(img)
    raise ImageDecodeError(f"{shown}: unsupported image mode {mode!r}")


def _decode_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    import pydicom  # Imported lazily: most datasets never contain DICOM.

    shown = printable(path)

    try:
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many unrelated types for bad files.
        raise ImageDecodeError(f"{shown}: unreadable DICOM or no pixel data ({e})") from e
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError(f"{shown}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return pixels if pixels.dtype == np.uint8 else _min_max_to_uint8(pixels, path)
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1)
    values += float(ds.get("RescaleIntercept", 0) or 0)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if window is None:
        out = _min_max_to_uint8(values, path)
    else:
        center, width = window
        low = center - width / 2.0
        out = np.round(np.clip((values - low) / max(width, 1e-6), 0.0, 1.0) * 255.0).astype(np.uint8)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        out = 255 - out
    return out


def _first(value) -> float:
    """DICOM window tags may hold several presets; the first one is the default."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def _min_max_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    """Scales the finite pixels' range to 0-255; non-finite pixels become 0 (see the module docstring)."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageDecodeError(f"{printable(path)}: no finite pixel value (all NaN or infinite)")
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.round((np.where(finite, values, low) - low) * (255.0 / (high - low)))
    return np.where(finite, scaled, 0).astype(np.uint8)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Converts a (H, W), (H, W, 1) or (H, W, 3) uint8 array to (H, W, channels)."""
    _check_channels(channels)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        grey = image
    elif image.ndim == 3 and image.shape[-1] == 3:
        if channels == 3:
            return image
        grey = np.asarray(Image.fromarray(image, "RGB").convert("L"))
    else:
        raise ValueError(f"expected a grey or RGB image, got shape {image.shape}")
    return grey[..., None] if channels == 1 else np.repeat(grey[..., None], 3, axis=-1)


def resize_image(image: np.ndarray, *, size: int, policy: str = "stretch") -> np.ndarray:
    """Resizes a (H, W, C) uint8 image to (size, size, C).

    Pillow's bilinear filter widens its support when shrinking, so it averages like an area filter and
    does not alias. Policies: ``stretch`` ignores the aspect ratio; ``pad`` fits the longer side and pads
    with black (keeps the whole field of view); ``crop`` fits the shorter side and centre-crops.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    target, bilinear = (size, size), Image.Resampling.BILINEAR
    if policy == "stretch":
        pil = pil.resize(target, bilinear)
    elif policy == "pad":
        pil = ImageOps.pad(pil, target, method=bilinear, color=0)
    else:
        pil = ImageOps.fit(pil, target, method=bilinear)
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out


def encode_png(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encodes a (H, W, 1|3) uint8 array as PNG bytes (what ``tfds.features.Image`` stores without TF).

    Level 1 is about as small as level 6 for medical images and several times faster to write.
    """
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def pixel_hash(image: np.ndarray) -> str:
    """Content hash of decoded pixels (shape included): equal hashes mean identical images."""
    digest = hashlib.sha1(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What every stored image looks like: ``size`` x ``size`` x ``channels`` after ``resize``."""

    size: int
    channels: int
    resize: str = "stretch"
    window: tuple[float, float] | None = None


class PreparedImage(NamedTuple):
    """What a builder keeps of one source image: the stored PNG and the two keys of duplicate finding."""

    png: bytes
    pixel_hash: str  # Exact copies (:func:`pixel_hash` at native resolution).
    fingerprint: np.ndarray  # Near copies (:func:`medjax.data.near_duplicates.thumbnail`).


def prepare_array(image: np.ndarray, spec: ImageSpec) -> PreparedImage:
    """The stored PNG, pixel hash and near-duplicate fingerprint of a decoded uint8 image.

    Hash and fingerprint are taken at native resolution after channel conversion, so byte-identical
    files and re-encodings of the same pixels (RGB vs RGBA with opaque alpha) fall into one duplicate
    group whatever size the dataset is stored at.
    """
    image = to_channels(image, spec.channels)
    png = encode_png(resize_image(image, size=spec.size, policy=spec.resize))
    return PreparedImage(png, pixel_hash(image), near_duplicates.thumbnail(image))


def prepare_file(path: str | os.PathLike, spec: ImageSpec) -> PreparedImage:
    """Decodes ``path`` and prepares it (:func:`prepare_array`); raises :class:`ImageDecodeError`."""
    return prepare_array(decode_image(path, channels=spec.channels, window=spec.window), spec)


def try_prepare_file(path: str | os.PathLike, spec: ImageSpec) -> tuple[PreparedImage | None, str | None]:
    """:func:`prepare_file` returning ``(result, None)`` or ``(None, error message)``, for batch scans."""
    try:
        return prepare_file(path, spec), None
    except ImageDecodeError as e:
        return None, str(e)
