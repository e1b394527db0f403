"""Links in a real browser: a copied address opens the same view elsewhere, after a reload and
after the server restarts; a link to content the server lost says so."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, START_TIMEOUT_S, _free_port, _healthy
from PIL import Image
from test_app_browser import settle

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("EXPLAINER_SHOTS_DIR", Path(__file__).parent / "screenshots"))
SIZES = {"wide": (1400, 900), "small": (1024, 768), "tall": (1500, 1600)}


class Server:
    """``streamlit run app.py`` with its own upload store, which can be stopped and restarted."""

    def __init__(self, store: Path, log: Path) -> None:
        self.store, self.log_path = store, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "EXPLAINER_UPLOAD_DIR": str(self.store)}
        log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py"]
            + ["--server.port", str(self.port), "--server.address", "127.0.0.1"]
            + ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
            # Files edited while the test runs must not reload modules under a running server.
            + ["--server.fileWatcherType", "none"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(self.url):
            if self.process.poll() is not None:
                pytest.fail(f"streamlit exited ({self.process.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer in {START_TIMEOUT_S} s; see {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    instance = Server(tmp_path / "uploads", SHOTS / "links-server.log")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def new_tab(browser, size: str = "wide"):
    width, height = SIZES[size]
    context = browser.new_context(viewport={"width": width, "height": height})
    tab = context.new_page()
    tab.set_default_timeout(180_000)
    return context, tab


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"links_{name}.png"))


def no_traceback(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.locator("body").inner_text()


def png(colour: tuple[int, int, int]) -> bytes:
    pixels = np.full((40, 48, 3), 128, dtype=np.uint8)
    pixels[10:30, 12:36] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class TinyNet(torch.nn.Module):
    """A small classifier, exported with ``torch.export``: a file that names its own layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


def tiny_export() -> bytes:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = TinyNet().eval()
    program = torch.export.export(
        module, (torch.rand(2, 3, 32, 32),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def neuron_shown(page) -> str:
    """``(c, y, x) of layer name`` as the Neuron gradient page writes it."""
    page.wait_for_selector("text=of layer", timeout=120_000)
    text = page.locator("body").inner_text()
    match = re.search(r"Neuron (\([0-9, ]+\))[^\n]*? of layer (\S+)", text)
    assert match, text[:2000]
    return f"{match.group(1)} of layer {match.group(2)}"


def sidebar(page) -> str:
    return page.locator('[data-testid="stSidebar"]').inner_text()


def images_param(url: str) -> str:
    """The link's image digests; the page rewrites them from what the session really holds."""
    match = re.search(r"[?&]images=([^&]+)", url)
    return match.group(1) if match else ""


def open_link(page, url: str) -> None:
    page.goto(url)
    try:
        page.wait_for_selector("h1", timeout=180_000)  # the first page starts the model's worker
    except Exception:
        shot(page, "failed_to_open")
        raise
    settle(page)


def test_a_link_opens_the_same_view_after_reload_restart_and_in_another_browser(browser, server):
    context, page = new_tab(browser, "tall")  # room for the upload form without scrolling
    try:
        open_link(page, server.url)
        # An uploaded image and an uploaded model (a torch.export program).
        page.locator(".st-key-_w_image_files input[type=file]").set_input_files(
            files=[
                {"name": "green_block.png", "mimeType": "image/png", "buffer": png((20, 190, 40))}
            ]
        )
        page.wait_for_selector("text=green_block.png")
        settle(page)
        page.locator(".st-key-_w_model_source label", has_text="Upload my own").click()
        page.locator(".st-key-_w_model_file input[type=file]").set_input_files(
            files=[
                {
                    "name": "tiny.pt2",
                    "mimeType": "application/octet-stream",
                    "buffer": tiny_export(),
                }
            ]
        )
        page.wait_for_selector(".st-key-_w_model_file >> text=tiny.pt2")
        settle(page)
        page.locator("button", has_text="Load model").click()
        page.wait_for_selector("text=Loaded")
        settle(page)
        assert "tiny.pt2" in sidebar(page)
        assert "model=" in page.url and "images=" in page.url

        # A layer, then a neuron other than the one shown first.
        page.locator('[data-testid="stSidebar"] a', has_text="Layer picker").click()
        page.wait_for_selector("h1:has-text('Layer picker')")
        settle(page)
        pills = page.locator(".st-key-_w_layer_pills button")
        pills.first.wait_for()
        names = [pills.nth(i).inner_text().strip("★ ").strip() for i in range(pills.count())]
        current = re.search(r"layer=([^&]+)", page.url)
        layer = next(n for n in names if not current or n != current.group(1))
        pills.nth(names.index(layer)).click()
        page.wait_for_function("(l) => location.search.includes('layer=' + l)", arg=layer)
        settle(page)
        page.locator('[data-testid="stSidebar"] a', has_text="Neuron gradient").click()
        page.wait_for_selector("h1:has-text('Neuron gradient')")
        settle(page)
        first = neuron_shown(page)
        field = page.locator(".st-key-_w_n0 input")  # the channel
        c = int(field.input_value())
        field.fill(str(c + 1 if c == 0 else c - 1))
        field.press("Enter")
        page.wait_for_function("(t) => !document.body.innerText.includes(t)", arg=first)
        settle(page)
        chosen = neuron_shown(page)
        assert chosen != first and chosen.endswith(f"of layer {layer}")
        page.wait_for_function(
            "(n) => decodeURIComponent(location.search).includes('neuron=' + n)",
            arg=re.sub(r"[() ]", "", chosen.split(" of ")[0]),
        )
        link = page.url
        assert "/neuron_gradient?" in link
        assert len(link) < 400, link
        no_traceback(page)
        page.set_viewport_size({"width": 1400, "height": 900})
        shot(page, "01_view_wide")

        # The same view in a fresh browser context (a new session), at the smaller size.
        other_context, other = new_tab(browser, "small")
        try:
            open_link(other, link)
            assert neuron_shown(other) == chosen
            assert "tiny.pt2" in sidebar(other)
            assert images_param(other.url) == images_param(link) != ""
            assert (
                other.locator('[data-testid="stAlert"]', has_text="could not be shown").count() == 0
            )
            no_traceback(other)
            shot(other, "02_link_in_new_context_small")
        finally:
            other_context.close()

        # A reload keeps the uploaded model, the images and the neuron.
        page.reload()
        page.wait_for_selector("h1:has-text('Neuron gradient')")
        settle(page)
        assert neuron_shown(page) == chosen
        assert "tiny.pt2" in sidebar(page) and images_param(page.url) == images_param(link)
    finally:
        context.close()

    # A restarted server finds everything again in its store.
    server.stop()
    server.start()
    context, page = new_tab(browser)
    try:
        open_link(page, link)
        assert neuron_shown(page) == chosen
        assert "tiny.pt2" in sidebar(page) and images_param(page.url) == images_param(link)
        no_traceback(page)
        shot(page, "03_after_restart_wide")
    finally:
        context.close()

    # Content the server no longer holds: said plainly, the rest of the view kept.
    shutil.rmtree(server.store)
    for size in ("wide", "small"):
        context, page = new_tab(browser, size)
        try:
            open_link(page, link)
            alert = page.locator('[data-testid="stAlert"]', has_text="could not be shown").first
            text = alert.inner_text()
            assert "The model in this link is no longer on this server" in text
            assert "upload it again" in text
            assert "model=" in page.url and f"layer={layer}" in page.url  # the link is kept
            assert "Demo CNN" in sidebar(page)  # the built-in model meanwhile
            no_traceback(page)
            shot(page, f"04_evicted_{size}")
        finally:
            context.close()
