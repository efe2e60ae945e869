"""Image sources: where a task's pixels live (arrays, files, an HF dataset) and how they become RGB.

A source only decodes when asked for one image, so that decoding runs in DataLoader workers. Every
failure to read an image raises `DataError` naming the file (or row), since a bare PIL traceback from a
worker does not say which of 20,000 files is broken.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

# What an image folder may hold; anything else (README, .DS_Store, metadata) is not an image.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class ImageTooLargeError(DataError):
    """An image whose header claims more pixels than the caller allows (HTTP 413 in `serve`)."""


class ImageSource(Protocol):
    """Random access to the images of one pool; `load` runs inside DataLoader workers."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image:
        """Image `i` as RGB, or DataError naming it."""
        ...

    def check(self, i: int) -> None:
        """Cheap test (header only) that image `i` can be read, so that load_task fails early."""
        ...


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image: every backbone takes 3 channels, whatever the file held (L, P, RGBA, 16-bit,
    float). Deep images go through one writable array converted in place, so a 16-bit file costs about 5
    bytes a pixel on the way instead of the 11 that widening to uint32 took."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = Image.fromarray(_to_uint8(np.array(img)))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when such a palette goes straight to RGB
    return img.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit values keep their top byte; int32 over 255 is read as 16-bit (TIFF, old PNG decoders);
    floats in [0, 1] are scaled to 255, any other float is clipped to [0, 255]."""
    if a.dtype.kind == "f":
        if a.size and float(np.nanmax(a)) <= 1.0:
            np.multiply(a, 255, out=a)
        a[np.isnan(a)] = 0  # (np.nan_to_num takes 5 bytes a pixel more)
        np.clip(a, 0, 255, out=a)
        return np.rint(a, out=a).astype(np.uint8)
    if a.dtype.itemsize == 2 or (a.size and int(a.max()) > 255):
        np.right_shift(a, 8, out=a)
    np.clip(a, 0, 255, out=a)
    return a.astype(np.uint8)


# What `serve` decodes from strangers: the formats photos come in, each sized by its header before any
# pixel is read. Formats that decode while opening (ICO, ICNS, EPS, ...) are refused before that happens.
SERVE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says (in place): a phone photo stored sideways is seen the
    way it was taken, in training, `predict`, `explain` and `serve` alike."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


def _decode(
    src: str | os.PathLike | io.BytesIO, name: str, max_pixels: int | None = None, size: int | None = None,
    advice: str = ": replace or remove it", formats: tuple[str, ...] | None = None,
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # the caller's limit governs; PIL's warning would only add noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if formats is not None:
                Image.init()  # every plugin registered: open() reads OPEN[format] for each one named
                formats = tuple(f for f in formats if f in Image.OPEN)
            img = Image.open(src, formats=formats)
        try:
            # the canvas the file declares, checked before draft(): a progressive JPEG still buffers
            # every coefficient of its full size while libjpeg scales it down
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"{name} is {img.width}x{img.height} pixels, over the limit of {max_pixels:,}")
            if size:  # JPEG: libjpeg scales by 1/2, 1/4 or 1/8 while decoding, never below size; others: no-op
                img.draft(None, (size, size))
            img.load()
            return to_rgb(upright(img))
        finally:
            img.close()
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except Image.DecompressionBombError as e:  # PIL's own cap (2 x MAX_IMAGE_PIXELS), hit inside open()
        if max_pixels is not None:
            raise ImageTooLargeError(f"{name} is over the limit of {max_pixels:,} pixels") from None
        raise DataError(f"cannot read image {name} ({_reason(e)}){advice}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {name} ({_reason(e)}){advice}") from None


def _check(src: str | os.PathLike | io.BytesIO, name: str) -> None:
    try:
        Image.open(src).close()  # parses the header only
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {name} ({_reason(e)}): replace or remove it") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # its text holds the source's repr (a path, or a BytesIO)
        return "not an image format PIL can read"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_size(transform: Any) -> int | None:
    """The side every decoded image must keep for `transform` (its first resize), so that a large JPEG
    can be decoded at a fraction of its size without changing what the transform sees; None: unknown."""
    from torchvision.transforms import Resize

    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, Resize):
            return int(t.size) if isinstance(t.size, int) else int(max(t.size))
    return None


def open_image(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Read one image file as upright RGB (used by `predict` and `explain`); DataError naming the file if
    it is not an image. `size`: decode large JPEGs down to it (`decode_size`), as `serve` does."""
    return _decode(path, str(path), size=size)


def decode_image(
    data: bytes, name: str = "the image", max_pixels: int | None = None, size: int | None = None
) -> Image.Image:
    """Decode an encoded image file (PNG, JPEG, ...) held in memory as upright RGB (used by `serve`).

    `max_pixels` is checked from the header, before any pixel is decoded (after a JPEG's draft scaling),
    so a small file that claims a huge canvas (a decompression bomb) costs nothing. Only SERVE_FORMATS
    are opened (MPO: many phones' JPEGs)."""
    return _decode(io.BytesIO(data), name, max_pixels=max_pixels, size=size, advice="", formats=SERVE_FORMATS)


class ArraySource:
    """uint8 images in a .npy file, (N, H, W) gray or (N, H, W, 3) RGB, memory-mapped.

    Pickling keeps only the path: each DataLoader worker maps the file itself instead of receiving a
    copy of the whole array.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._array: np.ndarray | None = None

    def _data(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array

    def __len__(self) -> int:
        return len(self._data())

    def load(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(np.ascontiguousarray(self._data()[i])))

    def check(self, i: int) -> None:
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_array": None}


class FileSource:
    """Image files by path (VTAB-1k lists): one file opened per `load`."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return _decode(self.paths[i], self.paths[i])

    def check(self, i: int) -> None:
        _check(self.paths[i], self.paths[i])

    def missing(self) -> list[str]:
        """Listed files that do not exist (one stat each: cheap even for 70,000 files)."""
        return [p for p in self.paths if not os.path.isfile(p)]


class HFSource:
    """The image column of a `datasets.Dataset`.

    The column is read undecoded ({"bytes", "path"}) and decoded here, so that a broken image names its
    file and other columns (captions, boxes) are never decoded at all. A memory-mapped Dataset pickles
    as a reference to its arrow files, so workers do not copy it.
    """

    def __init__(self, dataset: Any, column: str, label: str) -> None:
        import datasets

        try:
            self.dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        except (ValueError, TypeError) as e:
            raise DataError(f"column {column!r} of {label} does not hold images ({_reason(e)})") from None
        self.column = column
        self.label = label  # "hf:cifar10 split test", for messages

    def __len__(self) -> int:
        return len(self.dataset)

    def _cell(self, i: int) -> tuple[Any, str]:
        cell = self.dataset[int(i)][self.column]
        if not cell or (cell.get("bytes") is None and not cell.get("path")):
            raise DataError(f"row {i} of {self.label} has no image: drop the row or fix the dataset")
        name = cell.get("path") or f"row {i} of {self.label}"
        data = cell.get("bytes")
        return (io.BytesIO(data) if data is not None else cell["path"]), name

    def load(self, i: int) -> Image.Image:
        src, name = self._cell(i)
        return _decode(src, name)

    def check(self, i: int) -> None:
        src, name = self._cell(i)
        _check(src, name)
