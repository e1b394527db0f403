"""Several browser sessions computing at once through the real server, checked against solo runs.

Four browser contexts (four Streamlit sessions) each pick their own image, layer and target on
the built-in model, press Compute at the same time, and their metrics are compared with the same
computation done here with the library. A second round changes the target or the layer of every
session while the others still compute. The time each session waits, the total time and the
server's worker processes are printed; nothing is asserted on time.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
VIEWPORT = {"width": 1400, "height": 900}
CONDUCTANCE = "Layer conductance"
BUSY = '[data-testid="stSkeleton"], [data-testid="stProgress"], [data-testid="stSpinner"]'
# The app's defaults: black baseline, Gauss-Legendre, 50 steps in chunks of ceil(50 / 8).
METHOD, N_STEPS = "gausslegendre", 50
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Everything the page shows at once, read in one round trip.
PROBE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    const h1 = document.querySelector('h1');
    const metrics = [...document.querySelectorAll('[data-testid="stMetric"]')].map(m => ({
        text: m.innerText, stale: m.closest('[data-stale="true"]') !== null}));
    const progress = [...document.querySelectorAll('[data-testid="stProgress"]')]
        .map(p => p.innerText);
    const sidebar = document.querySelector('[data-testid="stSidebar"]');
    return {
        state: app ? app.getAttribute('data-test-script-state') : null,
        h1: h1 ? h1.innerText : null,
        metrics: metrics,
        progress: progress,
        busy: document.querySelectorAll('BUSY_SELECTOR').length,
        sidebar: sidebar ? sidebar.innerText : '',
        exceptions: document.querySelectorAll('[data-testid="stException"]').length,
    };
}""".replace("BUSY_SELECTOR", BUSY)


# --- the server's worker processes --------------------------------------------------------------
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        return f.read().rsplit(")", 1)[1].split()


def worker_pids(server_pid: int) -> list[int]:
    """Compute workers of the server: its children running ``explainer.compute.worker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            ppid = int(_stat_fields(pid)[1])  # field 4 of /proc/<pid>/stat
            if ppid != server_pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if b"explainer.compute.worker" in cmdline:
            found.append(pid)
    return sorted(found)


def cpu_ticks(pid: int) -> int | None:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat) in clock ticks; None when gone."""
    try:
        fields = _stat_fields(pid)
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB (missing entries left out)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line.split(":")[0]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return found


def print_workers(server_pid: int, when: str) -> list[int]:
    pids = worker_pids(server_pid)
    print(f"[workers] {when}: {len(pids)} worker process(es) of server pid {server_pid}")
    for pid in pids:
        mem = memory_kib(pid)
        ticks = cpu_ticks(pid)
        cpu = f"{ticks / CLK_TCK:.1f} s" if ticks is not None else "?"
        print(
            f"[workers]   pid {pid}: VmRSS {mem.get('VmRSS', 0) / 1024:.1f} MiB, "
            f"VmHWM {mem.get('VmHWM', 0) / 1024:.1f} MiB, CPU {cpu}"
        )
    return pids


# --- driving the UI -----------------------------------------------------------------------------
def probe(page) -> dict:
    return page.evaluate(PROBE)


def settle(page, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Wait until the script is not running and nothing loads for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    for _ in range(int(timeout_s / 0.2) + 1):
        if time.monotonic() > deadline:
            break
        seen = probe(page)
        now = time.monotonic()
        if seen["state"] != "notRunning" or seen["busy"]:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError("the page kept running")


def choose(page, key: str, text: str, option) -> None:
    """Type ``text`` into the selectbox with widget key ``key`` and click the option ``option``
    (an exact accessible name, or a compiled pattern)."""
    combo = page.locator(f".st-key-{key} input[role='combobox']")
    combo.click()
    combo.fill(text)
    if isinstance(option, str):
        page.get_by_role("option", name=option, exact=True).click()
    else:
        page.get_by_role("option").filter(has_text=option).first.click()


def layer_option(name: str) -> re.Pattern:
    """The Layer picker's option for ``name`` ("name  ·  Type", maybe starred)."""
    return re.compile(rf"^\s*{re.escape(name)}\s+·")


def go_to(page, title: str) -> None:
    page.locator('[data-testid="stSidebar"] a', has_text=title).click()
    page.wait_for_selector(f"h1:has-text('{title}')")


def pick_image(page, name: str) -> None:
    choose(page, "_w_active_image", name[:5], name)
    settle(page)


def pick_layer(page, layer: str) -> None:
    """On the Layer picker page: choose ``layer`` by name."""
    choose(page, "_w_layer_select", layer, layer_option(layer))
    page.wait_for_function(
        "(l) => document.querySelector('[data-testid=\"stSidebar\"]').innerText"
        ".includes('Layer · ' + l)",
        arg=layer,
    )
    settle(page)


def press_compute(page) -> None:
    page.locator('[data-testid="stFormSubmitButton"] button', has_text="Compute").click()


def metrics(seen: dict) -> dict[str, str]:
    """``{label: value}`` of the page's metrics (label, value and delta on separate lines)."""
    found = {}
    for metric in seen["metrics"]:
        lines = [line.strip() for line in metric["text"].split("\n") if line.strip()]
        if len(lines) >= 2:
            found[lines[0]] = lines[1]
    return found


def sidebar_layer(seen: dict) -> str | None:
    match = re.search(r"Layer · (\S+)", seen["sidebar"])
    return match.group(1) if match else None


def result_shown(seen: dict, layer: str, target_label: str) -> bool:
    """The conductance page shows a fresh result for ``layer`` and ``target_label``."""
    values = metrics(seen)
    return (
        seen["h1"] == CONDUCTANCE
        and sidebar_layer(seen) == layer
        and values.get("Target") == target_label
        and "Sum of conductance" in values
        and not any(m["stale"] for m in seen["metrics"])
    )


def open_session(browser, url: str, viewport: dict | None = None):
    context = browser.new_context(viewport=viewport or VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("h1")
    settle(page)
    return context, page


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# --- the solo computation -----------------------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    output_diff: float
    total: float
    delta: float


class Solo:
    """The app's conductance computed here with the library (the app's default settings)."""

    def __init__(self) -> None:
        from explainer.demo import sample_image_paths
        from explainer.images import Preprocessing
        from explainer.intake import load_demo_model

        self.lm = load_demo_model()
        self.prep = Preprocessing.for_model(self.lm.input_size, self.lm.mean, self.lm.std)
        self.paths = {p.name: p for p in sample_image_paths()}
        self.labels = list(self.lm.labels)

    def label(self, index: int) -> str:
        return f"{self.labels[index]} (#{index})"

    def index(self, label: str) -> int:
        return int(re.search(r"\(#(\d+)\)", label).group(1))

    def _x(self, image: str):
        from explainer.images import load_image, preprocess

        return preprocess(load_image(self.paths[image]), self.prep)

    def predicted(self, image: str) -> int:
        import torch

        with torch.no_grad():
            return int(self.lm.model(self._x(image)).argmax(dim=1)[0])

    def conductance(self, image: str, layer: str, target: int, n_steps: int = N_STEPS) -> Expected:
        from explainer.analysis import compute_conductance
        from explainer.baselines import make_baseline

        x = self._x(image)
        baseline = make_baseline("black", x, self.prep)
        result = compute_conductance(
            self.lm.model,
            layer,
            x,
            target,
            baseline,
            method=METHOD,
            n_steps=n_steps,
            internal_batch_size=max(1, -(-n_steps // 8)),  # the app's automatic chunk
        )
        return Expected(
            float(result.output_diff), float(np.sum(result.channel_totals)), float(result.delta)
        )


@pytest.fixture(scope="session")
def solo() -> Solo:
    return Solo()


def _close(shown: float, value: float, digits: int, scale: float) -> bool:
    """``shown`` is ``value`` printed with ``digits`` significant digits, or within 1e-3 of
    ``scale``."""
    return shown == float(f"{value:.{digits}g}") or abs(shown - value) <= 1e-3 * abs(scale)


def compare(seen: dict, expected: Expected, what: str) -> list[str]:
    """Mismatches between the page's metrics and the solo computation (empty when they agree)."""
    values = metrics(seen)
    problems = []
    checks = (
        ("F(image) − F(baseline)", expected.output_diff, 4, expected.output_diff),
        ("Sum of conductance", expected.total, 4, expected.total),
        ("Convergence delta", expected.delta, 2, expected.output_diff),
    )
    for label, value, digits, scale in checks:
        text = values.get(label)
        try:
            shown = float(text.replace("−", "-"))
        except (AttributeError, ValueError):
            problems.append(f"{what}: metric {label!r} unreadable: {text!r}")
            continue
        if not _close(shown, value, digits, scale):
            problems.append(f"{what}: {label} shows {text}, solo run gives {value:.6g}")
    return problems


# --- the sessions -------------------------------------------------------------------------------
@dataclass
class Session:
    name: str
    image: str
    layer: str
    target: str  # the target's label, e.g. "square (#1)"
    context: object = None
    page: object = None
    clicked: float = 0.0
    shown: float | None = None
    done: float | None = None
    quiet_since: float | None = None
    last: dict = field(default_factory=dict)

    def start(self) -> None:
        self.clicked, self.shown, self.done, self.quiet_since = time.monotonic(), None, None, None


def wait_all(sessions: list[Session], timeout_s: float = 300.0, quiet_s: float = 1.0) -> None:
    """Poll every session in turn until each shows its result and has stopped running."""
    deadline = time.monotonic() + timeout_s
    for _ in range(100_000):
        pending = [s for s in sessions if s.done is None]
        if not pending or time.monotonic() > deadline:
            break
        for s in pending:
            seen = probe(s.page)
            now = time.monotonic()
            s.last = seen
            if s.shown is None and result_shown(seen, s.layer, s.target):
                s.shown = now
            idle = seen["state"] == "notRunning" and not seen["busy"]
            if s.shown is None or not idle:
                s.quiet_since = None
            elif s.quiet_since is None:
                s.quiet_since = now
            elif now - s.quiet_since >= quiet_s and result_shown(seen, s.layer, s.target):
                s.done = now
        time.sleep(0.1)
    late = [
        f"{s.name}: h1={s.last.get('h1')!r} state={s.last.get('state')} "
        f"progress={s.last.get('progress')} metrics={metrics(s.last) if s.last else {}}"
        for s in sessions
        if s.done is None
    ]
    assert not late, f"sessions without a result after {timeout_s:.0f} s: {late}"


def check_round(sessions: list[Session], solo: Solo, round_name: str) -> float:
    """Print each session's times, compare its metrics with the solo run; return the total."""
    started = min(s.clicked for s in sessions)
    problems = []
    for s in sessions:
        assert s.last["exceptions"] == 0, f"{s.name}: an exception box is shown"
        expected = solo.conductance(s.image, s.layer, solo.index(s.target))
        values = metrics(s.last)
        print(
            f"[{round_name}] {s.name} ({s.image}, {s.layer}, {s.target}): "
            f"Compute -> result shown {s.shown - s.clicked:.2f} s, "
            f"-> page idle {s.done - s.clicked - 1.0:.2f} s; "
            f"page: diff {values.get('F(image) − F(baseline)')}, "
            f"sum {values.get('Sum of conductance')}, delta {values.get('Convergence delta')}; "
            f"solo: diff {expected.output_diff:.4g}, sum {expected.total:.4g}, "
            f"delta {expected.delta:.2g}"
        )
        problems += compare(s.last, expected, f"{round_name} {s.name}")
    total = max(s.shown for s in sessions) - started
    print(f"[{round_name}] wall time from the first Compute to the last result: {total:.2f} s")
    assert not problems, problems
    return total


SESSIONS = [
    # name, image, round-1 layer, round-1 target, round-2 change ("target" or "layer", value)
    ("s1", "02_square.png", "block1", "circle (#0)", ("target", "star (#4)")),
    ("s2", "04_cross.png", "block2", "triangle (#2)", ("layer", "block1.conv")),
    ("s3", "06_ring.png", "conv1", "crescent (#6)", ("target", "square (#1)")),
    ("s4", "05_star.png", "block3", "stripes (#7)", ("layer", "block2.conv")),
]


def test_four_sessions_compute_at_once_and_match_solo_runs(browser, app_server, solo):
    url, server = app_server
    # Each chosen target differs from the image's predicted class (which the page computes on
    # arrival), so pressing Compute starts a new job instead of reading the cache.
    for name, image, _layer, target, (kind, value) in SESSIONS:
        predicted = solo.predicted(image)
        print(f"[setup] {name}: {image} predicted {solo.label(predicted)}")
        assert solo.index(target) != predicted
        if kind == "target":
            assert solo.index(value) != predicted

    sessions = [Session(name, image, layer, target) for name, image, layer, target, _ in SESSIONS]
    try:
        for s in sessions:
            s.context, s.page = open_session(browser, url)
            pick_image(s.page, s.image)
            go_to(s.page, "Layer picker")
            settle(s.page)
            pick_layer(s.page, s.layer)
            go_to(s.page, CONDUCTANCE)
            s.page.wait_for_selector('[data-testid="stMetric"]')
            settle(s.page)
            assert probe(s.page)["exceptions"] == 0
            choose(s.page, "cond_target", s.target.split(" ")[0], s.target)
        pids = print_workers(server.pid, "before round 1")
        assert len(pids) >= 1

        # Round 1: Compute in every session, then wait for all of them.
        for s in sessions:
            s.start()
            press_compute(s.page)
        wait_all(sessions)
        round1 = check_round(sessions, solo, "round 1")
        print_workers(server.pid, "after round 1")

        # Round 2: prepare every change (form values are applied only on Compute; the layers
        # are chosen on the Layer picker page), then start them all back to back.
        for s, (*_, (kind, value)) in zip(sessions, SESSIONS, strict=True):
            if kind == "target":
                choose(s.page, "cond_target", value.split(" ")[0], value)
                s.target = value
            else:
                go_to(s.page, "Layer picker")
                settle(s.page)
                pick_layer(s.page, value)
                s.layer = value
        for s, (*_, (kind, _value)) in zip(sessions, SESSIONS, strict=True):
            s.start()
            if kind == "target":
                press_compute(s.page)
            else:
                s.page.locator('[data-testid="stSidebar"] a', has_text=CONDUCTANCE).click()
        wait_all(sessions)
        round2 = check_round(sessions, solo, "round 2")
        pids = print_workers(server.pid, "after round 2")
        assert len(pids) >= 1
        print(f"[summary] round 1 {round1:.2f} s, round 2 {round2:.2f} s for 4 sessions")

        for s in sessions:
            print(f"[screenshot] {screenshot(s.page, f'load_{s.name}_1400x900')}")
        small = sessions[-1].page
        small.set_viewport_size({"width": 1024, "height": 768})
        time.sleep(1.0)
        print(f"[screenshot] {screenshot(small, f'load_{sessions[-1].name}_1024x768')}")
        for s in sessions:
            assert probe(s.page)["exceptions"] == 0
    finally:
        for s in sessions:
            if s.context is not None:
                s.context.close()
