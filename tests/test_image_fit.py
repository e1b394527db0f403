"""Fitting non-square pictures to a model's input: crop, pad or stretch, pixel by pixel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from explainer.errors import ImageLoadError
from explainer.images import (
    FIT_MODES,
    Preprocessing,
    deprocess,
    fit_layout,
    fit_preview,
    mark_padding,
    preprocess,
    resize_and_crop,
)


def _columns_image(width: int, height: int) -> Image.Image:
    """Greyscale-as-RGB picture whose column ``c`` has the value ``10 * c``."""
    row = (np.arange(width, dtype=np.uint8) * 10)[None, :, None]
    return Image.fromarray(np.repeat(np.repeat(row, height, axis=0), 3, axis=2))


def _rows_image(width: int, height: int) -> Image.Image:
    """Picture whose row ``r`` has the value ``10 * r``."""
    col = (np.arange(height, dtype=np.uint8) * 10)[:, None, None]
    return Image.fromarray(np.repeat(np.repeat(col, width, axis=1), 3, axis=2))


def _prep(fit: str, size: int = 4, resize: int | None = 4) -> Preprocessing:
    # mean 0 and std 1: the tensor holds the pixels / 255, easy to compare exactly.
    return Preprocessing((0.0,) * 3, (1.0,) * 3, (size, size), resize, 3, "custom", fit)


def test_fit_modes_and_default():
    assert FIT_MODES == ("crop", "pad", "resize")
    assert Preprocessing.imagenet().fit == "crop"
    assert Preprocessing.for_model(224, (0.5,) * 3, (0.2,) * 3).fit == "crop"
    with pytest.raises(ImageLoadError, match="fit must be one of crop, pad, resize"):
        _prep("squash")


def test_crop_keeps_the_centre_columns_of_a_wide_picture():
    image = _columns_image(8, 4)  # shorter side already 4: the crop alone decides
    out = np.asarray(resize_and_crop(image, _prep("crop")))
    assert out.shape == (4, 4, 3)
    assert out[0, :, 0].tolist() == [20, 30, 40, 50]  # columns 2..5 survive
    layout = fit_layout(8, 4, _prep("crop"))
    assert layout.kept == (2, 0, 6, 4) and layout.cut == (2, 0, 2, 0)
    assert layout.placed == (0, 0, 4, 4) and layout.padding == (0, 0, 0, 0)
    assert layout.caption() == "Cut 2 px left and right (50% of the width)."
    assert not layout.same_shape


def test_crop_keeps_the_centre_rows_of_a_tall_picture_with_uneven_margins():
    image = _rows_image(4, 7)  # 3 rows to cut: torchvision rounds the top margin 1.5 up to 2
    out = np.asarray(resize_and_crop(image, _prep("crop")))
    assert out[:, 0, 0].tolist() == [20, 30, 40, 50]
    layout = fit_layout(4, 7, _prep("crop"))
    assert layout.cut == (0, 2, 0, 1)
    assert layout.caption() == "Cut 2 px top and 1 px bottom (43% of the height)."


def test_crop_after_resize_counts_the_original_pixels():
    # 16 x 8 picture, shorter side scaled 8 -> 4 (halved), centre 4 x 4 kept: original columns
    # 4..11 survive, the crop ratio cuts nothing vertically.
    layout = fit_layout(16, 8, _prep("crop", size=4, resize=4))
    assert layout.kept == (4, 0, 12, 8)
    # The ImageNet pipeline on a 400 x 300 photo: 341 x 256, centre 224 x 224.
    layout = fit_layout(400, 300, Preprocessing.imagenet(224))
    assert layout.kept == (68, 19, 331, 281)
    assert layout.caption() == (
        "Cut 68 px left and 69 px right (34% of the width) and 19 px top and bottom "
        "(13% of the height)."
    )


def test_pad_scales_the_longer_side_and_pads_with_zero_after_normalising():
    # One colour everywhere, so scaling 8 x 4 down to 4 x 2 changes no value.
    image = Image.new("RGB", (8, 4), (40, 100, 200))
    prep = Preprocessing((0.5, 0.25, 0.75), (0.5, 0.5, 0.5), (4, 4), 4, 3, "custom", "pad")
    x = preprocess(image, prep)
    assert x.shape == (1, 3, 4, 4)
    # Rows 0 and 3 are padding: exactly zero in every channel once normalised.
    assert torch.equal(x[0, :, 0], torch.zeros(3, 4))
    assert torch.equal(x[0, :, 3], torch.zeros(3, 4))
    # Rows 1 and 2 are the picture: its colour, normalised.
    colour = (torch.tensor([40, 100, 200]) / 255 - torch.tensor([0.5, 0.25, 0.75])) / 0.5
    torch.testing.assert_close(x[0, :, 1:3], colour.view(3, 1, 1).expand(3, 2, 4))
    layout = fit_layout(8, 4, prep)
    assert layout.placed == (0, 1, 4, 3) and layout.padding == (0, 1, 0, 1)
    assert layout.cut == (0, 0, 0, 0)
    assert layout.caption() == (
        "Nothing cut: scaled to 4 × 2 px and padded 1 px top and bottom "
        "(50% of the input's height)."
    )
    # On PIL images the padding is the mean colour, rounded to whole pixel values.
    pil = np.asarray(resize_and_crop(image, prep))
    assert pil[0].tolist() == [[128, 64, 191]] * 4
    assert pil[1:3].reshape(-1, 3).tolist() == [[40, 100, 200]] * 8


def test_pad_of_a_tall_picture_lands_left_and_right():
    prep = _prep("pad", size=6)
    layout = fit_layout(3, 6, prep)
    assert layout.placed == (1, 0, 4, 6)  # 3 columns of picture, 1 left and 2 right
    x = preprocess(_rows_image(3, 6), prep)
    assert torch.equal(x[0, :, :, 0], torch.zeros(3, 6))
    assert torch.equal(x[0, :, :, 4:], torch.zeros(3, 6, 2))
    assert x[0, 0, :, 1:4].min() >= 0 and x[0, 0, 5, 1] > 0


def test_resize_stretches_to_the_input_size_and_keeps_everything():
    prep = _prep("resize", size=4)
    out = resize_and_crop(_columns_image(8, 2), prep)
    assert out.size == (4, 4)
    assert preprocess(_columns_image(8, 2), prep).shape == (1, 3, 4, 4)
    layout = fit_layout(8, 2, prep)
    assert layout.cut == (0, 0, 0, 0) and layout.padding == (0, 0, 0, 0)
    assert layout.stretch == pytest.approx(0.25)
    assert layout.caption() == (
        "Nothing cut: stretched from 8 × 2 to 4 × 4 px, so shapes are squeezed to 25% of "
        "their width."
    )
    # Every column of the original contributes: the outer columns (values 0 and 70) reach the
    # output's first and last columns; a centre crop would keep only columns 3 and 4.
    assert np.asarray(out)[0, :, 0].tolist() == [7, 25, 45, 63]


def test_square_pictures_have_the_inputs_shape():
    for fit in FIT_MODES:
        assert fit_layout(10, 10, _prep(fit)).same_shape
    assert not fit_layout(10, 9, _prep("pad")).same_shape
    non_square_input = Preprocessing((0.0,) * 3, (1.0,) * 3, (2, 4), None, 3, "custom", "pad")
    assert fit_layout(8, 4, non_square_input).same_shape


def test_crop_results_do_not_change():
    """The default mode is the geometry that existed before there was a choice."""
    image = _columns_image(12, 7)
    prep = Preprocessing.for_model(4, (0.5,) * 3, (0.25,) * 3)
    assert prep.fit == "crop"
    legacy = prep.geometry()
    assert np.array_equal(
        np.asarray(resize_and_crop(image, prep)),
        np.asarray(legacy(image)),
    )
    assert not torch.equal(
        preprocess(image, prep), preprocess(image, dataclasses.replace(prep, fit="pad"))
    )


def test_mark_padding_hatches_only_outside_the_picture():
    pixels = np.full((12, 12, 3), 128, dtype=np.uint8)
    marked = mark_padding(pixels, (0, 3, 12, 9))
    assert np.array_equal(marked[3:9], pixels[3:9])  # the picture is untouched
    assert (marked[:3] != 128).any() and (marked[9:] != 128).any()
    assert (marked[:3] < 128).all(axis=-1).sum() == (marked[:3] != 128).all(axis=-1).sum()
    dark = mark_padding(np.zeros((12, 12), dtype=np.uint8), (3, 0, 9, 12))
    assert dark[:, :3].max() > 0 and dark[:, 3:9].max() == 0  # lighter stripes on black
    assert np.array_equal(mark_padding(pixels, (0, 0, 12, 12)), pixels)


def test_fit_preview_shades_the_cut_and_hatches_the_padding():
    image = Image.new("RGB", (40, 20), (200, 200, 200))
    crop = fit_preview(image, _prep("crop", size=4, resize=4), max_side=40)
    assert crop.shape == (20, 40, 3)
    assert crop[10, 2].max() < 100  # cut away: shaded
    assert tuple(crop[10, 20]) == (200, 200, 200)  # kept
    assert tuple(crop[0, 20]) == (255, 160, 0)  # the kept part's outline
    pad = fit_preview(image, _prep("pad", size=4), max_side=40)
    assert pad.shape == (40, 40, 3)
    assert tuple(pad[20, 20]) == (200, 200, 200)
    bars = pad[:10].reshape(-1, 3)
    assert {tuple(v) for v in bars} >= {(0, 0, 0)}  # the mean (0) colour...
    assert len({tuple(v) for v in bars}) > 1  # ...with stripes
    stretch = fit_preview(image, _prep("resize", size=4), max_side=40)
    assert stretch.shape == (40, 40, 3)


def test_deprocess_of_padding_is_the_mean_colour():
    prep = Preprocessing.imagenet(8)
    prep = dataclasses.replace(prep, fit="pad")
    pixels = deprocess(preprocess(_columns_image(16, 4), prep), prep)
    assert pixels[0, 0].tolist() == [124, 116, 104]


def test_describe_names_the_fit_mode():
    prep = Preprocessing.imagenet(224)
    assert prep.describe().startswith("resize the shorter side to 256, centre-crop 224×224; ")
    assert (
        dataclasses.replace(prep, fit="pad")
        .describe()
        .startswith("scale to fit inside 224×224, pad the rest with the mean colour; ")
    )
    assert (
        dataclasses.replace(prep, fit="resize")
        .describe()
        .startswith("stretch to 224×224 (aspect ratio not kept); ")
    )
    assert "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in prep.describe()
