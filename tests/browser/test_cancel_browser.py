"""A job whose page goes away stops: a closed tab, and a rerun that supersedes it.

The long job is layer conductance on ``conv1`` with 16384 steps in passes of one path point, on a
server of this module's own that allows that many (a job of the default limit, 1024 steps, takes
about 2 s on a fast machine: over before it can be watched). The built-in model's worker (a child process of the server) is
watched through /proc: its CPU time must stop growing soon after the tab closes, long before the
job would have finished. Times are printed; nothing is asserted on time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest
from conftest import SCREENSHOTS, serve_app
from test_load_browser import (
    CLK_TCK,
    CONDUCTANCE,
    Solo,
    compare,
    cpu_ticks,
    go_to,
    metrics,
    open_session,
    pick_image,
    pick_layer,
    press_compute,
    print_workers,
    probe,
    screenshot,
    settle,
    sidebar_layer,
    worker_pids,
)

pytestmark = pytest.mark.browser

LONG_STEPS, LONG_BATCH = 16384, 1
SAMPLE_S = 0.25
IDLE_TICKS = 3  # CPU ticks over 0.5 s (two samples) that still count as idle
IDLE_WAIT_S = 40.0
PROGRESS = re.compile(r"(\d+) / (\d+) steps")


@pytest.fixture(scope="module")
def solo() -> Solo:
    return Solo()


@pytest.fixture(scope="module")
def long_server(chromium_path: str) -> Iterator[tuple[str, object]]:
    """A server of its own whose requests may ask for ``LONG_STEPS`` steps."""
    env = {**os.environ, "EXPLAINER_MAX_STEPS": str(LONG_STEPS)}
    with serve_app(SCREENSHOTS / "streamlit-cancel-server.log", env) as served:
        yield served


def busy_worker(server_pid: int) -> int:
    """The worker computing the session's job: the one whose CPU time grows most over one second
    (other models' workers, from earlier tests on the same server, sit idle)."""
    pids = worker_pids(server_pid)
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(1.0)
    growth = {pid: (cpu_ticks(pid) or 0) - (before[pid] or 0) for pid in pids}
    pid = max(growth, key=growth.get)
    print(f"[worker] pid {pid} busy: {growth[pid]} ticks in 1 s ({CLK_TCK} ticks/s); {growth}")
    assert growth[pid] > IDLE_TICKS, "the long job is not running in any worker"
    return pid


def progress_of(page) -> tuple[int, int] | None:
    """``(done, total)`` from the page's progress bar, None when there is none."""
    for text in probe(page)["progress"]:
        match = PROGRESS.search(text)
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def fill_steps(page, n_steps: int, batch: int) -> None:
    page.locator(".st-key-cond_steps input").fill(str(n_steps))
    page.locator(".st-key-cond_batch input").fill(str(batch))


def start_long_job(page, press: bool = True) -> tuple[float, int]:
    """Press Compute with ``LONG_STEPS`` steps in passes of 1 (unless the page already started that job),
    wait for progress; return the measured rate (path points per second) and the job's total."""
    if press:
        fill_steps(page, LONG_STEPS, LONG_BATCH)
        press_compute(page)
    first = None
    for _ in range(600):
        first = progress_of(page)
        # The page may show a few-step first look's progress before the long job's own.
        if first is not None and first[0] > 0 and first[1] >= LONG_STEPS:
            break
        time.sleep(0.1)
    assert first is not None and first[1] >= LONG_STEPS, f"the long job showed no progress: {first}"
    t0 = time.monotonic()
    time.sleep(2.0)
    second = progress_of(page)
    t1 = time.monotonic()
    assert second is not None and second[1] == first[1], f"progress {first} then {second}"
    rate = (second[0] - first[0]) / (t1 - t0)
    total = first[1]
    estimate = total / rate if rate > 0 else float("inf")
    print(
        f"[long job] progress {first[0]}/{total} then {second[0]}/{total} in {t1 - t0:.2f} s: "
        f"{rate:.1f} points/s, the whole job would take about {estimate:.0f} s uncancelled"
    )
    return rate, total


def wait_idle(server_pid: int, pid: int, since: float, what: str) -> tuple[float, int]:
    """Sample the worker's CPU time every 0.25 s until two samples 0.5 s apart differ by fewer
    than IDLE_TICKS ticks (a worker that vanished was killed: that counts as stopped). Return the
    seconds from ``since`` to idle and the ticks the worker used in that time."""
    samples: list[int] = []
    start_ticks = cpu_ticks(pid)
    deadline = time.monotonic() + IDLE_WAIT_S
    for _ in range(int(IDLE_WAIT_S / SAMPLE_S) + 10):
        ticks = cpu_ticks(pid)
        now = time.monotonic()
        if ticks is None:
            print(f"[{what}] worker {pid} is gone (killed) after {now - since:.2f} s")
            return now - since, -1
        samples.append(ticks)
        if len(samples) >= 3 and samples[-1] - samples[-3] < IDLE_TICKS:
            used = samples[-1] - (start_ticks or samples[0])
            print(
                f"[{what}] worker {pid} idle {now - since:.2f} s after the click or close "
                f"({used} ticks used while sampling; workers now {worker_pids(server_pid)})"
            )
            return now - since, used
        if now > deadline:
            break
        time.sleep(SAMPLE_S)
    raise AssertionError(
        f"{what}: worker {pid} kept computing for {IDLE_WAIT_S:.0f} s; CPU ticks sampled every "
        f"{SAMPLE_S} s: {samples[-12:]}"
    )


def wait_result(page, layer: str, target: str, since: float, timeout_s: float = 120.0) -> float:
    """Wait until the conductance page shows a settled result for ``layer`` and ``target``;
    return the seconds from ``since`` until it was first shown."""
    deadline = time.monotonic() + timeout_s
    shown = quiet = None
    seen: dict = {}
    for _ in range(int(timeout_s / 0.1) + 10):
        seen = probe(page)
        now = time.monotonic()
        values = metrics(seen)
        ok = (
            seen["h1"] == CONDUCTANCE
            and sidebar_layer(seen) == layer
            and values.get("Target") == target
            and not any(m["stale"] for m in seen["metrics"])
        )
        if ok and shown is None:
            shown = now
        if ok and seen["state"] == "notRunning" and not seen["busy"]:
            quiet = quiet or now
            if now - quiet >= 1.0:
                return shown - since
        else:
            quiet = None
        if now > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"no result for {layer} / {target}: h1={seen.get('h1')!r} state={seen.get('state')} "
        f"progress={seen.get('progress')} metrics={metrics(seen)}"
    )


def test_closing_the_tab_stops_its_job_and_the_worker_still_serves(browser, long_server, solo):
    url, server = long_server
    context, page = open_session(browser, url)
    try:
        go_to(page, "Layer picker")
        settle(page)
        pick_layer(page, "conv1")
        go_to(page, CONDUCTANCE)
        page.wait_for_selector('[data-testid="stMetric"]')
        settle(page)
        print_workers(server.pid, "before the long job")
        start_long_job(page)
        worker = busy_worker(server.pid)
        done_before = progress_of(page)
    finally:
        context.close()
    closed = time.monotonic()
    print(f"[closed tab] the tab closed at progress {done_before}")
    took, _used = wait_idle(server.pid, worker, closed, "closed tab")
    # It stays idle: no job of the closed tab is left running or queued.
    time.sleep(2.0)
    pids = worker_pids(server.pid)
    if worker in pids:
        a = cpu_ticks(worker)
        time.sleep(1.0)
        b = cpu_ticks(worker)
        print(f"[closed tab] 3 s later: {b - a} ticks in 1 s")
        assert b - a < IDLE_TICKS, "the worker started computing again after the tab closed"
    print_workers(server.pid, f"after the tab closed (idle after {took:.2f} s)")

    # A fresh session gets results: the page's default, then a job no one asked for before.
    context, page = open_session(browser, f"{url}/layer_conductance")
    try:
        page.wait_for_selector('[data-testid="stMetric"]')
        settle(page)
        seen = probe(page)
        assert seen["exceptions"] == 0
        assert "Traceback" not in page.locator("body").inner_text()
        layer, target = sidebar_layer(seen), metrics(seen)["Target"]
        image = page.locator(".st-key-_w_active_image input[role='combobox']").input_value()
        fill_steps(page, 60, 0)
        clicked = time.monotonic()
        press_compute(page)
        shown = wait_result(page, layer, target, clicked)
        seen = probe(page)
        assert seen["exceptions"] == 0
        expected = solo.conductance(image, layer, solo.index(target), n_steps=60)
        print(
            f"[fresh session] {image}, {layer}, {target}, 60 steps: result {shown:.2f} s after "
            f"Compute; page {metrics(seen)}; solo {expected}"
        )
        assert not compare(seen, expected, "fresh session")
        screenshot(page, "cancel_fresh_session_1400x900")
        print_workers(server.pid, "after the fresh session's job")
    finally:
        context.close()


def test_a_rerun_supersedes_the_running_job(browser, long_server, solo):
    url, server = long_server
    image, target = "07_crescent.png", "ring (#5)"
    context, page = open_session(browser, url)
    try:
        pick_image(page, image)
        go_to(page, "Layer picker")
        settle(page)
        pick_layer(page, "conv1")
        go_to(page, CONDUCTANCE)
        page.wait_for_selector('[data-testid="stMetric"]')
        settle(page)

        # 1. Leaving for the Layer picker while the long job runs stops it.
        start_long_job(page)
        worker = busy_worker(server.pid)
        left = time.monotonic()
        go_to(page, "Layer picker")
        took, _ = wait_idle(server.pid, worker, left, "page left")
        settle(page)
        assert probe(page)["exceptions"] == 0

        # 2. A new layer: the page starts the long job again (the settings are kept) ...
        pick_layer(page, "block2")
        go_to(page, CONDUCTANCE)
        start_long_job(page, press=False)
        worker = busy_worker(server.pid)
        # ... and Compute with other settings supersedes it: the new, short job is served at
        # once instead of queuing behind the long one.
        page.locator(".st-key-cond_target input[role='combobox']").click()
        page.locator(".st-key-cond_target input[role='combobox']").fill("ring")
        page.get_by_role("option", name=target, exact=True).click()
        fill_steps(page, 50, 0)
        clicked = time.monotonic()
        press_compute(page)
        shown = wait_result(page, "block2", target, clicked)
        print(f"[superseded] Compute with 50 steps -> its result shown after {shown:.2f} s")
        idle_after, used = wait_idle(server.pid, worker, clicked, "superseded")
        seen = probe(page)
        assert seen["exceptions"] == 0
        expected = solo.conductance(image, "block2", solo.index(target))
        print(f"[superseded] page {metrics(seen)}; solo {expected}")
        assert not compare(seen, expected, "superseding job")
        screenshot(page, "cancel_superseded_1400x900")
        print(
            f"[summary] page left -> worker idle {took:.2f} s; superseding Compute -> result "
            f"{shown:.2f} s, -> worker idle {idle_after:.2f} s"
        )
        print_workers(server.pid, "after the superseding job")
    finally:
        context.close()


def test_stop_on_the_convergence_page_keeps_what_was_checked(page, app_url):
    """Check all at 1024 steps, then Stop: the page keeps the images already checked, offers
    the rest again, and shows no error (the request's state key had been the offer button's
    own key, and drawing the offer again after Stop raised)."""
    page.set_default_timeout(180_000)
    page.goto(f"{app_url}/convergence?steps=1024")
    page.wait_for_selector("h1")
    settle(page)
    offer = page.get_by_role("button", name=re.compile(r"^Check all \d+ other images$"))
    before = int(re.search(r"\d+", offer.inner_text()).group())
    offer.click()
    stop = page.get_by_role("button", name="Stop checking")
    stop.wait_for()
    page.locator('[data-testid="stProgress"]', has_text="integrating").first.wait_for()
    stop.click()
    stop.wait_for(state="detached", timeout=60_000)
    settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "Traceback" not in text
    left = re.search(r"(\d+) other images? of this session (?:are|is) not checked yet", text)
    assert left is not None, text[-1500:]
    assert 1 <= int(left.group(1)) <= before
    again = page.get_by_role("button", name=re.compile(r"^Check (all )?\d+ other images?$"))
    assert again.count() == 1
    screenshot(page, "convergence_after_stop")
