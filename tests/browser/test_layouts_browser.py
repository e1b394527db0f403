"""Layer outputs of every common layout in a real browser: a vision transformer's patch grid and
class token, a Swin transformer's channels-last stage, and a ``.pt2`` model's real module types.

Screenshots are taken at 1400×900 and at 1024×768 (``screenshots/layouts_*.png``).
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import pytest
import torch
from test_app_browser import (
    assert_no_exception,
    choose_model_file,
    click_at,
    open_app,
    plot_area,
    selection_text,
    settle,
)
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
SIZES = {"wide": (1400, 900), "small": (1024, 768)}


@functools.cache
def export(kind: str) -> bytes:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "vit":
            model = VisionTransformer(
                image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                mlp_dim=32, num_classes=5,
            )  # fmt: skip
            # torchvision starts the head at zero (every score 0): give it weights.
            torch.nn.init.normal_(model.heads.head.weight, std=0.5)
        else:
            model = SwinTransformer(
                patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                window_size=[2, 2], num_classes=5,
            )  # fmt: skip
        program = torch.export.export(
            model.eval(),
            (torch.rand(2, 3, 32, 32),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture
def sized_page(browser, app_url: str, request):
    """A fresh session whose viewport is one of :data:`SIZES` (the test's parameter)."""
    width, height = SIZES[request.param]
    context = browser.new_context(viewport={"width": width, "height": height})
    tab = context.new_page()
    tab.set_default_timeout(120_000)
    try:
        yield tab
    finally:
        context.close()


def shots(page, name: str, selector: str | None = None) -> None:
    """Screenshots of what is on screen at both sizes (the element ``selector`` scrolled into
    view first), back at the page's own size afterwards."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    own = page.viewport_size
    for label, (width, height) in SIZES.items():
        page.set_viewport_size({"width": width, "height": height})
        settle(page, quiet_s=0.8)
        if selector is not None:
            page.locator(selector).first.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / f"layouts_{name}_{label}.png"))
    page.set_viewport_size(own)
    settle(page, quiet_s=0.5)


def load(page, app_url: str, kind: str) -> None:
    open_app(page, app_url)
    choose_model_file(page, f"{kind}.pt2", export(kind))
    page.locator("button", has_text="Load model").click()
    try:
        page.wait_for_selector("text=Loaded")
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"layouts_failed_load_{kind}.png"))
        raise
    settle(page)
    assert_no_exception(page)


def layer_option(page, name: str):
    """The option of layer ``name`` in the open "Pick by name" list (it shows the type)."""
    page.locator(".st-key-_w_layer_select input").click()
    page.keyboard.type(name)
    return page.get_by_role("option").filter(has_text=re.compile(rf"^{re.escape(name)}\s")).first


def pick_layer(page, name: str) -> None:
    page.locator('[data-testid="stSidebar"] a', has_text="Layer picker").click()
    try:
        page.wait_for_selector(".st-key-_w_layer_select")
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "layouts_failed_layer_picker.png"))
        raise
    settle(page)
    layer_option(page, name).click()
    page.wait_for_function(
        f"() => document.body.innerText.includes('Chosen layer') && "
        f"document.body.innerText.includes({name!r})"
    )
    settle(page)


def click_cell(page, key: str, row: int, column: int) -> None:
    """Click cell (row, column) of the heatmap drawn with widget key ``key``."""
    height, width = page.evaluate(
        f"""() => {{
            const z = document.querySelector('.st-key-{key} .js-plotly-plot')._fullData[0].z;
            return [z.length, z[0].length];
        }}"""
    )
    box = plot_area(page, key)
    click_at(
        page,
        box["x"] + (column + 0.5) / width * box["width"],
        box["y"] + (row + 0.5) / height * box["height"],
    )


@pytest.mark.parametrize("sized_page", ["wide"], indirect=True)
def test_vit_patch_click_selects_a_neuron_and_shows_its_gradient(sized_page, app_url):
    page = sized_page
    load(page, app_url, "vit")
    pick_layer(page, "encoder.layers.encoder_layer_1")
    shots(page, "vit_layer_picker")
    text = page.locator("body").inner_text()
    assert "a class token and a 4×4 grid of image patches" in text
    # The .pt2 model's tree shows the original module types.
    assert "InterpreterModule" not in text
    assert "EncoderBlock" in layer_option(page, "encoder.layers.encoder_layer_2").inner_text()
    page.keyboard.press("Escape")

    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector(".st-key-cond_channel_map .js-plotly-plot")
    page.wait_for_selector(".st-key-cond_class_token .js-plotly-plot")
    settle(page)
    feature = int(re.search(r"feature (\d+)", selection_text(page)).group(1))
    click_cell(page, "cond_channel_map", 2, 1)
    page.wait_for_selector(".st-key-cond_preview .js-plotly-plot")
    settle(page)
    assert f"feature {feature} at patch row 2, column 1" in selection_text(page)
    assert "does not exist" not in page.locator("body").inner_text()
    assert_no_exception(page)
    shots(page, "vit_patch_selected", ".st-key-cond_channel_map")

    # The class token beside the grid is a neuron too.
    click_cell(page, "cond_class_token", 0, 0)
    page.wait_for_function(
        "() => document.body.innerText.includes('of the class token')", timeout=120_000
    )
    settle(page)
    assert f"feature {feature} of the class token" in selection_text(page)

    page.locator('[data-testid="stSidebar"] a', has_text="Neuron gradient").click()
    page.wait_for_selector(".st-key-ng_signed .js-plotly-plot")
    settle(page)
    body = page.locator("body").inner_text()
    assert "No neuron selected yet" not in body and "does not exist" not in body
    assert f"feature {feature} of the class token" in body
    click_cell(page, "ng_activation", 3, 3)
    page.wait_for_function(
        f"() => document.body.innerText.includes('feature {feature} at patch row 3, column 3')",
        timeout=120_000,
    )
    settle(page)
    assert_no_exception(page)
    shots(page, "vit_neuron_gradient", ".st-key-ng_activation")


@pytest.mark.parametrize("sized_page", ["small"], indirect=True)
def test_swin_channels_last_stage_is_a_map(sized_page, app_url):
    page = sized_page
    load(page, app_url, "swin")
    pick_layer(page, "features.3")
    text = page.locator("body").inner_text()
    assert "16 channels on a 4×4 map (channels last)" in text
    assert "InterpreterModule" not in text
    # The .pt2 model's blocks are named by their original class in the layer list.
    assert "SwinTransformerBlock" in layer_option(page, "features.1.0").inner_text()
    page.keyboard.press("Escape")
    shots(page, "swin_layer_picker")

    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector(".st-key-cond_channel_map .js-plotly-plot")
    settle(page)
    channel = int(re.search(r"channel (\d+)", selection_text(page)).group(1))
    click_cell(page, "cond_channel_map", 1, 2)
    page.wait_for_selector(".st-key-cond_preview .js-plotly-plot")
    settle(page)
    assert f"neuron ({channel}, 1, 2)" in selection_text(page)
    assert_no_exception(page)
    shots(page, "swin_cell_selected", ".st-key-cond_channel_map")

    # An ambiguous stage: (8, 8, 8) fits both orders, and the choice is offered.
    pick_layer(page, "features.1")
    body = page.locator("body").inner_text()
    assert "Layout of this layer's output" in body and "a guess" in body
    shots(page, "swin_layout_choice", ".st-key-_w_layout_picker")
