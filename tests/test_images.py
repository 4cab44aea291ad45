"""Decoding rules of medjax.data.images, pinned on generated files of every awkward flavour."""

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medjax.data import images


def write_dicom(path, raw, *, slope=1.0, intercept=0.0, window=None, photometric="MONOCHROME2"):
    """Writes a minimal single-frame 16-bit grey DICOM file with pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = raw.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_16bit_png_is_min_max_scaled(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)).save(path)
    out = images.decode_image(path, channels=1)
    # (v - 0) / 4000 * 255 rounded: 0, 63.75, 127.5, 255.
    np.testing.assert_array_equal(out[..., 0], [[0, 64], [128, 255]])


def test_rgba_is_composited_on_black(tmp_path):
    path = tmp_path / "rgba.png"
    pixels = np.array(
        [[[200, 100, 50, 128], [10, 20, 30, 255]], [[255, 255, 255, 0], [0, 0, 0, 255]]], np.uint8
    )
    Image.fromarray(pixels, "RGBA").save(path)
    out = images.decode_image(path, channels=3)
    # colour * alpha / 255, rounded: 200*128/255 = 100.4, 100*128/255 = 50.2, 50*128/255 = 25.1.
    np.testing.assert_array_equal(out[0, 0], [100, 50, 25])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])


def test_palette_transparency_and_la(tmp_path):
    palette_path, la_path = tmp_path / "palette.png", tmp_path / "la.png"
    img = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.save(palette_path, transparency=0)
    np.testing.assert_array_equal(images.decode_image(palette_path), [[[0, 0, 0], [0, 255, 0]]])
    Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8), "LA").save(la_path)
    np.testing.assert_array_equal(images.decode_image(la_path, channels=1)[..., 0], [[200, 0]])


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # Left half white, stored 20 wide x 10 high.
    exif = Image.Exif()
    exif[0x0112] = 6  # "Rotate 90 CW to display".
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    out = images.decode_image(path, channels=1)
    assert out.shape == (20, 10, 1)  # Displayed portrait: the stored left half is now the top half.
    assert out[:8].min() > 200 and out[12:].max() < 50


def test_grey_rgb_bmp_tiff_and_channel_conversion(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    for suffix in ("png", "bmp", "tiff"):
        Image.fromarray(rgb).save(tmp_path / f"x.{suffix}")
        np.testing.assert_array_equal(images.decode_image(tmp_path / f"x.{suffix}"), rgb)
    # ITU-R 601-2 luma of pure red: 255 * 299 / 1000 = 76.2.
    assert images.decode_image(tmp_path / "x.png", channels=1)[0, 0, 0] == 76
    Image.fromarray(np.full((2, 3), 7, np.uint8)).save(tmp_path / "grey.png")
    out = images.decode_image(tmp_path / "grey.png", channels=3)
    assert out.shape == (2, 3, 3) and (out == 7).all()
    Image.fromarray(np.array([[1, 0]], bool)).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(
        images.decode_image(tmp_path / "bilevel.png", channels=1)[..., 0], [[255, 0]]
    )


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.array([[300, 500], [550, 600]])
    # slope 2, intercept -1000 -> [[-400, 0], [100, 200]]; window (0, 400) spans [-200, 200].
    write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-1000.0, window=(0, 400))
    np.testing.assert_array_equal(
        images.decode_image(tmp_path / "a.dcm", channels=1)[..., 0], [[0, 128], [191, 255]]
    )
    write_dicom(tmp_path / "b", raw, slope=2.0, intercept=-1000.0, window=(0, 400), photometric="MONOCHROME1")
    np.testing.assert_array_equal(
        images.decode_image(tmp_path / "b", channels=1)[..., 0], [[255, 127], [64, 0]]
    )
    # An explicit window overrides the file's; no window in the file falls back to min-max.
    out = images.decode_image(tmp_path / "a.dcm", channels=1, window=(100, 200))  # spans [0, 200].
    np.testing.assert_array_equal(out[..., 0], [[0, 0], [128, 255]])
    write_dicom(tmp_path / "c.dcm", raw)
    np.testing.assert_array_equal(
        images.decode_image(tmp_path / "c.dcm", channels=1)[..., 0], [[0, 170], [212, 255]]
    )


def test_bad_files_raise_errors_naming_the_file(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(good, format="PNG")
    cases = {
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
        "notes.txt": (b"not an image at all\n", "not an image"),
        "empty.png": (b"", "empty file"),
        "broken.dcm": (b"\0" * 128 + b"DICM" + b"garbage", "DICOM"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(images.ImageDecodeError, match=reason) as info:
            images.decode_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize(
    "policy, expected_column",
    [("stretch", [255] * 10), ("crop", [255] * 10), ("pad", [0] * 4 + [255] * 2 + [0] * 4)],
)
def test_resize_policies(policy, expected_column):
    wide = np.full(
        (10, 40, 1), 255, np.uint8
    )  # 4:1 white strip: padding keeps a 10x2.5 -> 10x2 band in the middle.
    out = images.resize_image(wide, size=10, policy=policy)
    assert out.shape == (10, 10, 1)
    np.testing.assert_array_equal(out[:, 5, 0] > 127, np.array(expected_column) > 127)


def test_png_round_trip_and_pixel_hash(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (12, 9, 3), np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(images.encode_png(rgb))))
    np.testing.assert_array_equal(decoded, rgb)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, np.full((12, 9, 1), 255, np.uint8)], -1), "RGBA").save(
        tmp_path / "a.png"
    )
    spec = images.ImageSpec(size=8, channels=3)
    png_rgb, hash_rgb, _ = images.prepare_file(tmp_path / "rgb.png", spec)
    _, hash_rgba, _ = images.prepare_file(tmp_path / "a.png", spec)
    assert hash_rgb == hash_rgba  # Same pixels, different encodings: one duplicate group.
    assert hash_rgb != images.pixel_hash(rgb[::-1])
    assert np.asarray(Image.open(io.BytesIO(png_rgb))).shape == (8, 8, 3)
