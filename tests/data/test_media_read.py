"""Media reads: images as displayed (16-bit grayscale, EXIF orientation), a time limit on every read
(a FIFO, a server that accepts and never answers), failures named by what happened (connection
refused, no credentials), shapes the processor refuses caught as bad data, relative paths without
a data_path refused."""
from __future__ import annotations

import os
import socket
import time

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.data.batch.count import image_size
from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.media.read import open_image, resolve_media
from tests.conftest import load_processor

# ----------------------------------------------------------------------------- pixels as displayed

def test_16_bit_grayscale_png_keeps_its_grey_levels(tmp_path):
    # A horizontal ramp over the whole 16-bit range: convert("RGB") alone clips every value above 255.
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # the case this test is about
    pixels = np.asarray(open_image(str(path)))
    assert pixels.shape == (8, 64, 3) and pixels.dtype == np.uint8
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (pixels[..., 0] == expected).all() and (pixels[..., 1] == expected).all()
    assert (pixels == 255).mean() < 0.05  # was 99.5 % white


def test_exif_orientation_is_applied_in_pixels_and_in_the_counted_size(tmp_path):
    # Stored: 40 wide, 20 high, red left half, blue right half; orientation 6 = show turned 90° clockwise.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    shown = np.asarray(open_image(str(path)))
    assert shown.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high
    # Turned clockwise, the stored left (red) half is on top, the right (blue) half at the bottom.
    assert (shown[:20] == (255, 0, 0)).all() and (shown[20:] == (0, 0, 255)).all()
    assert image_size(str(path)) == (40, 20)  # the length count sees the displayed size too


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_trained_as_the_processor_serves_them(tmp_path, tiny_model_dir, mode):
    # Left half opaque red (grey for LA), right half fully transparent storing black: convert("RGB") kept
    # the black, while the processor (transformers' convert_to_rgb) and qwen-vl-utils show white there.
    if mode == "P":
        image = Image.new("P", (56, 56), 0)
        image.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        image.paste(1, (28, 0, 56, 56))
        image.info["transparency"] = 1  # palette index 1 (black) is transparent
    else:
        opaque, clear = ((255, 0, 0, 255), (0, 0, 0, 0)) if mode == "RGBA" else ((90, 255), (0, 0))
        image = Image.new(mode, (56, 56), clear)
        image.paste(opaque, (0, 0, 28, 56))
    path = tmp_path / f"{mode}.png"
    image.save(path)
    shown = np.asarray(open_image(str(path)))
    assert (shown[:, 28:] == 255).all()  # the transparent half is white, as served
    processor = load_processor(tiny_model_dir("qwen2_5_vl")).image_processor
    served = processor(images=[Image.open(path)], return_tensors="pt")["pixel_values"]
    trained = processor(images=[open_image(str(path))], return_tensors="pt")["pixel_values"]
    assert torch.equal(served, trained)


# ----------------------------------------------------------------------------- time limits

def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes, forever
    for read in (lambda: open_image(str(fifo), timeout_s=5), lambda: image_size(str(fifo), timeout_s=5)):
        with pytest.raises(DataError, match="not a regular file") as err:
            read()
        assert err.value.kind is DataKind.MEDIA_UNREACHABLE and err.value.origin.media == str(fifo)


def test_an_image_url_that_never_answers_stops_at_the_time_limit(silent_server):
    pytest.importorskip("aiohttp")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"took longer than the 0.5 s limit.*--media_timeout") as err:
        open_image(f"{silent_server}/cat.png", origin="dataset 'web', record 0", timeout_s=0.5)
    assert err.value.kind is DataKind.MEDIA_TIMEOUT and "record 0" in str(err.value)
    assert time.monotonic() - start < 60  # it hung for more than 480 s before the limit


def test_a_refused_connection_says_so_not_not_found():
    pytest.importorskip("aiohttp")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(DataError) as err:
        open_image(f"http://127.0.0.1:{port}/cat.png", timeout_s=30)
    assert "connection refused" in str(err.value) and "not found" not in str(err.value)
    assert err.value.kind is DataKind.MEDIA_UNREACHABLE


class NoCredentialsError(Exception):
    """What botocore raises when no AWS credentials are found (not an OSError)."""


class _NoCredentialsFS(fsspec.AbstractFileSystem):
    """A storage whose every read fails as s3fs does without credentials."""

    protocol = "nocreds"

    def _open(self, path, mode="rb", **kwargs):
        raise NoCredentialsError("Unable to locate credentials")


def test_a_storage_error_of_any_type_is_bad_data_naming_the_credentials():
    fsspec.register_implementation("nocreds", _NoCredentialsFS, clobber=True)
    with pytest.raises(DataError, match=r"NoCredentialsError: Unable to locate credentials.*credentials") as err:
        open_image("nocreds://bucket/cat.png")
    assert err.value.kind is DataKind.MEDIA_UNREACHABLE
    with pytest.raises(DataError):
        image_size("nocreds://bucket/cat.png")


# ----------------------------------------------------------------------------- what the processor refuses

def test_an_extreme_aspect_ratio_is_bad_data_not_a_processor_value_error(tmp_path, tiny_model_dir):

    path = tmp_path / "strip.png"
    Image.new("RGB", (250, 1), (9, 9, 9)).save(path)
    processor = load_processor(tiny_model_dir("qwen2_5_vl"))
    with pytest.raises(ValueError) as raw:  # what training met before: not a DataError, so never skipped
        processor.image_processor(images=[Image.open(path).convert("RGB")])
    assert not isinstance(raw.value, DataError)
    for read in (open_image, image_size):
        with pytest.raises(DataError, match=r"250x1, more than 200:1") as err:
            read(str(path))
        assert err.value.kind is DataKind.BAD_IMAGE


def test_a_relative_media_path_without_data_path_names_data_path():
    with pytest.raises(DataError, match=r"relative but the dataset has no data_path.*'data_path'") as err:
        resolve_media("images/cat.png", "", origin="dataset 'd', record 0")
    assert err.value.kind is DataKind.CONFIG
    assert resolve_media("images/cat.png", "/data") == "/data/images/cat.png"


def test_an_empty_or_garbage_image_file_is_named_without_a_memory_address(tmp_path):
    """A 0-byte file (a failed download) says so; PIL's own message named its stream with an address
    ('<_io.BytesIO object at 0x7f...>') that differs on every run."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"not an image\n")
    with pytest.raises(DataError, match=r"record 3: cannot read image .*empty.png: the file is empty \(0 bytes\)"):
        open_image(str(tmp_path / "empty.png"), "record 3")
    with pytest.raises(DataError) as err:
        open_image("file://" + str(tmp_path / "garbage.png"), "record 4")
    assert err.value.kind is DataKind.BAD_IMAGE
    assert "UnidentifiedImageError: cannot identify image file. Fix:" in str(err.value) and "0x" not in str(err.value)
