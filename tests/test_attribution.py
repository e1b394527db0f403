"""The attribution engine on tiny models with hand-set weights, properties and misuse."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from explainer import AttributionError, AttributionTypeError, LayerConductance, NeuronGradient
from explainer.integration import METHODS, alphas


@pytest.fixture(autouse=True)
def float64_default():
    """Exact golden values need float64; restore the default for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class LinearReLU(nn.Module):
    """F(x) = w2 . relu(W1 x + b1) with W1 = diag(1, 2), b1 = 1, w2 = (3, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(2, 2)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
            self.lin1.bias.fill_(1.0)
            self.lin2.weight.copy_(torch.tensor([[3.0, -1.0]]))

    def forward(self, x):
        return self.lin2(self.relu(self.lin1(x)))


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Quadratic(nn.Module):
    """F(x) = sum((2x)^2): the layer output moves linearly, the gradient grows with it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(2, 2, bias=False)
        self.square = Square()
        with torch.no_grad():
            self.scale.weight.copy_(2 * torch.eye(2))

    def forward(self, x):
        return self.square(self.scale(x)).sum(1)


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.Softplus()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act2 = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _flags(model: nn.Module):
    return model.training, [p.requires_grad for p in model.parameters()]


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


# ---------------------------------------------------------------- golden values


def test_linear_relu_conductance_is_exact():
    model = LinearReLU()
    x = torch.tensor([[1.0, 2.0]])
    attr, delta = LayerConductance(model, model.lin1).attribute(
        x, n_steps=5, method="riemann_trapezoid", return_convergence_delta=True
    )
    # The layer moves from (1, 1) to (2, 5) and the gradient is (3, -1) all along.
    assert torch.equal(attr, torch.tensor([[3.0, -4.0]]))
    assert torch.equal(delta, torch.tensor([0.0]))


@pytest.mark.parametrize("method", METHODS)
def test_linear_relu_conductance_covers_first_to_last_point(method):
    model = LinearReLU()
    x = torch.tensor([[1.0, 2.0]])
    attr = LayerConductance(model, model.lin1).attribute(x, n_steps=4, method=method)
    a = alphas(method, 5)
    expected = torch.tensor([[3.0, -1.0]]) * torch.tensor([[1.0, 4.0]]) * (a[-1] - a[0])
    torch.testing.assert_close(attr, expected, rtol=1e-12, atol=1e-12)


def test_quadratic_conductance_has_the_riemann_error():
    model = Quadratic()
    x = torch.tensor([[1.0, -2.0]])
    attr, delta = LayerConductance(model, model.scale).attribute(
        x, n_steps=4, method="riemann_trapezoid", return_convergence_delta=True
    )
    # Layer output 2x = (2, -4); sum_i 2 L(a_i) (L(a_{i+1}) - L(a_i)) = 2 L^2 * 6/16.
    assert torch.equal(attr, torch.tensor([[3.0, 12.0]]))
    assert torch.equal(delta, torch.tensor([15.0 - 20.0]))


def test_neuron_gradient_golden():
    model = LinearReLU()
    x = torch.tensor([[1.0, 2.0], [-3.0, 1.0]])
    grads = NeuronGradient(model, model.lin1).attribute(x, 1)
    assert torch.equal(grads, torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    summed = NeuronGradient(model, model.relu).attribute(x, (slice(0, 2),))
    # relu(x0 + 1) is off for the second example.
    assert torch.equal(summed, torch.tensor([[1.0, 2.0], [0.0, 2.0]]))
    many = NeuronGradient(model, model.lin1).attribute(x, [0, 1, (slice(None),)])
    assert many.shape == (3, 2, 2)
    assert torch.equal(many[2], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))


# ---------------------------------------------------------------- properties


def test_completeness_on_a_smooth_model(cnn):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 8)
    attr, delta = LayerConductance(cnn, cnn.conv2).attribute(
        x, target=1, n_steps=300, method="riemann_trapezoid", return_convergence_delta=True
    )
    with torch.no_grad():
        diff = cnn(x)[:, 1] - cnn(torch.zeros_like(x))[:, 1]
    assert attr.shape == (2, 6, 8, 8)
    torch.testing.assert_close(attr.sum((1, 2, 3)), diff, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(delta, attr.sum((1, 2, 3)) - diff)


@pytest.mark.parametrize("ibs", [2, 3, 5, 7, 13, 40])
def test_chunked_equals_unchunked(cnn, ibs):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 6, 6)
    lc = LayerConductance(cnn, cnn.act1)
    full = lc.attribute(x, target=[0, 3], n_steps=9, method="riemann_middle")
    chunked = lc.attribute(
        x, target=[0, 3], n_steps=9, method="riemann_middle", internal_batch_size=ibs
    )
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-12)


def test_memory_budget_splits_passes_without_changing_results(cnn, monkeypatch):
    x = torch.rand(3, 3, 6, 6)
    lc = LayerConductance(cnn, cnn.conv1)
    full = lc.attribute(x, target=2, n_steps=6)
    monkeypatch.setenv("EXPLAINER_MEMORY_BUDGET_MB", "0.3")  # a few points per pass
    calls = []
    # A copy of the model: its first call meters its passes afresh (a model remembers the row
    # cost of its earlier calls, measured under whatever the process held then).
    twin = copy.deepcopy(cnn)
    split = LayerConductance(twin, twin.conv1).attribute(
        x, target=2, n_steps=6, progress=lambda d, t: calls.append((d, t))
    )
    torch.testing.assert_close(split, full, rtol=1e-10, atol=1e-12)
    assert len(calls) > 2 and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_batch_equals_single_calls(cnn):
    x = torch.rand(3, 3, 5, 5)
    b = torch.rand(3, 3, 5, 5)
    lc = LayerConductance(cnn, cnn.conv2)
    batch = lc.attribute(x, baselines=b, target=[0, 1, 2], n_steps=7)
    for i in range(3):
        one = lc.attribute(x[i : i + 1], baselines=b[i : i + 1], target=i, n_steps=7)
        torch.testing.assert_close(batch[i : i + 1], one, rtol=1e-10, atol=1e-12)


def test_layer_list_equals_single_layer_calls(cnn):
    x = torch.rand(2, 3, 6, 6)
    layers = [cnn.conv2, cnn.conv1, cnn.act2]
    together, deltas = LayerConductance(cnn, layers).attribute(
        x, target=1, n_steps=5, return_convergence_delta=True
    )
    assert isinstance(together, list) and len(together) == 3
    for layer, attr, delta in zip(layers, together, deltas, strict=False):
        alone, alone_delta = LayerConductance(cnn, layer).attribute(
            x, target=1, n_steps=5, return_convergence_delta=True
        )
        torch.testing.assert_close(attr, alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(delta, alone_delta, rtol=1e-10, atol=1e-12)


def test_neuron_selector_list_equals_single_calls(cnn):
    x = torch.rand(2, 3, 6, 6)
    ng = NeuronGradient(cnn, cnn.conv2)
    selectors = [(0, 1, 1), (5, 0, 5), (slice(0, 3), 2, slice(1, 4)), lambda out: out[:, 1, 2, 2]]
    many = ng.attribute(x, selectors)
    assert many.shape == (4, 2, 3, 6, 6)
    for got, sel in zip(many, selectors, strict=False):
        torch.testing.assert_close(got, ng.attribute(x, sel), rtol=1e-12, atol=1e-14)


def test_neuron_gradient_matches_autograd(cnn):
    x = torch.rand(1, 3, 6, 6)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(cnn.conv2(cnn.act1(cnn.conv1(leaf)))[0, 2, 3, 1], leaf)
    got = NeuronGradient(cnn, cnn.conv2).attribute(x, (2, 3, 1))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_models_that_view_activations_still_work():
    class ViewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.view(h.shape[0], -1))  # breaks on channels-last activations

    model = ViewNet().eval()
    x = torch.rand(2, 3, 4, 4)
    attr = LayerConductance(model, model.conv).attribute(x, target=0, n_steps=4)
    assert attr.shape == (2, 2, 4, 4)
    grad = NeuronGradient(model, model.conv).attribute(x, (1, 2, 2))
    assert grad.shape == x.shape


def test_layer_without_gradient_path_gets_zero_conductance():
    class Side(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(3, 2)
            self.side = nn.Linear(3, 3)

        def forward(self, x):
            self.side(x)  # computed, never used
            return self.main(x)

    model = Side()
    attr = LayerConductance(model, model.side).attribute(torch.rand(2, 3), target=1, n_steps=3)
    assert torch.equal(attr, torch.zeros(2, 3))


def test_shared_model_in_threads_gives_solo_results(cnn):
    x = torch.rand(2, 3, 6, 6)
    jobs = [(cnn.conv1, 0), (cnn.conv2, 1), (cnn.act2, 2), (cnn.act1, 3)]
    solo = [LayerConductance(cnn, layer).attribute(x, target=t, n_steps=20) for layer, t in jobs]
    results = layer_conductance_in_threads(cnn, jobs, x, n_steps=20)
    for i, expected in enumerate(solo):
        for got in results[i]:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert _hooks_left(cnn) == 0


def layer_conductance_in_threads(
    model: nn.Module, jobs: list[tuple[nn.Module, int]], x: torch.Tensor, n_steps: int
) -> dict[int, list[torch.Tensor]]:
    """Run LayerConductance for each (layer, target) of ``jobs`` three times, one thread per
    job, all at once on ``model``; assert that none failed and return every result."""
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(jobs))}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                layer, t = jobs[i]
                got = LayerConductance(model, layer).attribute(x, target=t, n_steps=n_steps)
                results[i].append(got)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert all(len(r) == 3 for r in results.values())
    return results


def test_data_parallel_wrapper_is_accepted(cnn):
    x = torch.rand(1, 3, 5, 5)
    wrapped = nn.DataParallel(cnn)
    ours = LayerConductance(wrapped, cnn.conv1, device_ids=None).attribute(x, target=0, n_steps=3)
    plain = LayerConductance(cnn, cnn.conv1).attribute(x, target=0, n_steps=3)
    torch.testing.assert_close(ours, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(cnn):
    x = torch.rand(2, 3, 6, 6)
    cpu = LayerConductance(cnn, cnn.conv2).attribute(x, target=1, n_steps=8)
    gpu_model = SmallCNN().eval()
    gpu_model.load_state_dict(cnn.state_dict())
    gpu_model = gpu_model.cuda()
    gpu = LayerConductance(gpu_model, gpu_model.conv2).attribute(x.cuda(), target=1, n_steps=8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- misuse


MISUSE = {
    "unknown method": (dict(method="simpson"), AttributionError, "Unknown integration method"),
    "zero steps": (dict(n_steps=0), AttributionError, "n_steps must be a positive integer"),
    "baseline shape": (
        dict(baselines=torch.zeros(2, 3, 4, 4)),
        AttributionError,
        "Baseline 0 has shape",
    ),
    "baseline count": (dict(baselines=(0, 0)), AttributionError, "baseline(s) for 1 input"),
    "target range": (dict(target=7), AttributionError, "out of range"),
    "target arity": (dict(target=(1, 2)), AttributionError, "needs exactly 1"),
    "target missing": (dict(target=None), AttributionError, "No target given"),
    "target list length": (dict(target=[0]), AttributionError, "one target per example"),
    "no internal batch": (
        dict(internal_batch_size=0),
        AttributionError,
        "must be a positive number of rows",
    ),
    "auto tolerance": (dict(n_steps="auto", tolerance=2.0), AttributionError, "between 0 and 1"),
    "auto cap": (dict(n_steps="auto", max_steps=1), AttributionError, "at least 2"),
    "steps word": (dict(n_steps="many"), AttributionError, 'or "auto"'),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_conductance_misuse_is_explained_and_leaves_no_trace(cnn, case):
    kwargs, error, text = MISUSE[case]
    x = torch.rand(2, 3, 6, 6)
    x_before = x.clone()
    flags = _flags(cnn)
    kwargs = {"target": 1, "n_steps": 3, **kwargs}
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        LayerConductance(cnn, cnn.conv2).attribute(x, **kwargs)
    assert _hooks_left(cnn) == 0
    assert _flags(cnn) == flags
    assert torch.equal(x, x_before) and not x.requires_grad


def test_unreached_layer_is_named(cnn):
    with pytest.raises(AttributionError, match="'unused'.*not reached"):
        LayerConductance(cnn, cnn.unused).attribute(torch.rand(1, 3, 4, 4), target=0, n_steps=2)
    with pytest.raises(AttributionError, match="'unused'.*not reached"):
        NeuronGradient(cnn, cnn.unused).attribute(torch.rand(1, 3, 4, 4), 0)
    assert _hooks_left(cnn) == 0


def test_non_tensor_layer_output_is_refused():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"h": x}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DictOut()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.inner(x)["h"])

    model = Net()
    with pytest.raises(AttributionTypeError, match="'inner'.*dict"):
        LayerConductance(model, model.inner).attribute(torch.rand(2, 3), target=0, n_steps=2)
    assert _hooks_left(model) == 0


def test_reused_layer_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    with pytest.raises(AttributionError, match="more than once"):
        LayerConductance(model, model.lin).attribute(torch.rand(2, 3), target=0, n_steps=2)
    assert _hooks_left(model) == 0


@pytest.mark.parametrize(
    "selector, error, text",
    [
        ((1, 2), AttributionError, "has 2 index"),
        ((9, 0, 0), AttributionError, "out of range"),
        ("a", AttributionTypeError, "neuron_selector must be"),
        ([], AttributionError, "empty list"),
        (lambda out: "x", AttributionTypeError, "returned a str"),
        (lambda out: out[:, 0], AttributionError, "returned 72 values"),
    ],
)
def test_neuron_selector_misuse(cnn, selector, error, text):
    x = torch.rand(2, 3, 6, 6)
    flags = _flags(cnn)
    with pytest.raises(error, match=text):
        NeuronGradient(cnn, cnn.conv1).attribute(x, selector)
    assert _hooks_left(cnn) == 0
    assert _flags(cnn) == flags
    assert not x.requires_grad


def test_forward_that_raises_leaves_no_hooks(cnn):
    class Broken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    model = Broken(cnn)
    with pytest.raises(RuntimeError, match="boom"):
        LayerConductance(model, cnn.conv2).attribute(torch.rand(1, 3, 4, 4), target=0, n_steps=2)
    assert _hooks_left(model) == 0


def test_training_mode_and_grad_flags_are_kept(cnn):
    cnn.train()
    cnn.fc.weight.requires_grad_(False)
    flags = _flags(cnn)
    x = torch.rand(2, 3, 4, 4)
    LayerConductance(cnn, [cnn.conv1, cnn.conv2]).attribute(x, target=0, n_steps=3)
    NeuronGradient(cnn, cnn.conv1).attribute(x, [(0, 0, 0), (1, 1, 1)])
    assert _flags(cnn) == flags
    assert all(p.grad is None for p in cnn.parameters())


def test_wrong_argument_kinds_are_refused(cnn):
    with pytest.raises(AttributionTypeError):
        LayerConductance(cnn, "conv1")
    with pytest.raises(AttributionTypeError):
        LayerConductance(cnn, cnn.conv1).attribute([torch.rand(1, 3, 4, 4)], target=0)
    with pytest.raises(AttributionTypeError):
        NeuronGradient(cnn, [cnn.conv1, cnn.conv2])


def test_running_out_of_memory_is_explained(cnn):
    class Hungry(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")
            return self.inner(x)

    model = Hungry(cnn)
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(AttributionError, match="Ran out of memory.*internal_batch_size"):
        LayerConductance(model, cnn.conv1).attribute(x, target=0, n_steps=4)
    # Small passes fit: the same call succeeds when the work is split.
    attr = LayerConductance(model, cnn.conv1).attribute(
        x, target=0, n_steps=4, internal_batch_size=2
    )
    assert attr.shape == (1, 4, 4, 4)
    with pytest.raises(AttributionError, match="Ran out of memory"):
        NeuronGradient(model, cnn.conv1).attribute(x, [(0, 0, 0)] * 4)
    assert _hooks_left(model) == 0


def test_interrupted_computation_leaves_no_hooks(cnn):
    class Interrupted(BaseException):
        """Stands in for a rerun or a closed browser tab stopping the script."""

    def stop(done: int, total: int) -> None:
        raise Interrupted()

    flags = _flags(cnn)
    with pytest.raises(Interrupted):
        LayerConductance(cnn, [cnn.conv1, cnn.conv2]).attribute(
            torch.rand(2, 3, 6, 6), target=1, n_steps=8, internal_batch_size=4, progress=stop
        )
    assert _hooks_left(cnn) == 0
    assert _flags(cnn) == flags
    assert torch.is_grad_enabled()


def test_many_gauss_legendre_points_give_numpy_s_rule(monkeypatch):
    """Past the size where numpy's rule turns slow, the rule comes from scipy: the same nodes and
    weights (checked here at 300 points with the switch moved down to 8)."""
    import numpy as np

    from explainer import integration

    monkeypatch.setattr(integration, "_NUMPY_LEGENDRE_MAX", 8)
    integration._legendre.cache_clear()
    try:
        nodes, weights = np.polynomial.legendre.leggauss(300)
        points, steps = integration.quadrature("gausslegendre", 300)
        assert np.allclose(points, 0.5 * (nodes + 1.0), rtol=0, atol=1e-13)
        assert np.allclose(steps, 0.5 * weights, rtol=0, atol=1e-13)
        assert alphas("gausslegendre", 300) == points
        assert not integration._legendre(300)[0].flags.writeable  # the cached rule stays intact
    finally:
        integration._legendre.cache_clear()
