"""The Neuron card in a real browser: the flip search on a vision transformer's features, the
Stop button of the sanity check, and a PNG download when the server's Chromium cannot start.

- The flip search on a ViT token layer zeroes features (in every token) and is drawn; screenshots
  at 1400×900 and 1024×768 (``screenshots/neuron_card_vit_flip_*.png``).
- Stop: a ResNet-18 (random weights), slow enough for the sanity check to run for tens of
  seconds; Stop is pressed while it runs; the page says it stopped, shows no exception, and the
  model's worker (a child process of the server, watched through /proc) goes idle. Times are
  printed; nothing is asserted on time.
- A second app server whose ``CHROMIUM_PATH`` names a stand-in that exits at once: the PNG click
  ends in the plain failure message, and the card keeps everything it showed.
"""

from __future__ import annotations

import functools
import io
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import serve_app
from test_app_browser import assert_no_exception, choose_model_file, open_app, settle
from test_cancel_browser import busy_worker, wait_idle
from test_layouts_browser import export as layout_export
from test_layouts_browser import pick_layer
from test_load_browser import cpu_ticks, print_workers, worker_pids

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
SIZES = {"wide": (1400, 900), "small": (1024, 768)}
VIT_LAYER = "encoder.layers.encoder_layer_1"  # (N, 17, 16): a class token and 4×4 patches
STOPPED = "The sanity check was stopped before it finished"


# --- helpers ------------------------------------------------------------------------------------
def load_model(page, name: str, data: bytes) -> None:
    choose_model_file(page, name, data)
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector("text=Loaded")
    settle(page)
    assert_no_exception(page)


def open_card(page, timeout_s: float = 240.0) -> None:
    """Go to the Neuron card through the sidebar (keeping the session) and wait for its flip
    search to be drawn."""
    page.locator('[data-testid="stSidebar"] a', has_text="Neuron card").click()
    page.wait_for_selector("h1:has-text('Neuron card')")
    page.wait_for_selector(".st-key-card_flip .js-plotly-plot", timeout=timeout_s * 1000)
    settle(page, timeout_s=timeout_s)
    assert_no_exception(page)


def body_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def flip_points(page) -> list[float]:
    """The target scores drawn by the flip figure."""
    return page.evaluate(
        """() => Array.from(
            document.querySelector('.st-key-card_flip .js-plotly-plot')._fullData[0].y)"""
    )


def save_shots(page, name: str, selector: str) -> list[Path]:
    """Screenshots at both sizes with ``selector`` scrolled into view; copies go to
    $EXPLAINER_SHOTS_DIR when it is set."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    extra = os.environ.get("EXPLAINER_SHOTS_DIR")
    own = page.viewport_size
    paths = []
    for label, (width, height) in SIZES.items():
        page.set_viewport_size({"width": width, "height": height})
        settle(page, quiet_s=0.8)
        page.locator(selector).first.scroll_into_view_if_needed()
        time.sleep(0.3)
        path = SCREENSHOTS / f"neuron_card_{name}_{label}.png"
        page.screenshot(path=str(path))
        paths.append(path)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(extra) / path.name))
    page.set_viewport_size(own)
    settle(page, quiet_s=0.5)
    return paths


@functools.cache
def resnet18_state_dict() -> bytes:
    """torchvision's ResNet-18 with random weights: at 224 pixels one 16-step neuron
    conductance map takes seconds, so the sanity check runs long enough to be stopped (an
    exported program would not do: it cannot be copied, so the check refuses it at once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


# --- the flip search on a vision transformer ----------------------------------------------------
def test_the_flip_search_runs_on_a_vision_transformers_features(page, app_url):
    page.set_default_timeout(180_000)
    open_app(page, app_url)
    load_model(page, "vit.pt2", layout_export("vit"))
    pick_layer(page, VIT_LAYER)
    open_card(page)
    text = body_text(page)
    assert "How many top features does it take to change the decision?" in text
    assert "zeroes whole slices" not in text and "not run here" not in text
    assert "A feature is zeroed in every token, the class token included." in text
    outcome = page.locator(
        '[data-testid="stAlert"]',
        has_text=re.compile(r"Zeroing the top \d+ features? of|No number of top features"),
    ).first
    assert outcome.count() == 1, text
    print(f"[vit flip] {outcome.inner_text()!r}")
    points = flip_points(page)
    assert len(points) >= 2  # k = 0 and at least one feature zeroed
    # The axis names features; the search counted 16 features, not the 17 tokens.
    axis = page.evaluate(
        """() => document.querySelector('.st-key-card_flip .js-plotly-plot')
            ._fullLayout.xaxis.title.text"""
    )
    assert axis == "top features zeroed (k)"
    assert re.search(r"\bof 16\b", outcome.inner_text()), outcome.inner_text()
    save_shots(page, "vit_flip", ".st-key-card_flip")
    assert_no_exception(page)


# --- Stop while the sanity check runs -----------------------------------------------------------
def test_stop_ends_a_running_sanity_check_and_the_worker_goes_idle(page, app_server):
    url, server = app_server
    page.set_default_timeout(240_000)
    open_app(page, url)
    choose_model_file(page, "resnet18.pt", resnet18_state_dict())
    combo = page.locator(".st-key-_w_arch input[role='combobox']")
    combo.click()
    combo.fill("resnet18")
    page.get_by_role("option", name="resnet18", exact=True).click()
    settle(page)
    page.locator("button", has_text="Load model").click()
    page.wait_for_selector("text=Loaded")
    settle(page)
    pick_layer(page, "layer1")  # 64 channels: a short flip search
    open_card(page, timeout_s=300.0)
    before = body_text(page)
    print_workers(server.pid, "before the sanity check")

    page.get_by_role("button", name="Run the sanity check").click()
    # Run and Stop are one button, relabelled while the check runs: with two, the clicked Run
    # button lingered as a stale element and vanished as Stop was pressed, shifting Stop from
    # under the pointer (the click was lost and the check ran on).
    stop = page.locator(".st-key-_w_card_check button", has_text="Stop the sanity check")
    progress = page.locator('[data-testid="stProgress"]', has_text="maps")
    try:
        stop.wait_for()
        progress.first.wait_for()
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "neuron_card_failed_stop.png"), full_page=True)
        raise
    worker = busy_worker(server.pid)
    shown = progress.first.inner_text()
    print(f"[card stop] progress before Stop: {shown!r}")
    pressed = time.monotonic()
    stop.click()
    try:
        took, used = wait_idle(server.pid, worker, pressed, "card stop")
    except AssertionError:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "neuron_card_failed_idle.png"), full_page=True)
        print(f"[card stop] page after Stop: {body_text(page)[-1500:]!r}")
        raise

    page.get_by_text(STOPPED).wait_for(timeout=60_000)
    settle(page)
    assert_no_exception(page)
    after = body_text(page)
    assert STOPPED in after
    assert page.get_by_role("button", name="Run the sanity check").count() == 1
    assert page.get_by_role("button", name="Stop the sanity check").count() == 0
    assert "Verdict." not in after  # the check did not finish behind the message
    # Everything above the sanity check is still there.
    for line in ("Causal check: what happens without it", "Conductance", "Zero the top k"):
        assert line in before and line in after, line
    assert page.locator(".st-key-card_flip .js-plotly-plot").count() == 1
    # It stays idle: nothing of the stopped check is left running or queued.
    time.sleep(2.0)
    if worker in worker_pids(server.pid):
        a = cpu_ticks(worker)
        time.sleep(1.0)
        b = cpu_ticks(worker)
        print(f"[card stop] 3 s later: {b - a} ticks in 1 s")
        assert b - a < 3, "the worker started computing again after Stop"
    print(f"[card stop] worker idle {took:.2f} s after Stop ({used} ticks while sampling)")
    print_workers(server.pid, "after Stop")


# --- a PNG download when Chromium cannot start ----------------------------------------------------
@pytest.fixture(scope="module")
def broken_chromium_url(tmp_path_factory) -> Iterator[str]:
    """A second app server whose ``CHROMIUM_PATH`` names a stand-in that exits with an error
    (as a broken or half-removed Chromium would), so every PNG drawing fails."""
    folder = tmp_path_factory.mktemp("no-chromium")
    stand_in = folder / "chromium"
    stand_in.write_text("#!/bin/sh\necho 'chromium: cannot start here' >&2\nexit 1\n")
    stand_in.chmod(0o755)
    env = {**os.environ, "CHROMIUM_PATH": str(stand_in)}
    with serve_app(SCREENSHOTS / "streamlit-server-no-chromium.log", env) as (url, _process):
        yield url


def test_a_png_that_cannot_be_drawn_says_so_and_keeps_the_card(browser, broken_chromium_url):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(180_000)
    try:
        open_app(page, broken_chromium_url, "neuron_card")
        page.wait_for_selector(".st-key-card_flip .js-plotly-plot")
        settle(page)
        assert_no_exception(page)
        before = body_text(page)
        points = flip_points(page)
        heading = page.locator('[data-testid="stMarkdownContainer"]', has_text="Neuron (").first
        neuron = heading.inner_text()

        menu = page.locator(".st-key-card_causal_downloads button").first
        menu.scroll_into_view_if_needed()
        menu.click()
        png = page.locator(".st-key-card_causal_dl_flip_search_png button").first
        png.wait_for()
        assert png.is_enabled()  # the stand-in is there, so the server offers PNGs
        png.click()
        failure = page.locator('[data-testid="stAlert"]', has_text="The PNG could not be drawn")
        failure.first.wait_for(timeout=120_000)
        settle(page)
        # Said in the open menu, which covers part of the page, and under the download row.
        in_menu = page.locator('[data-testid="stPopoverBody"] [data-testid="stAlert"]')
        assert in_menu.filter(has_text="The PNG could not be drawn").count() == 1
        assert failure.count() == 2
        message = in_menu.first.inner_text()
        print(f"[no chromium] {message!r}")
        assert "Chromium could not be started on the server" in message
        # Plain words only: Playwright's API names and the browser's log stay in the server log.
        for name in ("BrowserType.", "Page.", "Target page", "exitCode", "cannot start here"):
            assert name not in message, name
        assert "Nothing on this page is lost" in message
        assert "Traceback" not in message
        assert_no_exception(page)
        # What the user sees: the message inside the open menu, and under the row.
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        failure.first.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "neuron_card_png_failure_wide.png"))
        if os.environ.get("EXPLAINER_SHOTS_DIR"):
            page.screenshot(
                path=str(Path(os.environ["EXPLAINER_SHOTS_DIR"]) / "neuron_card_png_failure.png")
            )

        # Everything the card showed is still there, for the same neuron.
        after = body_text(page)
        assert heading.inner_text() == neuron
        assert flip_points(page) == points
        for line in (
            "What the neuron responds to",
            "Causal check: what happens without it",
            "Zero the top k channels",
            "Sanity check: does the map depend on what the model learned?",
        ):
            assert line in before and line in after, line
        # The other downloads still work: the flip search's scores as CSV.
        csv = page.locator(".st-key-card_causal_dl_flip_target_score_csv button").first
        if not csv.is_visible():
            menu.click()
        csv.wait_for()
        with page.expect_download() as info:
            csv.click()
        data = Path(info.value.path()).read_text(encoding="utf-8")
        assert len([line for line in data.splitlines() if line.strip()]) >= len(points)
        assert_no_exception(page)
    finally:
        context.close()
