"""``n_steps="auto"``: path points placed until the convergence delta meets a tolerance.

The checks: the tolerance is met or the reason is reported; the result is exactly the sum a
fixed-step run gives at the same points; ``last_steps`` counts the rows that went through the
model; the callback sees rounds in order; examples in one call refine independently.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from explainer import LayerConductance, NeuronConductance
from explainer.adaptive import StepsRound, split_points
from explainer.attribution import _grad_options, _Plan


def randn(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class Net(nn.Module):
    """A small ReLU network whose output bends along the path (so steps matter)."""

    def __init__(self, bypass: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.bypass = bypass

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x))
        out = self.conv2(h)
        if self.bypass:  # part of the change goes around conv2
            out = out + h
        return self.head(torch.tanh(out).mean((2, 3)))


class Counting(nn.Module):
    """Counts the rows (path points times examples) that run through the model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.net(x)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(3)
    return Net().double().eval()


def change(model, x, target) -> Tensor:
    with torch.no_grad():
        return model(x)[:, target] - model(torch.zeros_like(x))[:, target]


def test_tolerance_is_met_and_delta_is_the_real_one(net):
    x = randn(3, 3, 8, 8, seed=1) * 2
    lc = LayerConductance(net, net.conv2)
    attr, delta = lc.attribute(
        x, target=1, n_steps="auto", tolerance=0.01, return_convergence_delta=True
    )
    assert lc.last_status == ["converged"] * 3
    assert (delta.abs() <= 0.01 * change(net, x, 1).abs() + 1e-12).all()
    direct = lc.compute_convergence_delta(attr, None, x, target=1)
    torch.testing.assert_close(delta, direct, rtol=1e-6, atol=1e-9)
    # A tighter tolerance needs more points and still holds.
    tight = LayerConductance(net, net.conv2)
    _, d2 = tight.attribute(
        x, target=1, n_steps="auto", tolerance=0.001, return_convergence_delta=True
    )
    assert (d2.abs() <= 0.001 * change(net, x, 1).abs() + 1e-12).all()
    assert sum(tight.last_steps) > sum(lc.last_steps)


def test_result_equals_a_fixed_run_at_the_same_points(net):
    x = randn(2, 3, 8, 8, seed=2) * 2
    lc = LayerConductance(net, [net.conv1, net.conv2])
    attrs = lc.attribute(x, target=[0, 3], n_steps="auto", tolerance=0.005)
    for e in range(2):
        points = lc.last_points[e]
        assert points[0] == 0.0 and points[-1] == 1.0 and points == sorted(points)
        assert len(points) == lc.last_steps[e] == len(set(points))
        # The trapezoid rule at the same points, in one pass and in passes of two points.
        for cap in (len(points), 2):
            sums, _ = lc._integrate(
                (x[e : e + 1],),
                (0,),
                [0, 3][e],
                None,
                points,
                cap,
                _Plan(rows=1),
                False,
                None,
                _grad_options(None),
                rule="trapezoid",
            )
            for layer_sum, attr in zip(sums, attrs, strict=True):
                torch.testing.assert_close(attr[e : e + 1], layer_sum[0], rtol=1e-9, atol=1e-12)


class Squares(nn.Module):
    """F = sum of the squares of a linear layer's outputs: the gradient along the path is
    linear in the path position, so the trapezoid rule is exact with the two ends alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return (self.lin(x) ** 2).sum(1, keepdim=True)


def test_auto_takes_the_trapezoid_rule():
    model = Squares().double()
    x = randn(3, 6, seed=13)
    lc = LayerConductance(model, model.lin)
    attr, delta = lc.attribute(x, target=0, n_steps="auto", return_convergence_delta=True)
    assert lc.last_steps == [2, 2, 2] and lc.last_status == ["converged"] * 3
    with torch.no_grad():
        exact = model.lin(x) ** 2 - model.lin(torch.zeros_like(x)) ** 2
    # The conductance of each unit h is the integral of 2h dh: h(x)^2 - h(baseline)^2.
    torch.testing.assert_close(attr, exact, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-12
    # The reference's rule (gradient at the left end) at the same two points is far off.
    fixed = lc.attribute(x, target=0, n_steps=1, method="riemann_trapezoid")
    assert lc.last_points == [[0.0, 1.0]] * 3
    assert (fixed - exact).abs().max() > 0.1


def test_last_steps_counts_the_rows_run(net):
    model = Counting(net)
    x = randn(3, 3, 8, 8, seed=3) * 2
    lc = LayerConductance(model, net.conv2)
    lc.attribute(x, target=2, n_steps="auto")
    assert model.rows == sum(lc.last_steps)
    assert all(isinstance(s, int) and s >= 2 for s in lc.last_steps)
    model.rows = 0
    lc.attribute(x, target=2, n_steps=7)
    assert lc.last_steps == [8, 8, 8] and lc.last_status == ["fixed"] * 3


def test_examples_refine_independently(net):
    x = randn(3, 3, 8, 8, seed=4) * 2
    together = LayerConductance(net, net.conv2)
    attr = together.attribute(x, target=[0, 1, 2], n_steps="auto")
    for e in range(3):
        alone = LayerConductance(net, net.conv2)
        one = alone.attribute(x[e : e + 1], target=[0, 1, 2][e], n_steps="auto")
        # The same points and result, up to the rounding of batched arithmetic.
        assert alone.last_points[0] == pytest.approx(together.last_points[e], rel=1e-6)
        torch.testing.assert_close(one[0], attr[e], rtol=1e-6, atol=1e-9)


def test_callback_sees_rounds_in_order(net):
    x = randn(2, 3, 8, 8, seed=5) * 3
    seen: list[StepsRound] = []
    lc = LayerConductance(net, net.conv2)
    attr, delta = lc.attribute(
        x,
        target=0,
        n_steps="auto",
        tolerance=1e-3,
        return_convergence_delta=True,
        callback=seen.append,
    )
    assert len(seen) >= 2
    assert [r.round for r in seen] == list(range(len(seen)))
    assert seen[0].steps == [2, 2]
    for a, b in zip(seen, seen[1:], strict=False):
        assert all(sb >= sa for sa, sb in zip(a.steps, b.steps, strict=True))
    for r in seen:  # each intermediate delta is that of its intermediate conductance
        assert r.attributions.shape == attr.shape
        total = r.attributions.reshape(2, -1).sum(1)
        torch.testing.assert_close(r.delta, total - change(net, x, 0), rtol=1e-6, atol=1e-9)
    assert all(final >= last for final, last in zip(lc.last_steps, seen[-1].steps, strict=True))
    # The final delta is not worse than the first coarse one.
    assert (delta.abs() <= seen[0].delta.abs() + 1e-12).all()


def test_callback_can_stop_early_with_a_coarse_result(net):
    x = randn(1, 3, 8, 8, seed=6) * 3
    lc = LayerConductance(net, net.conv2)
    with pytest.warns(UserWarning, match="stopped by the callback"):
        coarse = lc.attribute(x, target=0, n_steps="auto", tolerance=1e-6, callback=lambda r: False)
    assert lc.last_status == ["stopped"] and lc.last_steps == [2]
    assert torch.isfinite(coarse).all()


def test_a_delta_that_bypasses_the_layer_stalls_instead_of_running_to_the_cap():
    torch.manual_seed(4)
    model = Net(bypass=True).double().eval()
    x = randn(1, 3, 8, 8, seed=7) * 3
    lc = LayerConductance(model, model.conv2)
    with pytest.warns(UserWarning, match="more points do not reduce"):
        _, delta = lc.attribute(x, target=1, n_steps="auto", return_convergence_delta=True)
    assert lc.last_status == ["stalled"]
    assert lc.last_steps[0] < 512
    assert abs(float(delta)) > 0.01 * abs(float(change(model, x, 1)))


def test_the_cap_is_reported(net):
    x = randn(1, 3, 8, 8, seed=8) * 3
    lc = LayerConductance(net, net.conv2)
    with pytest.warns(UserWarning, match="cap of 3 path points"):
        lc.attribute(x, target=0, n_steps="auto", tolerance=1e-6, max_steps=3)
    assert lc.last_status == ["cap"] and lc.last_steps == [3]


def test_no_warning_when_every_example_converges(net):
    x = randn(2, 3, 8, 8, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerConductance(net, net.conv2).attribute(x, target=0, n_steps="auto")


def test_split_points_follow_the_errors():
    # A gradient that jumps right after the start: all error at the left end of [0, 1].
    new = split_points([0.0, 1.0], [-1.0], [0.0], allowed=0.01, max_new=1)
    assert new == [pytest.approx(0.02)]
    # The same when rounding left the right end's error a hair below zero, or the left end's
    # a hair above it (a jump just before the end): as random-weight resnet50's layer3 gave,
    # where the points were halved evenly instead and 18 points were used rather than 5.
    new = split_points(
        [0.0, 1.0], [-27.9], [-1.38e-7], allowed=0.3, max_new=1, left_errors=[-55.8]
    )
    assert new == [pytest.approx(0.02)]
    new = split_points([0.0, 1.0], [27.9], [55.8], allowed=0.3, max_new=1, left_errors=[2e-6])
    assert new == [pytest.approx(0.98)]
    # Errors of the same sign and alike in size: no jump to place, the midpoint.
    new = split_points([0.0, 1.0], [-1.0], [-0.5], allowed=0.01, max_new=1, left_errors=[-1.5])
    assert new == [pytest.approx(0.5)]
    # Opposite signs place the point where the two estimates balance.
    new = split_points([0.0, 1.0], [-0.3], [0.1], allowed=0.01, max_new=1)
    assert new == [pytest.approx(0.25)]
    # Intervals of the delta's sign come first; within tolerance nothing is added.
    new = split_points([0.0, 0.5, 1.0], [0.2, -0.05], [-0.2, 0.05], allowed=0.01, max_new=1)
    assert len(new) == 1 and 0.0 < new[0] < 0.5
    assert split_points([0.0, 1.0], [0.001], [-0.001], allowed=0.01, max_new=5) == []
    assert split_points([0.0, 1.0], [0.5], [-0.5], allowed=0.01, max_new=0) == []


# --------------------------------------------------------------------------------------------
# NeuronConductance


def trapezoid_weights(points: list[float]) -> list[float]:
    """Independent of the engine: the composite trapezoid rule on uneven points."""
    n = len(points)
    return [(points[min(i + 1, n - 1)] - points[max(i - 1, 0)]) / 2 for i in range(n)]


def test_neuron_conductance_auto_meets_the_tolerance(net):
    x = randn(2, 3, 8, 8, seed=10) * 2
    nc = NeuronConductance(net, net.conv2)
    maps = nc.attribute(x, (1, 3, 3), target=2, n_steps="auto", tolerance=0.01)
    assert nc.last_status == ["converged", "converged"]
    # The maps add up to the neuron's conductance, computed independently with many steps.
    cond = LayerConductance(net, net.conv2).attribute(x, target=2, n_steps=4000)[:, 1, 3, 3]
    totals = maps.reshape(2, -1).sum(1)
    assert ((totals - cond).abs() <= 0.03 * cond.abs() + 1e-9).all()
    # Tighter tolerance: more points, closer sums.
    tight = NeuronConductance(net, net.conv2)
    finer = tight.attribute(x, (1, 3, 3), target=2, n_steps="auto", tolerance=0.001)
    assert sum(tight.last_steps) > sum(nc.last_steps)
    err_fine = (finer.reshape(2, -1).sum(1) - cond).abs()
    assert (err_fine <= 0.005 * cond.abs() + 1e-9).all()


def test_neuron_conductance_auto_equals_the_rule_at_its_points(net):
    model = Counting(net)
    x = randn(2, 3, 8, 8, seed=11) * 2
    nc = NeuronConductance(model, net.conv2)
    maps = nc.attribute(x, [(0, 2, 2), (5, 4, 1)], target=[1, 3], n_steps="auto")
    assert maps.shape == (2, 2, 3, 8, 8)
    assert model.rows == sum(nc.last_steps)
    for e in range(2):
        points = nc.last_points[e]
        assert points[0] == 0.0 and points[-1] == 1.0 and points == sorted(points)
        totals = [torch.zeros(2, 1, 3, 8, 8, dtype=torch.float64)]
        nc._integrate(
            (x[e : e + 1],),
            (0,),
            [1, 3][e],
            None,
            [(0, 2, 2), (5, 4, 1)],
            points,
            trapezoid_weights(points),
            len(points),
            _Plan(rows=1),
            False,
            _grad_options(None),
            totals,
            None,
        )
        expected = totals[0][:, 0] * x[e]
        torch.testing.assert_close(maps[:, e], expected, rtol=1e-9, atol=1e-12)


def test_neuron_conductance_auto_callback_and_cap(net):
    x = randn(1, 3, 8, 8, seed=12) * 3
    seen: list[StepsRound] = []
    nc = NeuronConductance(net, net.conv2)
    nc.attribute(x, (2, 2, 2), target=0, n_steps="auto", tolerance=1e-3, callback=seen.append)
    assert [r.round for r in seen] == list(range(len(seen)))
    assert seen and seen[0].steps == [2]
    assert all(r.attributions.shape == x.shape and r.delta.shape == (1,) for r in seen)
    with pytest.warns(UserWarning, match="cap of 3 path points"):
        nc.attribute(x, (2, 2, 2), target=0, n_steps="auto", tolerance=1e-6, max_steps=3)
    assert nc.last_status == ["cap"] and nc.last_steps == [3]


# --- the app's analysis layer: compute_conductance(n_steps="auto") ----------------------------


def test_compute_conductance_auto_meets_the_tolerance_and_says_how():
    from explainer import analysis

    model = Net().double().eval()
    x, base = randn(1, 3, 6, 6, seed=5), torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    result = analysis.compute_conductance(
        model, "conv2", x, 2, base, n_steps="auto", tolerance=0.002
    )
    assert (result.method, result.status) == ("auto", "converged")
    assert result.relative_delta <= 0.002
    # The same map the engine gives for n_steps="auto" (steps = its points minus one).
    engine = LayerConductance(model, model.conv2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = engine.attribute(x, baselines=base, target=2, n_steps="auto", tolerance=0.002)
    assert result.n_steps == engine.last_steps[0] - 1
    torch.testing.assert_close(
        torch.from_numpy(result.attributions).double(), direct[0], rtol=1e-5, atol=1e-6
    )
    fixed = analysis.compute_conductance(model, "conv2", x, 2, base, n_steps=7)
    assert (fixed.method, fixed.status) == ("gausslegendre", "fixed")


def test_compute_conductance_auto_keeps_to_the_cap_and_checks_its_tolerance():
    from explainer import analysis
    from explainer.errors import AttributionError

    model = Net().double().eval()
    x, base = randn(1, 3, 6, 6, seed=6), torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    capped = analysis.compute_conductance(
        model, "conv2", x, 1, base, n_steps="auto", tolerance=1e-9, steps_cap=5
    )
    assert (capped.status, capped.n_steps) == ("cap", 5)
    for bad in (None, 0.0, 1.5, True, "0.01"):
        with pytest.raises(AttributionError, match="tolerance"):
            analysis.compute_conductance(model, "conv2", x, 1, base, n_steps="auto", tolerance=bad)
