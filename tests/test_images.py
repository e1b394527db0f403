"""Tests for explainer.images: decoding every format safely, preprocessing, and the way back."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import explainer.images as images_module
from explainer.errors import ExplainerError, ImageLoadError
from explainer.images import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_BYTES_ENV,
    MAX_PIXELS_ENV,
    Preprocessing,
    deprocess,
    image_digest,
    load_image,
    preprocess,
    resize_and_crop,
    resize_map,
    to_mode,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image's pixel data is decoded."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --------------------------------------------------------------------------- formats


def test_png_rgba_is_composited_over_white():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)  # opaque red
    rgba[:, 2:4] = (0, 0, 255, 0)  # fully transparent blue
    rgba[:, 4:] = (0, 0, 0, 128)  # half-transparent black
    image = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.mode == "RGB" and image.size == (6, 4)
    out = pixels(image)
    assert (out[:, :2] == (255, 0, 0)).all()
    assert (out[:, 2:4] == (255, 255, 255)).all()
    assert np.abs(out[:, 4:] - 127).max() <= 1


def test_jpeg_exif_orientation_is_applied():
    # 40 wide, 20 high; left half dark, right half light.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    image = load_image(data)
    assert image.size == (20, 40)
    out = pixels(image).mean(axis=2)
    # After a clockwise turn the image's left half ends up on top.
    assert out[:15].mean() < 30 and out[25:].mean() > 225


def test_webp_lossless_round_trip():
    array = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    image = load_image(encode(Image.fromarray(array), "WEBP", lossless=True))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), array)


def test_bmp_round_trip():
    array = np.random.default_rng(1).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    image = load_image(encode(Image.fromarray(array), "BMP"))
    np.testing.assert_array_equal(np.asarray(image), array)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = load_image(data)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert (pixels(image) == (255, 0, 0)).all()


def test_tiff_16_bit_greyscale_keeps_its_contrast():
    array = np.array([[0, 65535], [32896, 1028]], dtype=np.uint16)
    data = encode(Image.fromarray(array), "TIFF")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    image = load_image(data)
    assert image.mode == "RGB"
    out = pixels(image)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 4]])


def test_palette_png_with_transparency():
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    palette_image.putpixel((0, 0), 0)
    data = encode(palette_image, "PNG", transparency=0)
    image = load_image(data)
    out = pixels(image)
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent index -> white
    assert tuple(out[1, 1]) == (0, 200, 0)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = load_image(data)
    assert image.mode == "RGB"
    red, green, blue = pixels(image).reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("mode", ["L", "1", "LA", "I", "F"])
def test_other_modes_become_rgb(mode):
    source = Image.new("L", (5, 3), 200).convert(mode, dither=Image.Dither.NONE)
    image = load_image(encode(source, "TIFF"))
    assert image.mode == "RGB" and image.size == (5, 3)
    expected = 255 if mode == "1" else 200
    assert (pixels(image) == expected).all()


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_colour_spaces_map_back_to_rgb(mode):
    from PIL import ImageCms

    rgb = Image.new("RGB", (4, 4), (200, 10, 10))
    if mode == "LAB":
        to_lab = ImageCms.buildTransform(
            ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
        )
        source = ImageCms.applyTransform(rgb, to_lab)
    else:
        source = rgb.convert(mode)
    image = load_image(encode(source, "TIFF"))
    assert image.mode == "RGB"
    assert np.abs(pixels(image) - (200, 10, 10)).max() <= 8


def test_path_and_file_object_sources(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (3, 2), (255, 0, 0)).save(path)
    assert load_image(path).size == (3, 2)
    assert load_image(str(path)).size == (3, 2)
    with open(path, "rb") as handle:
        assert load_image(handle).size == (3, 2)
    assert load_image(bytearray(path.read_bytes())).size == (3, 2)


def test_loaded_image_is_detached_from_the_source(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
    image = load_image(path)
    path.unlink()  # the image must not need the file any more
    assert tuple(pixels(image)[0, 0]) == (1, 2, 3)


# --------------------------------------------------------------------------- refusals


def test_header_bomb_is_refused_before_decoding(no_decoding):
    data = png_header_only(8000, 8000)  # 64 M pixels: under Pillow's limit, over ours
    with pytest.raises(ImageLoadError, match="64,000,000 pixels") as info:
        load_image(data)
    assert MAX_PIXELS_ENV in str(info.value)


def test_pillow_decompression_bomb_is_refused(no_decoding, recwarn):
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(png_header_only(100_000, 100_000))
    # Between Pillow's warning and error thresholds: the warning must become a refusal.
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(png_header_only(10_000, 9_000), max_pixels=10**9)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_argument_and_environment(monkeypatch):
    data = encode(Image.new("RGB", (100, 60)), "PNG")
    with pytest.raises(ImageLoadError, match="100 x 60 = 6,000 pixels"):
        load_image(data, max_pixels=5_999)
    assert load_image(data, max_pixels=6_000).size == (100, 60)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageLoadError, match="limit of 5,000"):
        load_image(data)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ImageLoadError, match=MAX_PIXELS_ENV):
        load_image(data)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert load_image(data).size == (100, 60)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(data, max_pixels=0)


def test_empty_input_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match=r"empty \(0 bytes\).*PNG, JPEG, WebP, BMP, GIF, TIFF"):
        load_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="'empty.jpg' is empty"):
        load_image(empty)


# Pillow may also warn while parsing a damaged TIFF header; the error is what must reach the user.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_truncated_files_are_refused(fmt):
    noise = Image.effect_noise((48, 48), 60).convert("RGB")
    data = encode(noise, fmt)
    for cut in (len(data) // 2, 24):
        with pytest.raises(ImageLoadError) as info:
            load_image(data[:cut])
        message = str(info.value)
        assert "PNG, JPEG, WebP, BMP, GIF, TIFF" in message
        assert isinstance(info.value, ExplainerError) and isinstance(info.value, ValueError)


def test_random_and_text_bytes_are_refused():
    rng = np.random.default_rng(0)
    for data in (rng.bytes(2048), b"hello, this is not an image", b"%PDF-1.4\n..."):
        with pytest.raises(ImageLoadError, match="not an image in a supported format"):
            load_image(data)


def test_a_model_file_named_like_an_image_is_refused(tmp_path):
    """A checkpoint uploaded under an image's name: the content decides, not the extension."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(3)}, buffer)
    path = tmp_path / "photo.png"
    path.write_bytes(buffer.getvalue())
    for source in (path, buffer.getvalue()):
        with pytest.raises(ImageLoadError, match="not an image in a supported format"):
            load_image(source)


def test_unsupported_format_is_refused():
    data = encode(Image.new("RGB", (4, 4)), "PPM")
    assert Image.open(io.BytesIO(data)).format == "PPM"
    with pytest.raises(ImageLoadError, match="supported format"):
        load_image(data)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="No image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(TypeError):
        load_image(12345)


# --------------------------------------------------------------------------- modes


def test_to_mode():
    image = Image.new("RGB", (2, 2), (255, 0, 0))
    assert to_mode(image, 3).mode == "RGB"
    grey = to_mode(image, 1)
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 76  # ITU-R 601-2 luma of pure red
    assert to_mode(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), 3).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageLoadError, match="1 .* or 3"):
        to_mode(image, 4)


# --------------------------------------------------------------------------- preprocessing


def test_presets():
    imagenet = Preprocessing.imagenet()
    assert imagenet.size == (224, 224) and imagenet.resize == 256
    assert imagenet.mean == IMAGENET_MEAN and imagenet.std == IMAGENET_STD
    assert imagenet.channels == 3 and imagenet.name == "imagenet"
    assert Preprocessing.imagenet(112).resize == 128

    plain = Preprocessing.none(32)
    assert plain.size == (32, 32) and plain.resize is None
    assert plain.mean == (0.0, 0.0, 0.0) and plain.std == (1.0, 1.0, 1.0) and plain.name == "none"

    custom = Preprocessing.custom([0.5], [0.25], (28, 20), resize=30)
    assert custom.channels == 1 and custom.size == (28, 20) and custom.resize == 30
    assert custom.mean == (0.5,) and isinstance(custom.mean, tuple)

    big = Preprocessing.for_model((3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)
    assert big.resize == 256 and big.size == (224, 224) and big.channels == 3
    assert Preprocessing.for_model((3, 64, 64), IMAGENET_MEAN, IMAGENET_STD).resize == 73
    small = Preprocessing.for_model((1, 28, 28), (0.1307,), (0.3081,))
    assert small.resize is None and small.channels == 1 and small.size == (28, 28)
    assert Preprocessing.for_model(96, IMAGENET_MEAN, IMAGENET_STD).size == (96, 96)


def test_preprocessing_is_frozen_and_hashable():
    prep = Preprocessing.imagenet(32)
    with pytest.raises(AttributeError):
        prep.size = (1, 1)
    assert hash(prep) == hash(Preprocessing.imagenet(32))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, "non-zero"),
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2, 0.2)}, "one value per channel"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2)}, "one value per channel"),
        ({"mean": (0.5, float("nan"), 0.5), "std": (0.2, 0.2, 0.2)}, "finite"),
        ({"mean": ("a", 0.5, 0.5), "std": (0.2, 0.2, 0.2)}, "numbers"),
        ({"mean": (0.5,) * 3, "std": (0.2,) * 3, "size": (0, 4)}, "positive"),
        ({"mean": (0.5,) * 3, "std": (0.2,) * 3, "resize": -3}, "resize"),
        ({"mean": (0.5,) * 4, "std": (0.2,) * 4, "channels": 4}, "channels"),
    ],
)
def test_bad_preprocessing_is_refused(kwargs, pattern):
    arguments = {"size": (8, 8), "resize": None, **kwargs}
    with pytest.raises(ImageLoadError, match=pattern):
        Preprocessing(**arguments)


def test_bad_presets_are_refused():
    with pytest.raises(ImageLoadError, match="non-zero"):
        Preprocessing.custom((0.5, 0.5, 0.5), (1.0, 0.0, 1.0), 16)
    with pytest.raises(ImageLoadError, match="one value per channel"):
        Preprocessing.for_model((3, 32, 32), (0.5,), (0.5,))


def test_preprocess_constant_colour_gives_known_values():
    image = Image.new("RGB", (50, 30), (255, 0, 51))
    prep = Preprocessing.imagenet(32)
    x = preprocess(image, prep)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert type(x) is torch.Tensor
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(x[0, channel], torch.full((32, 32), value), atol=1e-5, rtol=0)


def test_preprocess_geometry_resize_then_centre_crop():
    # A wide image: black edges, a white band in the middle half.
    array = np.zeros((40, 120), dtype=np.uint8)
    array[:, 30:90] = 255
    image = Image.fromarray(array).convert("RGB")
    prep = Preprocessing.custom((0.0,) * 3, (1.0,) * 3, 20, resize=20)
    x = preprocess(image, prep)
    assert x.shape == (1, 3, 20, 20)
    # Shorter side 40 -> 20, width 120 -> 60; the centre 20 columns lie inside the white band.
    assert x.min() > 0.95
    stretch = preprocess(image, Preprocessing.none((10, 30)))
    assert stretch.shape == (1, 3, 10, 30)
    # Width 120 -> 30 (a factor of 4): the band covers columns 7.5 to 22.5.
    assert stretch[0, 0, :, :6].max() < 0.05 and stretch[0, 0, :, 24:].max() < 0.05
    assert stretch[0, 0, :, 9:21].min() > 0.95


def test_preprocess_greyscale_model():
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    prep = Preprocessing.custom((0.5,), (0.5,), 8)
    x = preprocess(image, prep)
    assert x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(x, torch.full((1, 1, 8, 8), (76 / 255 - 0.5) / 0.5))


@pytest.mark.parametrize(
    "prep",
    [
        Preprocessing.imagenet(48),
        Preprocessing.none((20, 36)),
        Preprocessing.custom((0.2, 0.4, 0.6), (0.3, 0.1, 0.5), (24, 24), resize=30),
        Preprocessing.custom((0.5,), (0.2,), (16, 16)),
    ],
    ids=["imagenet", "none", "custom", "grey"],
)
def test_deprocess_inverts_preprocess(prep):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (57, 71, 3), dtype=np.uint8))
    x = preprocess(image, prep)
    shown = deprocess(x, prep)
    seen = np.asarray(resize_and_crop(image, prep))
    expected_shape = prep.size + ((3,) if prep.channels == 3 else ())
    assert shown.dtype == np.uint8 and shown.shape == expected_shape == seen.shape
    assert np.abs(shown.astype(int) - seen.astype(int)).max() <= 1
    np.testing.assert_array_equal(deprocess(x[0], prep), shown)


def test_deprocess_clips_and_validates():
    prep = Preprocessing.none(2)
    x = torch.tensor([[[-1.0, 0.5], [2.0, 1.0]]] * 3)
    out = deprocess(x, prep)
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 255]])
    with pytest.raises(ImageLoadError, match="channel"):
        deprocess(torch.zeros(1, 1, 2, 2), prep)
    with pytest.raises(ImageLoadError, match="shape"):
        deprocess(torch.zeros(2, 3, 2, 2), prep)
    # Tensors that require grad are fine: what the model saw is shown without autograd.
    assert deprocess(torch.zeros(1, 3, 2, 2, requires_grad=True), prep).shape == (2, 2, 3)


# --------------------------------------------------------------------------- helpers


def test_image_digest():
    assert image_digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert image_digest(b"abc") != image_digest(b"abd")
    assert len(image_digest(b"")) == 64


def test_resize_map():
    constant = resize_map(torch.full((3, 3), 2.5), (12, 9))
    assert constant.shape == (12, 9) and constant.dtype == np.float32
    np.testing.assert_allclose(constant, 2.5)

    ramp = np.array([[0.0, 1.0]], dtype=np.float64)
    up = resize_map(ramp, (1, 8))
    assert up.shape == (1, 8)
    assert np.all(np.diff(up[0]) >= 0) and up[0, 0] == 0.0 and up[0, -1] == 1.0

    integers = resize_map(np.eye(2, dtype=np.int64), (4, 4))
    assert integers.dtype == np.float32 and integers[0, 0] == 1.0 and integers[0, 3] == 0.0

    with pytest.raises(ImageLoadError, match="2-D"):
        resize_map(torch.zeros(3, 4, 4), (8, 8))
    with pytest.raises(ImageLoadError, match="size"):
        resize_map(torch.zeros(4, 4), (0, 8))


# --------------------------------------------------------------------------- byte limits


def test_byte_limit_refuses_bytes_before_decoding(no_decoding, monkeypatch):
    data = encode(Image.new("RGB", (64, 64)), "BMP")  # 12 KiB, uncompressed
    with pytest.raises(ImageLoadError, match=MAX_BYTES_ENV) as info:
        load_image(data, max_bytes=len(data) - 1)
    assert f"{len(data):,} bytes" in str(info.value)
    monkeypatch.setenv(MAX_BYTES_ENV, "0.01")  # 10,485 bytes
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        with pytest.raises(ImageLoadError, match=r"more than the limit of 0\.01 MB"):
            load_image(source)
    with pytest.raises(ImageLoadError, match="max_bytes"):
        load_image(data, max_bytes=0)


def test_byte_limit_refuses_a_path_before_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "large.bmp"
    path.write_bytes(encode(Image.new("RGB", (64, 64)), "BMP"))

    def refuse(self):
        raise AssertionError("the file was read")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(ImageLoadError, match="'large.bmp' is .* more than the limit"):
        load_image(path, max_bytes=1000)


def test_byte_limit_default_and_exact_size(monkeypatch):
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    assert load_image(data, max_bytes=len(data)).size == (8, 8)
    assert load_image(io.BytesIO(data), max_bytes=len(data)).size == (8, 8)
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert load_image(data).size == (8, 8)  # 25 MB by default
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ExplainerError, match=MAX_BYTES_ENV):
        load_image(data)


# --------------------------------------------------------------------------- high bit depths


def float64_to_l(image: Image.Image) -> np.ndarray:
    """The float64 conversion the integer/float32 one replaced: the reference it must match."""
    array = np.asarray(image)
    mode = image.mode
    if mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    elif mode == "I":
        peak = int(array.max()) if array.size else 0
        scaled = array.astype(np.float64) / (257.0 if peak > 255 else 1.0)
    else:
        finite = array[np.isfinite(array)]
        unit = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        scaled = np.nan_to_num(array.astype(np.float64)) * (255.0 if unit else 1.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_bit_depth_cases() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    edges16 = np.array([0, 1, 128, 129, 256, 257, 385, 386, 65407, 65408, 65535], dtype=np.uint16)
    ints = rng.integers(-70_000, 3_000_000, (23, 31), dtype=np.int32)
    small = rng.integers(-5, 256, (23, 31), dtype=np.int32)
    unit = rng.random((23, 31), dtype=np.float32)
    unit[0, :4] = [np.nan, 0.0, 1.0, 0.5 / 255]
    wide = (rng.standard_normal((23, 31)) * 300).astype(np.float32)
    wide[0, :4] = [np.nan, np.inf, -np.inf, 3e38]
    return [
        Image.fromarray(rng.integers(0, 65536, (23, 31), dtype=np.uint16)),
        Image.fromarray(edges16.reshape(1, -1)),
        Image.fromarray(ints, mode="I"),
        Image.fromarray(small, mode="I"),
        Image.fromarray(unit, mode="F"),
        Image.fromarray(wide, mode="F"),
        Image.fromarray(np.full((3, 4), np.nan, dtype=np.float32), mode="F"),
    ]


@pytest.mark.parametrize("block_pixels", [1 << 22, 40])
def test_high_bit_depth_conversion_matches_the_float64_formula(monkeypatch, block_pixels):
    monkeypatch.setattr(images_module, "_BLOCK_PIXELS", block_pixels)  # 40: bands of 1-2 rows
    for image in _high_bit_depth_cases():
        out = np.asarray(images_module._high_bit_depth_to_l(image))
        expected = float64_to_l(image)
        assert out.dtype == np.uint8 and out.shape == expected.shape
        difference = np.abs(out.astype(int) - expected.astype(int))
        assert difference.max() <= 1, image.mode
        if image.mode != "F":  # integer arithmetic is exact
            np.testing.assert_array_equal(out, expected)


_PEAK_SCRIPT = """
import sys

import explainer.images as images
import numpy as np
from PIL import Image


def float64_path(image):
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    else:
        finite = array[np.isfinite(array)]
        unit = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        scaled = np.nan_to_num(array.astype(np.float64)) * (255.0 if unit else 1.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))


if sys.argv[2] == "float64":
    images._high_bit_depth_to_l = float64_path
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets VmHWM, the peak resident size, to the current size
base = status("VmRSS:")
image = images.load_image(sys.argv[1], max_bytes=2**30)
print(status("VmHWM:") - base, image.size[0] * image.size[1])
"""


def _peak_bytes(path, variant: str) -> int:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), variant],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[0])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["png16", "tiff_float"])
def test_large_high_bit_depth_images_load_without_float64_copies(tmp_path, kind):
    """A 36-megapixel 16-bit PNG and a 25-megapixel float TIFF, each loaded in a fresh process.

    The bound: the file, the decoded raw pixels, and three 8-bit RGB copies of the image (the
    result and the conversions on the way). The float64 path needed more than that.
    """
    if kind == "png16":
        side = (6000, 6000)
        raw = np.add.outer(np.arange(side[0]) * 7, np.arange(side[1]) * 3) % 65536
        image = Image.fromarray(raw.astype(np.uint16))
        path, raw_bytes = tmp_path / "large16.png", 2 * side[0] * side[1]
        image.save(path)
    else:
        side = (5000, 5000)
        raw = np.add.outer(np.arange(side[0]), np.arange(side[1])) / sum(side)
        image = Image.fromarray(raw.astype(np.float32), mode="F")
        path, raw_bytes = tmp_path / "large_float.tif", 4 * side[0] * side[1]
        image.save(path, compression="tiff_adobe_deflate")
    del raw, image
    bound = path.stat().st_size + raw_bytes + 3 * (3 * side[0] * side[1])
    peak = _peak_bytes(path, "new")
    assert peak < bound, (peak / 2**20, bound / 2**20)
    assert _peak_bytes(path, "float64") > bound  # the bound would have caught the old path
