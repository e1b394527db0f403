"""The images of a dataset run: found in a folder, labelled by their class folders, decoded.

:func:`find_images` walks a folder recursively (in sorted order, so every run sees the same
list) and keeps the files whose extension names a supported image format. With class folders it
reads labels as torchvision's ``ImageFolder`` does: each folder directly under the root is a
class, the images anywhere below it belong to it, classes are numbered in sorted order, and files
directly in the root belong to no class and are left out. When every folder is named after one
of the model's classes, the labels are the model's own class indices instead, so that the true
label of a ``circle/`` image is the model's ``circle``.

Decoding uses :func:`explainer.images.load_image` with all its checks; a file that fails them is
a bad image, recorded with the reason.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explainer.errors import ExplainerError, ImageLoadError
from explainer.images import Preprocessing, load_image, preprocess
from explainer.limits import max_image_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassMap",
    "DatasetError",
    "ImageFile",
    "class_map",
    "decode",
    "find_images",
    "read_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
"""File extensions (lower case) taken as images: the formats :func:`load_image` reads."""


class DatasetError(ExplainerError, ValueError):
    """The dataset's folder or labels cannot be used as asked."""


@dataclass(frozen=True)
class ImageFile:
    """One image file of the dataset.

    Attributes
    ----------
    key : str
        Its path relative to the root, with ``/`` separators: the name it has in the store.
    path : Path
        Where it is.
    class_name : str or None
        Its class folder, with class folders; else None.
    """

    key: str
    path: Path
    class_name: str | None = None


@dataclass(frozen=True)
class ClassMap:
    """How class folders become true labels.

    Attributes
    ----------
    classes : tuple of str
        Class folder names, sorted.
    indices : tuple of int
        The label of each class, in the order of ``classes``.
    mode : str
        ``"model"`` (each folder is named after one of the model's classes, whose index it
        takes) or ``"sorted"`` (ImageFolder's numbering: the position in ``classes``).
    """

    classes: tuple[str, ...]
    indices: tuple[int, ...]
    mode: str

    def label(self, class_name: str) -> int:
        """The true label of an image in folder ``class_name``."""
        return self.indices[self.classes.index(class_name)]


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise DatasetError(f"No folder at {str(root)!r}; check --images.")
    if not root.is_dir():
        raise DatasetError(f"{str(root)!r} is a file, not a folder of images; check --images.")
    return root


def _walk(folder: Path) -> Iterator[Path]:
    """Files below ``folder`` in sorted order (symbolic links to folders are not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder, onerror=None):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath, name)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def find_images(root: str | os.PathLike, *, class_folders: bool = False) -> list[ImageFile]:
    """Every image file below ``root``, sorted by its path.

    Parameters
    ----------
    root : path
        The dataset's folder, searched recursively.
    class_folders : bool
        Read classes from the folders directly under ``root`` (as ``ImageFolder``); files
        directly in ``root`` are then left out.

    Raises
    ------
    DatasetError
        When ``root`` is not a folder, holds no images, or (with class folders) no class folder.
    """
    base = _check_root(Path(root))
    found: list[ImageFile] = []
    if class_folders:
        classes = sorted(e.name for e in os.scandir(base) if e.is_dir())
        if not classes:
            raise DatasetError(
                f"{str(base)!r} has no class folders: with --labels-from-folders, put each "
                "class's images in a folder named after it (root/circle/1.png, root/square/2.png)."
            )
        for name in classes:
            for path in _walk(base / name):
                if _is_image(path):
                    key = path.relative_to(base).as_posix()
                    found.append(ImageFile(key, path, name))
    else:
        for path in _walk(base):
            if _is_image(path):
                found.append(ImageFile(path.relative_to(base).as_posix(), path))
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(
            f"No images found in {str(base)!r} (looked for files ending in {extensions})."
        )
    found.sort(key=lambda f: f.key)
    return found


def class_map(images: Sequence[ImageFile], labels: Sequence[str]) -> ClassMap:
    """The true labels of class folders for a model with class names ``labels``."""
    classes = tuple(sorted({f.class_name for f in images if f.class_name is not None}))
    position = {name: i for i, name in enumerate(labels)}
    if classes and all(name in position for name in classes):
        return ClassMap(classes, tuple(position[name] for name in classes), "model")
    if len(classes) > len(labels):
        raise DatasetError(
            f"There are {len(classes)} class folders but the model has {len(labels)} classes, "
            "so the folders cannot be its true labels; name each folder after one of the "
            "model's classes, or run without --labels-from-folders."
        )
    return ClassMap(classes, tuple(range(len(classes))), "sorted")


def read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes (within the image byte limit) and their sha256 in hex.

    Raises
    ------
    ImageLoadError
        When the file cannot be read or is larger than ``EXPLAINER_MAX_IMAGE_MB``.
    """
    limit = max_image_bytes()
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ImageLoadError(
            f"The file {path.name!r} cannot be read ({exc.strerror or exc})."
        ) from None
    if len(data) > limit:
        raise ImageLoadError(
            f"The file {path.name!r} is larger than the limit of {limit / 2**20:.3g} MB per "
            "image file; resize it, or raise EXPLAINER_MAX_IMAGE_MB."
        )
    return data, hashlib.sha256(data).hexdigest()


def decode(data: bytes, prep: Preprocessing, name: str = "") -> np.ndarray:
    """Decode an image's bytes with every check and preprocess it: ``(1, C, H, W)`` float32.

    Messages name the file ``name`` where :func:`load_image` speaks of "the uploaded data".
    """
    try:
        image = load_image(data)
    except ImageLoadError as exc:
        message = str(exc)
        if name and message.startswith(_UPLOADED):
            message = f"The file {name!r}" + message[len(_UPLOADED) :]
        raise ImageLoadError(message) from exc
    tensor = preprocess(image, prep)
    return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)


_UPLOADED = "The uploaded data"
