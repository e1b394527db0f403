"""The memory meter and the operator's memory budget: passes sized from the layer's activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from explainer import AttributionError, LayerConductance, NeuronGradient
from explainer.memory import HEADROOM, PassMeter

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "EXPLAINER_MEMORY_BUDGET_MB"


def wide_then_narrow(width: int = 32) -> nn.Sequential:
    """A wide layer (``width`` channels at full size) followed by a narrow pooled head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(width, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()


def passes(model: nn.Module, layer: nn.Module, x: torch.Tensor, n_steps: int) -> int:
    """How many passes a conductance call runs (progress is reported once per pass)."""
    calls: list[tuple[int, int]] = []
    LayerConductance(model, layer).attribute(
        x, target=0, n_steps=n_steps, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (n_steps + 1, n_steps + 1)
    return len(calls)


# --------------------------------------------------------------------------------- the meter


def test_meter_counts_each_saved_storage_once_and_leaves_weights_out():
    lin = nn.Linear(256, 256)
    meter = PassMeter.for_model(lin)
    x = torch.randn(8, 256, requires_grad=True)
    with meter.saving():
        h = lin(x)  # saves x (and the weight, which is left out)
        y = (h * h).sum()  # saves h twice: counted once
    assert meter.held == x.nelement() * 4 + h.nelement() * 4
    meter.add((x, h))  # already counted
    assert meter.held == 2 * 8 * 256 * 4
    y.backward()


def test_meter_sees_outputs_run_without_gradients_only_for_its_thread():
    big, small = nn.Conv2d(3, 64, 1), nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 16, 16)
    meter = PassMeter.for_model(nn.ModuleList([big, small]))
    started, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.set()
        release.wait(5)
        with torch.no_grad():
            big(x)  # another thread's work is not this pass's

    worker = threading.Thread(target=other_thread)
    worker.start()
    started.wait(5)
    with meter.saving(), torch.no_grad():
        release.set()
        worker.join()
        small(x)
    assert meter.largest == 2 * 16 * 16 * 4
    with meter.saving(), torch.no_grad():
        big(x)
    assert meter.largest == 64 * 16 * 16 * 4
    assert meter.held == 0  # nothing was saved for a backward pass


def test_bytes_per_row_includes_room_for_the_largest_layer():
    meter = PassMeter()
    meter.add((torch.zeros(4, 100),))  # 1600 bytes held
    meter.add_transient(400)
    meter.see(torch.zeros(4, 250))  # 4000 bytes seen
    assert meter.bytes_per_row(4) == int((1600 + 400 + 2 * 4000) * HEADROOM / 4)


# ----------------------------------------------------------------------- passes from the budget


def test_passes_follow_the_layer_activation_size(monkeypatch):
    """Under one budget, recording from the wide layer on needs smaller passes than from the
    narrow layer after it (the wide activations are no longer recorded)."""
    model = wide_then_narrow()
    x = torch.rand(1, 3, 32, 32)
    monkeypatch.setenv(BUDGET, "2")
    wide, narrow = passes(model, model[0], x, 40), passes(model, model[2], x, 40)
    assert wide > narrow > 1
    monkeypatch.delenv(BUDGET)
    # With the default budget, one metered point, then the rest in one pass.
    assert passes(model, model[0], x, 40) == 2


def test_budgeted_results_equal_unbudgeted(monkeypatch):
    model = wide_then_narrow()
    x, base = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24)
    lc = LayerConductance(model, [model[0], model[2]])
    full, full_delta = lc.attribute(
        x, base, target=[0, 2], n_steps=20, return_convergence_delta=True
    )
    ng = NeuronGradient(model, model[2])
    selectors = [(c, i, i) for c in range(4) for i in range(6)]
    full_grads = ng.attribute(x, selectors)
    monkeypatch.setenv(BUDGET, "1.5")
    split, split_delta = lc.attribute(
        x, base, target=[0, 2], n_steps=20, return_convergence_delta=True
    )
    for a, b in zip(split, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(split_delta, full_delta, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ng.attribute(x, selectors), full_grads)


def test_internal_batch_size_is_an_upper_bound_under_the_budget(monkeypatch):
    model = wide_then_narrow()
    x = torch.rand(1, 3, 32, 32)
    calls: list[tuple[int, int]] = []
    lc = LayerConductance(model, model[0])
    lc.attribute(
        x, target=0, n_steps=30, internal_batch_size=10, progress=lambda d, t: calls.append(d)
    )
    assert calls == [1, 11, 21, 31]  # the metered point, then passes of 10
    monkeypatch.setenv(BUDGET, "3")
    calls.clear()
    lc.attribute(
        x, target=0, n_steps=30, internal_batch_size=10, progress=lambda d, t: calls.append(d)
    )
    steps = [b - a for a, b in zip([0, *calls], calls, strict=False)]
    assert calls[-1] == 31 and max(steps) < 10


def test_a_pass_that_cannot_fit_is_refused_with_the_numbers(monkeypatch):
    model = wide_then_narrow(64)
    x = torch.rand(3, 3, 48, 48)
    monkeypatch.setenv(BUDGET, "0.5")
    with pytest.raises(AttributionError) as info:
        LayerConductance(model, model[0]).attribute(x, target=0, n_steps=10)
    text = str(info.value)
    assert "layer conductance" in text and "3 example rows" in text
    assert "memory budget of 0.5 MiB (EXPLAINER_MEMORY_BUDGET_MB)" in text
    assert "nearer the output" in text
    with pytest.raises(AttributionError, match="neuron gradients.*nearer the input"):
        NeuronGradient(model, model[2]).attribute(x, [(0, 1, 1), (1, 1, 1)])
    # One selector is a single pass: it runs, there is nothing left to split.
    assert NeuronGradient(model, model[2]).attribute(x, (0, 1, 1)).shape == x.shape


# ------------------------------------------------------------- resident memory of a real run

_MEASURE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from explainer import LayerConductance

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(6):
        layers += [nn.BatchNorm2d(16), nn.Tanh()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model.eval()
    x = torch.rand(1, 3, 112, 112)

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    def peak_growth(budget):
        if budget is None:
            os.environ.pop("EXPLAINER_MEMORY_BUDGET_MB", None)
        else:
            os.environ["EXPLAINER_MEMORY_BUDGET_MB"] = budget
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current size
        base = status("VmRSS")
        LayerConductance(model, model[0]).attribute(x, target=1, n_steps=50)
        return (status("VmHWM") - base) / 2**20

    LayerConductance(model, model[0]).attribute(x, target=1, n_steps=2)  # warm up
    bounded = peak_growth(sys.argv[1])  # first: later runs reuse memory the allocator kept
    unbounded = peak_growth(None)
    print(json.dumps({"bounded": bounded, "unbounded": unbounded}))
    """
)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak"
)
def test_peak_memory_stays_within_the_budget():
    """A conductance whose unsplit passes need about 400 MiB stays within a 48 MiB budget.

    glibc keeps freed memory for reuse, which makes the resident size a poor measure of what is
    live; a fixed mmap threshold makes it return every tensor-sized block at once.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    env.pop(BUDGET, None)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, "48"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["unbounded"] > 4 * 48, measured  # the budget has something to bound
    assert measured["bounded"] < 48, measured


def test_without_saved_tensor_hooks_the_module_outputs_stand_in():
    """Where saved-tensor hooks are switched off (as inside torch.func transforms), the meter
    counts every module output instead, and the attribution still runs."""
    model = wide_then_narrow()
    x = torch.rand(1, 3, 16, 16)
    expected = LayerConductance(model, model[0]).attribute(x, target=1, n_steps=6)
    torch._C._autograd._saved_tensors_hooks_disable("saved-tensor hooks are off in this block")
    try:
        meter = PassMeter.for_model(model)
        with meter.saving(), torch.enable_grad():
            model(x.requires_grad_())
        assert meter.blind and meter.held == 0
        assert meter.outputs >= 32 * 16 * 16 * 4  # the wide layer's output at least
        got = LayerConductance(model, model[0]).attribute(x, target=1, n_steps=6)
    finally:
        torch._C._autograd._saved_tensors_hooks_enable()
    torch.testing.assert_close(got, expected)


def test_a_pass_interrupted_while_metered_leaves_no_hooks_behind():
    class Interrupted(BaseException):
        """Stands in for a rerun or a closed browser tab stopping the script."""

    class StopsAfterTheLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.conv(x))
            if h.requires_grad:  # inside the metered pass, with the graph recording
                raise Interrupted()
            return self.head(h.mean((2, 3)))

    model = StopsAfterTheLayer()
    global_hooks = dict(torch.nn.modules.module._global_forward_hooks)
    for call in (
        lambda: LayerConductance(model, model.conv).attribute(torch.rand(1, 3, 8, 8), target=0),
        lambda: NeuronGradient(model, model.head).attribute(torch.rand(1, 3, 8, 8), [0, 1]),
    ):
        with pytest.raises(Interrupted):
            call()
        assert dict(torch.nn.modules.module._global_forward_hooks) == global_hooks
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
