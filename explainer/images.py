"""Images: safe decoding, the preprocessing a model expects, and the way back to pixels.

Uploaded bytes are untrusted. :func:`load_image` refuses a file larger than the operator's byte
limit before reading it, reads only the header first, refuses anything whose pixel count is
absurd before a single pixel is decoded, and turns every decoding failure into an
:class:`~explainer.errors.ImageLoadError` whose message names the supported formats.

:class:`Preprocessing` describes, as plain data, how a PIL image becomes the tensor a model sees;
:func:`preprocess` applies it and :func:`deprocess` undoes the normalisation so the app can show
exactly what the model received.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import v2

from explainer.errors import ImageLoadError
from explainer.limits import max_image_bytes

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FIT_MODES",
    "FitLayout",
    "MAX_BYTES_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_PIXELS_ENV",
    "SUPPORTED_FORMATS",
    "Preprocessing",
    "deprocess",
    "fit_layout",
    "fit_preview",
    "mark_padding",
    "image_digest",
    "load_image",
    "preprocess",
    "resize_and_crop",
    "resize_map",
    "to_mode",
]

#: Formats :func:`load_image` accepts, as shown to users.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WebP", "BMP", "GIF", "TIFF")
# Pillow's names for the same formats; MPO is the multi-picture JPEG many cameras write.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
_FORMATS_TEXT = ", ".join(SUPPORTED_FORMATS)

#: Environment variable that overrides the default pixel limit.
MAX_PIXELS_ENV = "EXPLAINER_MAX_IMAGE_PIXELS"
#: Largest width * height accepted when neither ``max_pixels`` nor the variable is set.
DEFAULT_MAX_PIXELS = 40_000_000
#: Environment variable of the largest image file, in MB (see :mod:`explainer.limits`).
MAX_BYTES_ENV = "EXPLAINER_MAX_IMAGE_MB"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: How a picture whose shape differs from the model's input is fitted to it (see
#: :class:`Preprocessing`): ``"crop"`` keeps the centre, ``"pad"`` keeps everything and pads
#: with the normalisation mean, ``"resize"`` stretches the picture to the input's shape.
FIT_MODES: tuple[str, ...] = ("crop", "pad", "resize")

# The classic evaluation ratio: resize the shorter side to size / 0.875, then centre-crop.
_CROP_RATIO = 0.875

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# Errors Pillow raises for data it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


# --------------------------------------------------------------------------- loading


def _pixel_limit(max_pixels: int | None) -> int:
    """Resolve the pixel limit: the argument, else the environment variable, else the default."""
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(raw.replace("_", ""))
        except ValueError:
            raise ImageLoadError(
                f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {raw!r}."
            ) from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ImageLoadError(
            f"max_pixels must be a positive whole number of pixels, got {max_pixels!r}."
        )
    return max_pixels


def _byte_limit(max_bytes: int | None) -> int:
    """Resolve the byte limit: the argument, else ``EXPLAINER_MAX_IMAGE_MB``, else its default."""
    if max_bytes is None:
        return max_image_bytes()
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ImageLoadError(
            f"max_bytes must be a positive whole number of bytes, got {max_bytes!r}."
        )
    return max_bytes


def _megabytes(size: int) -> str:
    """``"25 MB"``, ``"0.5 MB"``: a byte count in the MB (2**20 bytes) of the limit variables."""
    return f"{size / 2**20:.3g} MB"


def _check_bytes(size: int, limit: int, label: str) -> None:
    if size > limit:
        raise ImageLoadError(
            f"{label} is {_megabytes(size)} ({size:,} bytes), more than the limit of "
            f"{_megabytes(limit)} per image file. Resize or re-compress it first, or ask the "
            f"operator to raise {MAX_BYTES_ENV}."
        )


def _open_source(source: ImageSource, limit: int) -> tuple[BinaryIO, str]:
    """Return a readable binary stream for ``source`` and a phrase naming it in messages.

    A source larger than ``limit`` bytes is refused before it is read (a path) or decoded.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "The uploaded data"
        _check_bytes(memoryview(source).nbytes, limit, label)
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = f"The file {path.name!r}"
        try:
            if path.is_file():
                _check_bytes(path.stat().st_size, limit, label)
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageLoadError(f"No image file at {str(path)!r}; check the path.") from None
        except IsADirectoryError:
            raise ImageLoadError(
                f"{str(path)!r} is a folder, not an image file; pick one image inside it."
            ) from None
        except PermissionError:
            raise ImageLoadError(
                f"{str(path)!r} cannot be read (permission denied); check the file's permissions."
            ) from None
    elif hasattr(source, "read"):
        # A binary file-like object, e.g. an upload widget's buffer.
        if getattr(source, "seekable", lambda: False)():
            source.seek(0)
        data = source.read(limit + 1)  # one byte more than allowed tells that it is too large
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_image needs a file opened in binary mode ('rb').")
        data = bytes(data)
        label = "The uploaded data"
        if len(data) > limit:
            size = len(data)
            if getattr(source, "seekable", lambda: False)():
                size = source.seek(0, io.SEEK_END)
            _check_bytes(size, limit, label)
    else:
        raise TypeError(
            "load_image takes a file path or the image's bytes, "
            f"got an object of type {type(source).__name__}."
        )
    if not data:
        raise ImageLoadError(
            f"{label} is empty (0 bytes). Provide an image file in one of these formats: "
            f"{_FORMATS_TEXT}."
        )
    return io.BytesIO(data), label


def load_image(
    source: ImageSource, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Decode an image safely and return it as an RGB :class:`PIL.Image.Image`.

    Parameters
    ----------
    source : str, os.PathLike, bytes or binary file object
        A path to an image file, or the raw bytes of an upload.
    max_pixels : int, optional
        Largest ``width * height`` accepted. Defaults to the environment variable
        ``EXPLAINER_MAX_IMAGE_PIXELS``, else 40,000,000. The size is checked from the header,
        before any pixel is decoded. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) still
        applies on top.
    max_bytes : int, optional
        Largest size of the encoded file, in bytes. Defaults to the environment variable
        ``EXPLAINER_MAX_IMAGE_MB`` (see :func:`explainer.limits.max_image_bytes`). A larger
        source is refused before it is decoded (a path, before it is read).

    Returns
    -------
    PIL.Image.Image
        A fully loaded image in mode ``"RGB"``, rotated upright per its EXIF orientation, with
        transparency composited over white. Animated GIFs give their first frame.

    Raises
    ------
    ImageLoadError
        The data is empty, truncated, not an image in a supported format (PNG, JPEG, WebP, BMP,
        GIF, TIFF), larger than the byte limit, or larger than the pixel limit.
    """
    limit = _pixel_limit(max_pixels)
    stream, label = _open_source(source, _byte_limit(max_bytes))
    unreadable = (
        f"{label} is not an image in a supported format ({_FORMATS_TEXT}). Convert or re-save "
        "it as one of these and try again."
    )
    try:
        with warnings.catch_warnings():
            # Pillow only warns about a possible decompression bomb; make it a hard stop.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream, formats=_available_formats())
            except Image.UnidentifiedImageError:
                raise ImageLoadError(unreadable) from None
            with image:
                # Image.open has parsed only the header here; nothing is decoded yet.
                _check_size(image.size, limit, label)
                image.seek(0)
                image.load()
                # Some formats (GIF frames) can grow while loading; check again.
                _check_size(image.size, limit, label)
                # In place: a copy of a large (16-bit, float) image is memory the result never
                # needs; _to_rgb always returns a new image, detached from the source.
                ImageOps.exif_transpose(image, in_place=True)
                result = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"{label} declares more than {Image.MAX_IMAGE_PIXELS:,} pixels and was refused "
            "without being decoded (a possible decompression bomb). Resize the image to at most "
            f"{limit:,} pixels and try again."
        ) from exc
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"{label} could not be decoded; the file looks truncated or damaged ({exc}). "
            f"Re-save it in a supported format ({_FORMATS_TEXT}) and try again."
        ) from exc
    result.load()
    return result


def _available_formats() -> list[str]:
    """Pillow's names of the supported formats this Pillow build can decode."""
    Image.init()  # registers every plugin (MPO, WebP, TIFF are not loaded by default)
    return [name for name in _PIL_FORMATS if name in Image.OPEN]


def _check_size(size: tuple[int, int], limit: int, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(
            f"{label} declares an empty size ({width} x {height} pixels); it is not a usable image."
        )
    if width * height > limit:
        raise ImageLoadError(
            f"{label} is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{limit:,}. Resize it to a smaller size first, or raise {MAX_PIXELS_ENV} if you "
            "trust the file."
        )


# Pixels converted at a time by _high_bit_depth_to_l: bounds its working memory whatever the size.
_BLOCK_PIXELS = 1 << 22


def _row_blocks(image: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(top, bottom, pixels)`` for consecutive bands of rows of ``image``, as numpy arrays."""
    width, height = image.size
    step = max(1, _BLOCK_PIXELS // max(1, width))
    for top in range(0, height, step):
        bottom = min(height, top + step)
        yield top, bottom, np.asarray(image.crop((0, top, width, bottom)))


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float greyscale image onto 8 bits, keeping its contrast.

    Pillow's own conversion to ``"L"`` clips at 255, which turns most 16-bit images white.
    16-bit data is divided by 257 (65535 becomes 255), rounded to the nearest grey level. The
    work goes band by band, in integers for integer modes and in float32 for float images, so a
    40-megapixel image needs a few MiB beyond its own pixels and the 8-bit result (a float64
    copy of the whole image would take over 300 MiB, and its temporaries several times that).
    """
    mode = image.mode
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    if mode == "F":
        # Floats in [0, 1] are intensities; anything else is taken as 0..255.
        low, high = math.inf, -math.inf
        for _, _, block in _row_blocks(image):
            finite = block[np.isfinite(block)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        scale = np.float32(255.0 if 0.0 <= low and high <= 1.0 else 1.0)
        for top, bottom, block in _row_blocks(image):
            values = block.astype(np.float32)  # a copy: the image's own pixels stay as they are
            with np.errstate(over="ignore", invalid="ignore"):
                values *= scale
            np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.rint(values, out=values)
            np.clip(values, 0.0, 255.0, out=values)
            out[top:bottom] = values
    else:
        # "I;16*" holds 16-bit data; 32-bit "I" storage usually holds 8- or 16-bit data (e.g.
        # 16-bit PNGs on older Pillow): divide by 257 only when it goes beyond 255.
        divide = mode.startswith("I;16") or int(image.getextrema()[1]) > 255
        for top, bottom, block in _row_blocks(image):
            values = block.astype(np.int64)
            if divide:
                # round(v / 257) in integers: v / 257 is never exactly halfway between two.
                values += 128
                values //= 257
            np.clip(values, 0, 255, out=values)
            out[top:bottom] = values
    return Image.fromarray(out, mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent pixels become white."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        image = _high_bit_depth_to_l(image)
        mode = image.mode
    if mode == "P":
        # Palette images may mark one index transparent; keep that information.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif (
        mode in ("PA", "LA", "La", "RGBa")
        or (mode == "L" and "transparency" in image.info)
        or (mode == "RGB" and "transparency" in image.info)
    ):
        image = image.convert("RGBA")
        mode = image.mode
    if mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if mode == "RGB":
        return image.copy()
    if mode == "LAB":
        # A plain convert would copy L, a, b into R, G, B; map the colours properly instead.
        from PIL import ImageCms

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, transform)
    return image.convert("RGB")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Return ``image`` with the number of channels a model expects.

    Parameters
    ----------
    image : PIL.Image.Image
        Any Pillow image (typically the RGB result of :func:`load_image`).
    channels : int
        ``3`` for RGB or ``1`` for greyscale (``"L"``).

    Returns
    -------
    PIL.Image.Image
        A new image in mode ``"RGB"`` or ``"L"``.
    """
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    if channels == 3:
        return rgb
    if channels == 1:
        return rgb.convert("L")
    raise ImageLoadError(
        f"Images can be given to models with 1 (greyscale) or 3 (RGB) channels, not {channels}."
    )


def image_digest(data: bytes) -> str:
    """Return the SHA-256 hex digest of ``data``, the key under which results are cached."""
    return hashlib.sha256(bytes(data)).hexdigest()


# --------------------------------------------------------------------------- preprocessing


def _as_size(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    """Normalise an int or ``(height, width)`` pair to a tuple of two positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ImageLoadError(
            f"{what} must be one whole number or a (height, width) pair, got {size!r}."
        )
    if min(pair) <= 0:
        raise ImageLoadError(f"{what} must be positive, got {pair}.")
    return pair


def _as_floats(values: float | Sequence[float], what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ImageLoadError(
            f"{what} must be a list of numbers, one per channel, got {values!r}."
        ) from None
    if not all(math.isfinite(v) for v in out):
        raise ImageLoadError(f"{what} must contain finite numbers, got {out}.")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes the normalised tensor a model sees.

    The geometry is ``resize`` then centre crop: when ``resize`` is an int, the shorter side is
    scaled to it (keeping the aspect ratio) and the centre ``size`` is cropped; when it is
    ``None`` the whole image is scaled to ``size`` directly. Pixels are then mapped to ``[0, 1]``
    and normalised per channel: ``(x - mean) / std``.

    ``fit`` says what happens to a picture whose shape is not the input's: ``"crop"`` is the
    geometry above; ``"pad"`` scales the picture so that it fits inside ``size`` whole, keeping
    its aspect ratio, and pads the rest with the normalisation mean (zero once normalised, so the
    padding carries no signal; black for the ``none`` preset) -- ``resize`` is not used;
    ``"resize"`` scales the picture straight to ``size`` and does not keep its aspect ratio.

    Attributes
    ----------
    mean, std : tuple[float, ...]
        One value per channel; every ``std`` must be non-zero.
    size : tuple[int, int]
        Final ``(height, width)`` of the tensor.
    resize : int or None
        Shorter side before the centre crop, or ``None`` to resize straight to ``size``.
    channels : int
        ``3`` (RGB) or ``1`` (greyscale).
    name : str
        A short label for the UI (``"imagenet"``, ``"none"``, ``"model"``, ``"custom"``).
    fit : str
        One of :data:`FIT_MODES`; ``"crop"`` by default.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    resize: int | None
    channels: int = 3
    name: str = "custom"
    fit: str = "crop"

    def __post_init__(self) -> None:
        mean = _as_floats(self.mean, "mean")
        std = _as_floats(self.std, "std")
        size = _as_size(self.size)
        if self.channels not in (1, 3):
            raise ImageLoadError(
                f"channels must be 1 (greyscale) or 3 (RGB), got {self.channels!r}."
            )
        if len(mean) != self.channels or len(std) != self.channels:
            raise ImageLoadError(
                f"mean and std need one value per channel ({self.channels}); got "
                f"{len(mean)} mean value(s) and {len(std)} std value(s)."
            )
        if any(s == 0.0 for s in std):
            raise ImageLoadError(
                f"std values must be non-zero (they divide the pixels); got {std}."
            )
        resize = self.resize
        if resize is not None:
            if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize <= 0:
                raise ImageLoadError(
                    f"resize must be a positive whole number of pixels or None, got {resize!r}."
                )
            resize = int(resize)
        if self.fit not in FIT_MODES:
            raise ImageLoadError(f"fit must be one of {', '.join(FIT_MODES)}, got {self.fit!r}.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "resize", resize)

    # ---- presets

    @classmethod
    def imagenet(cls, size: int = 224) -> Preprocessing:
        """The standard ImageNet evaluation pipeline: resize to ``size * 256/224``, centre crop.

        Parameters
        ----------
        size : int
            Side of the square crop (224 for most torchvision classifiers).
        """
        height, width = _as_size(size)
        resize = int(round(max(height, width) * 256 / 224))
        return cls(IMAGENET_MEAN, IMAGENET_STD, (height, width), resize, 3, "imagenet")

    @classmethod
    def none(cls, size: int | tuple[int, int], channels: int = 3) -> Preprocessing:
        """Resize straight to ``size`` and scale pixels to ``[0, 1]``; no normalisation."""
        return cls((0.0,) * channels, (1.0,) * channels, _as_size(size), None, channels, "none")

    @classmethod
    def custom(
        cls,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | tuple[int, int],
        resize: int | None = None,
    ) -> Preprocessing:
        """User-chosen normalisation; the number of channels follows ``len(mean)``."""
        mean_t = _as_floats(mean, "mean")
        return cls(mean_t, _as_floats(std, "std"), _as_size(size), resize, len(mean_t), "custom")

    @classmethod
    def for_model(
        cls,
        input_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> Preprocessing:
        """The pipeline matching a model's expected input.

        Inputs of 64 pixels or more get the evaluation-style resize of the shorter side to
        ``int(side / 0.875)`` followed by a centre crop; smaller inputs (thumbnails, toy models)
        are resized straight to the input size, since cropping would lose too much.

        Parameters
        ----------
        input_size : int or (height, width) or (channels, height, width)
            The model's expected input size.
        mean, std : sequence of float
            The model's normalisation, one value per channel.
        """
        mean_t = _as_floats(mean, "mean")
        std_t = _as_floats(std, "std")
        if isinstance(input_size, Sequence) and len(input_size) == 3:
            channels = int(input_size[0])
            size = _as_size(tuple(input_size[1:]), "input_size")
        else:
            channels = len(mean_t)
            size = _as_size(input_size, "input_size")
        side = max(size)
        resize = int(side / _CROP_RATIO) if min(size) >= 64 else None
        return cls(mean_t, std_t, size, resize, channels, "model")

    def describe(self) -> str:
        """The pipeline in one sentence, naming the fit mode, for settings and reports."""
        h, w = self.size
        if self.fit == "pad":
            geometry = f"scale to fit inside {h}×{w}, pad the rest with the mean colour"
        elif self.fit == "resize":
            geometry = f"stretch to {h}×{w} (aspect ratio not kept)"
        elif self.resize is None:
            geometry = f"resize to {h}×{w}"
        else:
            geometry = f"resize the shorter side to {self.resize}, centre-crop {h}×{w}"
        mean = ", ".join(f"{m:.3g}" for m in self.mean)
        std = ", ".join(f"{s:.3g}" for s in self.std)
        return (
            f"{geometry}; pixels in [0, 1], then (x − mean) / std with mean ({mean}), std ({std})."
        )

    # ---- transforms

    def geometry(self) -> v2.Transform:
        """The resize (and centre crop, or padding) part of the pipeline, usable on PIL images.

        With ``fit="pad"`` the padding is the mean colour rounded to whole pixel values; the
        tensor of :meth:`transform` pads after normalising, with exact zeros.
        """
        if self.fit == "pad":
            return v2.Compose([_ScaleToFit(self.size), _PadTo(self.size, _mean_fill(self))])
        if self.fit == "resize" or self.resize is None:
            return v2.Resize(self.size, antialias=True)
        return v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.size)])

    def transform(self) -> v2.Transform:
        """The full pipeline: geometry, to a float tensor in ``[0, 1]``, normalisation."""
        if self.fit == "pad":
            return v2.Compose(
                [
                    _ScaleToFit(self.size),
                    v2.ToImage(),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(list(self.mean), list(self.std)),
                    _PadTo(self.size, 0.0),
                ]
            )
        return v2.Compose(
            [
                self.geometry(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )


# --------------------------------------------------------------------------- fitting the shape


def _fitted_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a picture scaled to fit inside ``size`` whole (aspect kept)."""
    out_h, out_w = size
    scale = min(out_h / height, out_w / width)
    return (
        min(out_h, max(1, int(round(height * scale)))),
        min(out_w, max(1, int(round(width * scale)))),
    )


def _mean_fill(prep: Preprocessing) -> tuple[int, ...]:
    """The normalisation mean as whole pixel values (0..255), one per channel."""
    return tuple(int(round(min(max(m, 0.0), 1.0) * 255)) for m in prep.mean)


class _ScaleToFit:
    """Scale a PIL image to fit inside ``size`` whole, keeping its aspect ratio."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = _fitted_size(image.height, image.width, self.size)
        return v2.functional.resize(image, [height, width], antialias=True)


class _PadTo:
    """Centre a PIL image or a ``(C, H, W)`` tensor on a canvas of ``size``, filled with ``fill``.

    The extra row or column of an odd margin goes below or to the right.
    """

    def __init__(self, size: tuple[int, int], fill: float | tuple[int, ...]) -> None:
        self.size = size
        self.fill = fill

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        out_h, out_w = self.size
        if isinstance(image, Image.Image):
            fill = self.fill if isinstance(self.fill, tuple) else (int(self.fill),)
            canvas = Image.new(image.mode, (out_w, out_h), fill[0] if image.mode == "L" else fill)
            canvas.paste(image, ((out_w - image.width) // 2, (out_h - image.height) // 2))
            return canvas
        height, width = image.shape[-2:]
        top, left = (out_h - height) // 2, (out_w - width) // 2
        padding = (left, out_w - width - left, top, out_h - height - top)
        return F.pad(image.as_subclass(torch.Tensor), padding, value=float(self.fill))


def _centre(length: int, crop: int) -> tuple[int, int, int]:
    """A centre crop of ``crop`` along one axis of ``length``, as torchvision's CenterCrop does
    it: ``(first kept, one past the last kept, offset of the first kept in the output)``."""
    if crop > length:  # CenterCrop pads first: the whole axis is kept
        return 0, length, (crop - length) // 2
    start = int(round((length - crop) / 2.0))
    return start, start + crop, 0


def _percent(part: int, whole: int) -> str:
    share = 100.0 * part / whole
    return "<1%" if 0 < share < 1 else f"{share:.0f}%"


def _sides(first: int, second: int, names: tuple[str, str], whole: int, what: str) -> str:
    """``"32 px left and right (12% of the width)"``; empty when nothing happens on this axis."""
    if not first and not second:
        return ""
    if first == second:
        where = f"{first} px {names[0]} and {names[1]}"
    else:
        where = f"{first} px {names[0]} and {second} px {names[1]}"
    return f"{where} ({_percent(first + second, whole)} of the {what})"


@dataclass(frozen=True)
class FitLayout:
    """Where a picture lands in the model's input: what is cut, padded or stretched.

    Boxes are ``(left, top, right, bottom)`` in pixels, right and bottom exclusive, like PIL's.

    Attributes
    ----------
    width, height : int
        Size of the original picture.
    output : tuple[int, int]
        ``(height, width)`` of the model's input.
    kept : tuple[int, int, int, int]
        The part of the original the model sees, in the original's pixels (rounded).
    placed : tuple[int, int, int, int]
        Where that part lands in the input; everything outside it is padding.
    """

    width: int
    height: int
    output: tuple[int, int]
    kept: tuple[int, int, int, int]
    placed: tuple[int, int, int, int]

    @property
    def cut(self) -> tuple[int, int, int, int]:
        """Pixels of the original cut away: ``(left, top, right, bottom)``."""
        left, top, right, bottom = self.kept
        return left, top, self.width - right, self.height - bottom

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """Pixels of padding in the input: ``(left, top, right, bottom)``."""
        left, top, right, bottom = self.placed
        out_h, out_w = self.output
        return left, top, out_w - right, out_h - bottom

    @property
    def stretch(self) -> float:
        """Horizontal scale over vertical scale: 1 when the aspect ratio is kept."""
        left, top, right, bottom = self.kept
        p_left, p_top, p_right, p_bottom = self.placed
        return ((p_right - p_left) / (right - left)) / ((p_bottom - p_top) / (bottom - top))

    @property
    def same_shape(self) -> bool:
        """The picture has the input's aspect ratio (a square picture for a square input)."""
        out_h, out_w = self.output
        return self.width * out_h == self.height * out_w

    def caption(self) -> str:
        """One sentence saying what was cut, padded or stretched, e.g.
        ``"Cut 32 px left and right (12% of the width)."``"""
        left, top, right, bottom = self.cut
        cuts = [
            _sides(left, right, ("left", "right"), self.width, "width"),
            _sides(top, bottom, ("top", "bottom"), self.height, "height"),
        ]
        cuts = [c for c in cuts if c]
        if cuts:
            return "Cut " + " and ".join(cuts) + "."
        out_h, out_w = self.output
        p_left, p_top, p_right, p_bottom = self.padding
        pads = [
            _sides(p_left, p_right, ("left", "right"), out_w, "input's width"),
            _sides(p_top, p_bottom, ("top", "bottom"), out_h, "input's height"),
        ]
        pads = [p for p in pads if p]
        if pads:
            inner_w = self.placed[2] - self.placed[0]
            inner_h = self.placed[3] - self.placed[1]
            return (
                f"Nothing cut: scaled to {inner_w} × {inner_h} px and padded "
                + " and ".join(pads)
                + "."
            )
        stretch = self.stretch
        if abs(stretch - 1.0) > 0.01:
            share, what = (stretch, "width") if stretch < 1.0 else (1.0 / stretch, "height")
            squeeze = f"shapes are squeezed to {share:.0%} of their {what}"
            return (
                f"Nothing cut: stretched from {self.width} × {self.height} to {out_w} × {out_h} "
                f"px, so {squeeze}."
            )
        return f"Nothing cut: scaled from {self.width} × {self.height} to {out_w} × {out_h} px."


def fit_layout(width: int, height: int, prep: Preprocessing) -> FitLayout:
    """Where a ``width`` x ``height`` picture lands in the input ``prep`` makes from it.

    Follows the geometry of :meth:`Preprocessing.geometry` exactly (torchvision's rounding of
    the resize and of the centre crop), so the numbers a caption shows are the pixels cut.
    """
    if min(width, height) <= 0:
        raise ImageLoadError(f"An image needs a positive size, got {width} × {height}.")
    out_h, out_w = prep.size
    full = (0, 0, width, height)
    if prep.fit == "pad":
        fit_h, fit_w = _fitted_size(height, width, prep.size)
        top, left = (out_h - fit_h) // 2, (out_w - fit_w) // 2
        return FitLayout(width, height, prep.size, full, (left, top, left + fit_w, top + fit_h))
    if prep.fit == "resize" or prep.resize is None:
        return FitLayout(width, height, prep.size, full, (0, 0, out_w, out_h))
    # Resize the shorter side to prep.resize (torchvision truncates the longer one), then crop.
    if width <= height:
        scaled_w, scaled_h = prep.resize, int(prep.resize * height / width)
    else:
        scaled_w, scaled_h = int(prep.resize * width / height), prep.resize
    x0, x1, at_x = _centre(scaled_w, out_w)
    y0, y1, at_y = _centre(scaled_h, out_h)
    sx, sy = width / scaled_w, height / scaled_h
    kept = (int(round(x0 * sx)), int(round(y0 * sy)), int(round(x1 * sx)), int(round(y1 * sy)))
    placed = (at_x, at_y, at_x + x1 - x0, at_y + y1 - y0)
    return FitLayout(width, height, prep.size, kept, placed)


def mark_padding(pixels: np.ndarray, placed: tuple[int, int, int, int]) -> np.ndarray:
    """Hatch everything outside ``placed`` with diagonal stripes, so padding reads as padding.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``uint8`` image, ``(H, W)`` or ``(H, W, 3)``, e.g. the result of :func:`deprocess`.
    placed : tuple[int, int, int, int]
        ``(left, top, right, bottom)`` of the picture (:attr:`FitLayout.placed`).

    Returns
    -------
    numpy.ndarray
        A new array; pixels inside ``placed`` are unchanged. Stripes are darker than a light
        padding colour and lighter than a dark one.
    """
    out = np.array(pixels, dtype=np.uint8, copy=True)
    height, width = out.shape[:2]
    left, top, right, bottom = placed
    outside = np.ones((height, width), dtype=bool)
    outside[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = False
    period = max(4, int(round(min(height, width) / 12)))
    rows, cols = np.indices((height, width))
    stripes = outside & (((rows + cols) % period) < max(1, period // 3))
    if not stripes.any():
        return out
    values = out[stripes].astype(np.float32)
    light = values.mean(axis=-1) > 100 if values.ndim == 2 else values > 100
    if values.ndim == 2:
        light = light[:, None]
    marked = np.where(light, values * 0.5, values + (255.0 - values) * 0.45)
    out[stripes] = np.rint(marked).astype(np.uint8)
    return out


def fit_preview(image: Image.Image, prep: Preprocessing, max_side: int = 240) -> np.ndarray:
    """A picture of what :class:`Preprocessing` does to ``image``'s shape, for people to look at.

    ``"crop"``: the original with the parts cut away shaded and the kept part outlined.
    ``"pad"``: the padded input with the padding hatched (:func:`mark_padding`).
    ``"resize"``: the picture stretched to the input's shape. At most ``max_side`` pixels on the
    longer side.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(h, w, 3)``.
    """
    rgb = to_mode(_check_image(image), 3)
    layout = fit_layout(rgb.width, rgb.height, prep)
    if any(layout.cut):
        scale = max_side / max(rgb.width, rgb.height)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        out = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        left, top, right, bottom = (int(round(v * scale)) for v in layout.kept)
        shade = np.ones(out.shape[:2], dtype=bool)
        shade[top:bottom, left:right] = False
        out[shade] = out[shade] * 0.3 + 20.0
        frame = np.zeros(out.shape[:2], dtype=bool)
        frame[top:bottom, left:right] = True
        frame[top + 2 : bottom - 2, left + 2 : right - 2] = False
        out[frame] = (255.0, 160.0, 0.0)
        return np.rint(out).astype(np.uint8)
    out_h, out_w = layout.output
    scale = max_side / max(out_h, out_w)
    canvas = (max(1, round(out_w * scale)), max(1, round(out_h * scale)))
    left, top, right, bottom = (int(round(v * scale)) for v in layout.placed)
    fill = _mean_fill(prep) * (3 if prep.channels == 1 else 1)
    picture = Image.new("RGB", canvas, fill)
    picture.paste(
        rgb.resize((max(1, right - left), max(1, bottom - top)), Image.Resampling.BILINEAR),
        (left, top),
    )
    pixels = np.asarray(picture, dtype=np.uint8)
    if any(layout.padding):
        pixels = mark_padding(pixels, (left, top, right, bottom))
    return pixels


def _check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"Expected a PIL image (see load_image), got an object of type {type(image).__name__}."
        )
    return image


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Apply only the geometric part of ``prep``: the picture the model sees, before scaling.

    Returns
    -------
    PIL.Image.Image
        An image of ``prep.size`` in mode ``"RGB"`` or ``"L"`` (per ``prep.channels``).
    """
    image = to_mode(_check_image(image), prep.channels)
    return prep.geometry()(image)


def preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Turn a PIL image into the model's input tensor.

    Returns
    -------
    torch.Tensor
        Shape ``(1, C, H, W)``, dtype ``float32``, on the CPU (move it to the model's device).
    """
    image = to_mode(_check_image(image), prep.channels)
    tensor = prep.transform()(image)
    return tensor.as_subclass(torch.Tensor).unsqueeze(0).contiguous()


def deprocess(tensor: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """Undo the normalisation of ``prep``: the exact picture the model received, as pixels.

    Parameters
    ----------
    tensor : torch.Tensor
        ``(1, C, H, W)`` or ``(C, H, W)``, on any device.
    prep : Preprocessing
        The preprocessing that produced it.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(H, W, 3)``, or ``(H, W)`` for one channel; values outside
        ``[0, 255]`` are clipped.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"deprocess expects a torch.Tensor, got {type(tensor).__name__}.")
    x = tensor.detach()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ImageLoadError(
            "deprocess expects one image shaped (1, C, H, W) or (C, H, W), "
            f"got shape {tuple(tensor.shape)}."
        )
    if x.shape[0] != prep.channels:
        raise ImageLoadError(
            f"The tensor has {x.shape[0]} channel(s) but the preprocessing describes "
            f"{prep.channels}; pass the Preprocessing that produced it."
        )
    x = x.to(device="cpu", dtype=torch.float64)
    mean = torch.tensor(prep.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float64).view(-1, 1, 1)
    pixels = (x * std + mean).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array[:, :, 0] if prep.channels == 1 else array)


def resize_map(map2d: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample a 2-D heatmap to ``size`` for drawing it over an image.

    Parameters
    ----------
    map2d : torch.Tensor or numpy.ndarray
        A 2-D map, e.g. conductance summed over channels.
    size : tuple[int, int]
        Target ``(height, width)`` — note: PIL's ``Image.size`` is ``(width, height)``.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``size``.
    """
    height, width = _as_size(size)
    if isinstance(map2d, np.ndarray):
        values = torch.from_numpy(np.asarray(map2d, dtype=np.float32))
    elif isinstance(map2d, torch.Tensor):
        values = map2d.detach().to(dtype=torch.float32)
    else:
        raise TypeError(f"resize_map expects a tensor or array, got {type(map2d).__name__}.")
    if values.dim() != 2 or values.numel() == 0:
        raise ImageLoadError(
            f"resize_map expects a non-empty 2-D map (height, width), got shape "
            f"{tuple(values.shape)}; sum over channels first."
        )
    out = F.interpolate(
        values[None, None], size=(height, width), mode="bilinear", align_corners=False
    )
    return out[0, 0].cpu().numpy()
