"""Decoding pixels correctly: 8/16-bit grey and colour and float TIFF images reach the model in
[0, 1], scaled by their real bit depth; what cannot be decoded is refused clearly."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from adlib.data import DataError, load_sample

RAMP16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


def _expected8(values16: np.ndarray) -> np.ndarray:
    return np.rint(values16 / 65535.0 * 255).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_by_its_bit_depth_not_clipped(tmp_path, suffix):
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(RAMP16).save(path)
    assert Image.open(path).mode.startswith("I;16")
    pixels, _ = load_sample(str(path), "", 32)
    assert pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(pixels[..., 0].astype(int), _expected8(RAMP16).astype(int), atol=1)
    assert pixels.min() == 0 and pixels.max() >= 254 and len(np.unique(pixels)) > 200  # not all white


def test_a_tiff_bits_per_sample_tag_sets_the_scale():
    from adlib.data.images import _bit_depth

    class Tiff12:  # what Pillow exposes for a 12-bit TIFF written by libtiff (Pillow cannot write one)
        mode, tag_v2 = "I;16", {258: (12,)}

    values = np.array([[0, 4095]])
    assert _bit_depth(Tiff12(), values) == 12
    assert _bit_depth(Image.fromarray(np.array([[0, 300]], np.int32)), values) == 16  # "I" mode: by the values


def test_16_bit_colour_png_and_8_bit_images_decode(tmp_path):
    h = w = 8
    raw = b"".join(b"\x00" + np.full((w, 3), 40000, dtype=">u2").tobytes() for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    pixels, _ = load_sample(str(tmp_path / "rgb16.png"), "", 8)
    assert abs(int(pixels.mean()) - round(40000 / 65535 * 255)) <= 1
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "grey8.png")
    assert load_sample(str(tmp_path / "grey8.png"), "", 8)[0].min() == 200


def test_float_tiff_in_unit_range_decodes_and_out_of_range_is_refused(tmp_path):
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "unit.tif")
    pixels, _ = load_sample(str(tmp_path / "unit.tif"), "", 8)
    assert pixels.min() == 0 and pixels.max() == 255
    Image.fromarray(np.full((8, 8), 1000.0, np.float32)).save(tmp_path / "raw.tif")
    with pytest.raises(DataError, match=r"raw\.tif.*intensities in \[0, 1\].*1000"):
        load_sample(str(tmp_path / "raw.tif"), "", 8)
