"""Image sources: where a task's pixels live (arrays, files, an HF dataset) and how they become RGB.

A source only decodes when asked for one image, so that decoding runs in DataLoader workers. Every
failure to read an image raises `DataError` naming the file (or row), since a bare PIL traceback from a
worker does not say which of 20,000 files is broken.
"""

from __future__ import annotations

import io
import os
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

# What an image folder may hold; anything else (README, .DS_Store, metadata) is not an image.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


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
    """A new 8-bit RGB image: every backbone takes 3 channels, whatever the file held (L, P, RGBA, 16-bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
    elif img.mode in ("I", "F"):
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64), 0, 255).round().astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when such a palette goes straight to RGB
    return img.convert("RGB")


def _decode(src: str | os.PathLike | io.BytesIO, name: str) -> Image.Image:
    try:
        img = Image.open(src)
        try:
            img.load()
            return to_rgb(img)
        finally:
            img.close()
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {name} ({_reason(e)}): replace or remove it") from None


def _check(src: str | os.PathLike | io.BytesIO, name: str) -> None:
    try:
        Image.open(src).close()  # parses the header only
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {name} ({_reason(e)}): replace or remove it") from None


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(" '", " ").replace("'", "") if isinstance(e, UnidentifiedImageError) else text


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read one image file as RGB (used by `predict`); DataError naming the file if it is not an image."""
    return _decode(path, str(path))


def decode_image(data: bytes, name: str = "the image") -> Image.Image:
    """Decode an encoded image file (PNG, JPEG, ...) held in memory as RGB (used by `serve`)."""
    return _decode(io.BytesIO(data), name)


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
