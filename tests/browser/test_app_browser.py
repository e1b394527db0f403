"""The whole journey in a real browser: built-in model, heatmap clicks, uploads, no tracebacks."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"

BUSY = '[data-testid="stSkeleton"], [data-testid="stProgress"], [data-testid="stSpinner"]'


def settle(page, quiet_s: float = 1.5, timeout_s: float = 240.0) -> None:
    """Wait until nothing is loading or computing for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        busy = page.locator(BUSY).count()
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError("the page kept loading")


def open_app(page, url: str, path: str = "") -> None:
    page.goto(f"{url}/{path}")
    page.wait_for_selector("h1")
    settle(page)


def assert_no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.locator("body").inner_text()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def plot_area(page, key: str):
    """Bounding box of the plotting area of the chart drawn with widget key ``key``."""
    area = page.locator(f".st-key-{key} .nsewdrag").first
    area.scroll_into_view_if_needed()
    box = area.bounding_box()
    assert box is not None, f"chart {key} is not visible"
    return box


def click_at(page, x: float, y: float) -> None:
    """Hover first, then press: plotly picks the clicked point from the hover."""
    page.mouse.move(x - 4, y - 4)
    time.sleep(0.15)
    page.mouse.move(x, y)
    time.sleep(0.25)
    page.mouse.down()
    page.mouse.up()


def choose_model_file(page, name: str, data: bytes) -> None:
    """Switch the model source to an upload and put ``data`` in its file field as ``name``."""
    page.locator(".st-key-_w_model_source label", has_text="Upload my own").click()
    page.wait_for_selector(".st-key-_w_model_file input[type=file]", state="attached")
    page.locator(".st-key-_w_model_file input[type=file]").set_input_files(
        files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}]
    )
    page.wait_for_selector(f".st-key-_w_model_file >> text={name}")


def selection_text(page) -> str:
    return page.locator('[data-testid="stAlert"]', has_text="Selected:").first.inner_text()


def test_opens_on_builtin_model_and_shows_conductance_heatmaps(page, app_url):
    open_app(page, app_url)
    assert page.locator("h1").first.inner_text() == "Model & images"
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert "Demo CNN" in sidebar
    assert page.locator('[data-testid="stImage"]').count() >= 2
    assert_no_exception(page)
    shot(page, "01_model_and_images")

    page.locator('[data-testid="stSidebar"] a', has_text="Layer picker").click()
    page.wait_for_selector("h1:has-text('Layer picker')")
    settle(page)
    assert_no_exception(page)
    shot(page, "02_layer_picker")

    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector("h1:has-text('Layer conductance')")
    page.wait_for_selector(".st-key-cond_grid .js-plotly-plot")
    settle(page)
    for key in ("cond_bars", "cond_grid", "cond_channel_map", "cond_overlay"):
        assert page.locator(f".st-key-{key} .js-plotly-plot").count() == 1, key
    assert page.locator(".st-key-cond_grid .heatmaplayer").count() == 1
    assert "Selected: channel" in selection_text(page)
    assert_no_exception(page)
    shot(page, "03_layer_conductance")


def test_clicking_a_heatmap_cell_selects_the_neuron_and_shows_its_gradient(page, app_url):
    open_app(page, app_url, "layer_conductance")
    page.wait_for_selector(".st-key-cond_channel_map .js-plotly-plot")
    settle(page)
    channel = int(re.search(r"channel (\d+)", selection_text(page)).group(1))
    assert page.locator(".st-key-cond_preview").count() == 0

    box = plot_area(page, "cond_channel_map")
    # Click the cell with the largest |conductance| of the selected channel's map.
    y, x, height, width = page.evaluate(
        """() => {
            const gd = document.querySelector('.st-key-cond_channel_map .js-plotly-plot');
            const z = gd._fullData[0].z;
            let best = [0, 0], top = -1;
            z.forEach((row, i) => row.forEach((v, j) => {
                if (Math.abs(v) > top) { top = Math.abs(v); best = [i, j]; }
            }));
            return [best[0], best[1], z.length, z[0].length];
        }"""
    )
    started = time.monotonic()
    click_at(
        page,
        box["x"] + (x + 0.5) / width * box["width"],
        box["y"] + (y + 0.5) / height * box["height"],
    )
    page.wait_for_selector(".st-key-cond_preview .js-plotly-plot")
    elapsed = time.monotonic() - started
    print(f"click on a heatmap cell -> gradient map shown: {elapsed:.2f} s")
    settle(page)
    assert f"neuron ({channel}, {y}, {x})" in selection_text(page)
    assert_no_exception(page)
    shot(page, "04_conductance_neuron_selected")

    # A click on a channel tile selects that channel; the neuron keeps its position.
    box = plot_area(page, "cond_grid")
    click_at(page, box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.08)
    page.wait_for_function(
        "([c, y, x]) => !document.body.innerText.includes(`neuron (${c}, ${y}, ${x})`)",
        arg=[channel, y, x],
    )
    settle(page)
    new_channel = int(re.search(r"channel (\d+)", selection_text(page)).group(1))
    assert new_channel != channel
    assert f"neuron ({new_channel}, {y}, {x})" in selection_text(page)

    # The selection is shared with the neuron gradient page.
    page.locator('[data-testid="stSidebar"] a', has_text="Neuron gradient").click()
    page.wait_for_selector("h1:has-text('Neuron gradient')")
    page.wait_for_selector(".st-key-ng_signed .js-plotly-plot")
    settle(page)
    assert f"Neuron ({new_channel}, {y}, {x})" in page.locator("body").inner_text()
    assert page.locator(".st-key-ng_neighbours .js-plotly-plot").count() == 1
    assert_no_exception(page)
    shot(page, "05_neuron_gradient")

    # One click on a neighbour thumbnail opens that neuron: the tile of the channel before.
    neighbour, hover = page.evaluate(
        """() => {
            const t = document.querySelector('.st-key-ng_neighbours .js-plotly-plot')._fullData[1];
            return [t.customdata.map(c => Array.from(c)), Array.from(t.text)];
        }"""
    )
    # The most active neighbour (tile 0 is the current neuron itself).
    activity = [float(re.search(r"activation ([-+0-9.eE]+)", t).group(1)) for t in hover]
    index = max(range(1, len(neighbour)), key=lambda i: activity[i])
    target = neighbour[index]
    xs, ys = page.evaluate(
        """(i) => {
            const gd = document.querySelector('.st-key-ng_neighbours .js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, t = gd._fullData[1];
            return [xa.l2p(t.x[i]), ya.l2p(t.y[i])];
        }""",
        index,
    )
    box = plot_area(page, "ng_neighbours")
    click_at(page, box["x"] + xs, box["y"] + ys)
    expected = f"Neuron ({target[0]}, {target[1]}, {target[2]})"
    page.wait_for_function("(t) => document.body.innerText.includes(t)", arg=expected)
    settle(page)
    assert_no_exception(page)
    shot(page, "06_neighbour_opened")

    # The arrow buttons step to the next neuron (when there is one).
    if target[2] + 1 < width:
        page.locator("button", has_text="→ right").click()
        expected = f"Neuron ({target[0]}, {target[1]}, {target[2] + 1})"
        page.wait_for_function("(t) => document.body.innerText.includes(t)", arg=expected)
        settle(page)
        assert_no_exception(page)


def test_convergence_page_shows_badges_and_sweep(page, app_url):
    open_app(page, app_url, "convergence")
    page.wait_for_selector(".st-key-conv_plot .js-plotly-plot")
    settle(page)
    text = page.locator("body").inner_text()
    assert re.search(r"\d+ pass", text) and re.search(r"\d+ warn", text)
    assert_no_exception(page)
    shot(page, "07_convergence")


def _png(colour: tuple[int, int, int]) -> bytes:
    pixels = np.full((80, 80, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[0:80, 0:80]
    pixels[(yy - 40) ** 2 + (xx - 40) ** 2 < 20**2] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _squeezenet_state_dict() -> bytes:
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_uploading_an_image_and_a_state_dict_with_its_architecture(page, app_url):
    open_app(page, app_url)
    page.locator(".st-key-_w_image_files input[type=file]").set_input_files(
        files=[{"name": "red_disc.png", "mimeType": "image/png", "buffer": _png((200, 30, 30))}]
    )
    page.wait_for_selector("text=red_disc.png")
    settle(page)
    # The upload becomes the image the explanation pages show.
    assert "red_disc.png · explaining" in page.locator("body").inner_text()
    assert_no_exception(page)

    choose_model_file(page, "squeeze.pt", _squeezenet_state_dict())
    combo = page.locator(".st-key-_w_arch input[role='combobox']")
    combo.click()
    combo.fill("squeezenet1_1")
    page.get_by_role("option", name="squeezenet1_1", exact=True).click()
    settle(page)
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector("text=Loaded")
    settle(page)
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert "squeezenet1_1" in sidebar
    assert_no_exception(page)
    shot(page, "08_uploaded_squeezenet")

    page.locator('[data-testid="stSidebar"] a', has_text="Layer picker").click()
    page.wait_for_selector("h1:has-text('Layer picker')")
    settle(page)
    assert "features" in page.locator("body").inner_text()
    assert_no_exception(page)
    shot(page, "09_squeezenet_layer_picker")

    # Conductance works on the uploaded model and image too.
    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector(".st-key-cond_grid .js-plotly-plot", timeout=120_000)
    settle(page)
    assert_no_exception(page)
    shot(page, "10_squeezenet_conductance")


def test_a_bad_model_file_shows_a_message_not_a_traceback(page, app_url):
    open_app(page, app_url)
    choose_model_file(page, "broken.pt", b"nope")
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector('[data-testid="stAlert"]:has-text("broken.pt")')
    settle(page)
    assert "Demo CNN" in page.locator('[data-testid="stSidebar"]').inner_text()
    assert_no_exception(page)
    shot(page, "11_bad_model_file")


class _PixelScores(torch.nn.Module):
    """Two classes scored at every pixel of a 32 x 32 output (a tiny segmentation model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def _pixel_model_export() -> bytes:
    torch.manual_seed(0)
    program = torch.export.export(
        _PixelScores().eval(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def test_a_segmentation_model_explains_the_output_position_clicked(page, app_url):
    open_app(page, app_url)
    choose_model_file(page, "pixels.pt2", _pixel_model_export())
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector("text=Loaded")
    settle(page)
    assert "of the output" in page.locator('[data-testid="stSidebar"]').inner_text()
    assert_no_exception(page)

    page.locator('[data-testid="stSidebar"] a', has_text="Layer conductance").click()
    page.wait_for_selector(".st-key-cond_scores .js-plotly-plot", timeout=120_000)
    settle(page)
    assert "chosen automatically" in page.locator("body").inner_text()
    height, width = page.evaluate(
        """() => {
            const z = document.querySelector('.st-key-cond_scores .js-plotly-plot')._fullData[0].z;
            return [z.length, z[0].length];
        }"""
    )
    assert (height, width) == (32, 32)
    row, column = 5, 27
    box = plot_area(page, "cond_scores")
    click_at(
        page,
        box["x"] + (column + 0.5) / width * box["width"],
        box["y"] + (row + 0.5) / height * box["height"],
    )
    page.wait_for_function(
        "() => document.body.innerText.includes('the position you chose')", timeout=120_000
    )
    settle(page)
    text = page.locator("body").inner_text()
    assert f"row {row}, column {column}" in text
    assert_no_exception(page)
    shot(page, "12_segmentation_position_clicked")
