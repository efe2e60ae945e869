"""Decoding images: upright by EXIF wherever pixels are read, deep images converted in bounded memory,
the pixel limit read from the header, large JPEGs decoded scaled down."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from peftvision.data import load_task, open_image
from peftvision.data.images import FileSource, ImageTooLargeError, decode_image, decode_size, to_rgb
from peftvision.errors import DataError

# EXIF orientation -> the transpose that shows the stored pixels upright (the EXIF 2.3 table)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # what a camera stored


def _upright() -> Image.Image:
    """A 30 x 20 picture that no flip or turn maps onto itself, smooth enough for JPEG to keep."""
    y, x = np.mgrid[0:20, 0:30]
    return Image.fromarray(np.stack([8 * x, 12 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8))


def _stored(orientation: int, fmt: str = "PNG") -> bytes:
    """The upright picture as a camera stores it with `orientation`, tagged."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _upright().transpose(INVERSE[orientation]).save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_decodes_upright(orientation, tmp_path):
    assert Image.open(io.BytesIO(_stored(orientation))).transpose(UPRIGHT[orientation]).tobytes() == _upright().tobytes()
    want = np.asarray(_upright())
    assert np.array_equal(np.asarray(decode_image(_stored(orientation))), want)  # serve
    path = tmp_path / "photo.png"
    path.write_bytes(_stored(orientation))
    assert np.array_equal(np.asarray(open_image(path)), want)  # predict, explain
    assert np.array_equal(np.asarray(FileSource([path]).load(0)), want)  # training data read by path
    jpeg = np.asarray(decode_image(_stored(orientation, "JPEG")), dtype=np.int16)
    assert jpeg.shape == want.shape and np.abs(jpeg - want).mean() < 20  # lossy, but the right way up


def test_an_image_folder_task_trains_on_upright_photos(tmp_path):
    """Training and serving agree: a photo folder (imagefolder:) reads sideways photos upright."""
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(_stored(6))
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    image, _ = task.dataset("test", transform=lambda img: img)[0]
    assert np.array_equal(np.asarray(image), np.asarray(_upright()))


def test_the_pixel_limit_is_read_from_the_header():
    big = io.BytesIO()
    Image.new("L", (3000, 2000)).save(big, format="PNG")
    with pytest.raises(ImageTooLargeError, match=r"3000x2000 pixels, over the limit of 5,000,000"):
        decode_image(big.getvalue(), max_pixels=5_000_000)
    assert decode_image(big.getvalue(), max_pixels=6_000_000).size == (3000, 2000)
    assert issubclass(ImageTooLargeError, DataError)  # one clear line in the CLI, 413 in serve


def test_large_jpegs_decode_scaled_down_but_never_below_the_size_asked():
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1700, 3), dtype=np.uint8)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).size == (1700, 1200)
    small = decode_image(buf.getvalue(), size=248)
    assert small.size == (425, 300)  # 1/4: the largest scale that keeps both sides >= 248
    assert min(decode_image(buf.getvalue(), size=700).size) >= 700
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1700, 3), dtype=np.uint8)).save(png, format="PNG")
    assert decode_image(png.getvalue(), size=248).size == (1700, 1200)  # not a JPEG: decoded whole


def test_decode_size_reads_the_transform():
    import timm

    from peftvision.data import make_transform

    model = timm.create_model("test_vit", pretrained=False, img_size=64)
    assert decode_size(make_transform(model, resize="crop")) == int(64 / model.pretrained_cfg["crop_pct"])
    assert decode_size(make_transform(model, resize="squash")) == 64
    assert decode_size(lambda img: img) is None


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16", [0, 255, 256, 65535, 32768], [0, 0, 1, 255, 128]),  # the top byte
        ("I", [0, 200, 255, 7], [0, 200, 255, 7]),  # int32 within 8 bits: as it is
        ("I", [0, 65535, 256, 70000], [0, 255, 1, 255]),  # over 255: read as 16-bit
        ("F", [0.0, 0.5, 1.0, 0.25], [0, 128, 255, 64]),  # floats in [0, 1]
        ("F", [-5.0, 3.0, 300.0, 254.6], [0, 3, 255, 255]),  # other floats: clipped
    ],
)
def test_deep_images_convert_to_8_bit(mode, values, expected):
    img = Image.new(mode, (len(values), 1))
    img.putdata(values)
    assert list(np.asarray(to_rgb(img))[0, :, 0]) == expected


@pytest.mark.parametrize("mode, dtype", [("I;16", np.uint16), ("F", np.float32)])
def test_deep_images_convert_in_bounded_memory(mode, dtype):
    """numpy's peak while converting a 16 MP deep image: one writable copy and the 8-bit result (widening
    a 16-bit image to uint32 first, as before, peaked at over 8 bytes a pixel)."""
    pixels = 4000 * 4000
    img = Image.fromarray(np.full((4000, 4000), 300, dtype=dtype))
    tracemalloc.start()
    try:
        to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    item = np.dtype(dtype).itemsize
    assert peak < (item + 1) * pixels + 3 * pixels + 1_000_000, f"{peak / pixels:.1f} bytes a pixel"
