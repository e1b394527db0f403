"""Tests for explainer.analysis on tiny float64 models with known answers.

Every public call is followed by a check that the model was left exactly as it was found: no
hooks on any module, the same training flags, requires_grad flags, parameters and no .grad.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from captum.attr import LayerConductance as CaptumLayerConductance
from captum.attr import NeuronGradient as CaptumNeuronGradient
from torch import nn
from torch.nn.modules import module as module_globals

from explainer.analysis import (
    ConductanceResult,
    ConvergencePoint,
    NeuronGradientResult,
    class_scores,
    compute_conductance,
    compute_layer_overview,
    compute_neuron_gradient,
    compute_neuron_gradients,
    convergence_sweep,
    default_target,
    layer_activation,
    neighbours,
    position_names,
    rank_classes,
    score_shape,
    top_predictions,
    validate_target,
)
from explainer.errors import AttributionError, AttributionTypeError

# ----------------------------------------------------------------------------- models


def linear_net() -> nn.Sequential:
    """(1, 1, 2, 2) -> 4 -> 3 -> 2 with integer weights, so every answer is exact by hand.

    For x = [1, 2, 3, 4] and a zero baseline: hidden(x) = [1, 5, 9], hidden(0) = [0, 1, -1],
    so the hidden change is [1, 4, 10]; scores(x) = [14.5, 23.5], scores(0) = [-2.5, 1.5].
    """
    model = nn.Sequential(
        OrderedDict(flat=nn.Flatten(), hidden=nn.Linear(4, 3), out=nn.Linear(3, 2))
    ).double()
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1, 0, 0, 0], [0, 2, 0, 0], [1, 1, 1, 1]]))
        model.hidden.bias.copy_(torch.tensor([0, 1, -1]))
        model.out.weight.copy_(torch.tensor([[1, -1, 2], [0, 3, 1]]))
        model.out.bias.copy_(torch.tensor([0.5, -0.5]))
    return model.eval()


def linear_input() -> torch.Tensor:
    return torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 1, 2, 2)


def pointwise_conv_net() -> nn.Sequential:
    """A 1x1 convolution (channels scaled by 2 and -1) feeding a linear read-out of 8 units."""
    model = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(1, 2, 1), flat=nn.Flatten(), fc=nn.Linear(8, 1))
    ).double()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
        model.conv.bias.copy_(torch.tensor([0.25, 3.0]))
        model.fc.weight.copy_(torch.arange(1.0, 9.0).reshape(1, 8))
        model.fc.bias.zero_()
    return model.eval()


def smooth_cnn(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """conv -> softplus -> conv -> tanh -> pool -> linear on 3x16x16, 5 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            act1=nn.Softplus(),
            conv2=nn.Conv2d(4, 6, 3, padding=1),
            act2=nn.Tanh(),
            pool=nn.AdaptiveAvgPool2d(2),
            flat=nn.Flatten(),
            fc=nn.Linear(24, 5),
        )
    )
    return model.to(dtype).eval()


def gentle_cnn() -> nn.Sequential:
    """A smooth CNN without cancellations: positive weights, a damped second convolution.

    Every unit grows along the path from a zero baseline to a positive image, so the summed
    conductance is not a small difference of large terms, and the curvature is mild.
    """
    model = smooth_cnn()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.abs_()
        model.conv2.weight.mul_(0.25)
    return model


def relu_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 3),
        )
    )
    return model.double().eval()


def image(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 16, 16, generator=generator, dtype=dtype)


def positive_image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 16, 16, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------- mutation guard


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
        assert not module._backward_pre_hooks, f"backward pre-hook left on {name!r}"
    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks
    assert not module_globals._global_backward_hooks
    assert [m.training for m in model.modules()] == before["training"]
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), f"{key} changed"
    assert all(p.grad is None for p in model.parameters())


def checked(fn, model: nn.Module, *args, **kwargs):
    """Call ``fn(model, ...)`` and assert it left the model as it found it."""
    before = snapshot(model)
    try:
        return fn(model, *args, **kwargs)
    finally:
        assert_untouched(model, before)


# ----------------------------------------------------------------------------- conductance


@pytest.mark.parametrize(("target", "expected"), [(0, [1.0, -4.0, 20.0]), (1, [0.0, 12.0, 10.0])])
@pytest.mark.parametrize("n_steps", [1, 7])
def test_conductance_of_a_linear_network_is_weight_times_change(target, expected, n_steps):
    model = linear_net()
    x = linear_input()
    result = checked(
        compute_conductance,
        model,
        "hidden",
        x,
        target,
        torch.zeros_like(x),
        method="riemann_trapezoid",
        n_steps=n_steps,
    )
    assert isinstance(result, ConductanceResult)
    assert result.layer == "hidden" and result.target == target
    assert result.method == "riemann_trapezoid" and result.n_steps == n_steps
    assert not result.is_spatial and result.spatial is None
    np.testing.assert_allclose(result.attributions, expected, atol=1e-6)
    np.testing.assert_allclose(result.channel_totals, expected, atol=1e-6)
    assert result.attributions.dtype == np.float32
    assert result.output_diff == pytest.approx([17.0, 22.0][target])
    assert result.delta == pytest.approx(0.0, abs=1e-9)
    assert result.relative_delta == pytest.approx(0.0, abs=1e-9)


def test_conductance_of_a_spatial_layer_sums_channels_and_positions():
    model = pointwise_conv_net()
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
    result = checked(
        compute_conductance,
        model,
        "conv",
        x,
        0,
        torch.zeros_like(x),
        method="riemann_trapezoid",
        n_steps=3,
    )
    # Conv change: channel 0 is 2 * x, channel 1 is -x; read-out weights are 1..8.
    change = np.stack([2 * x[0, 0].numpy(), -x[0, 0].numpy()])
    expected = np.arange(1.0, 9.0).reshape(2, 2, 2) * change
    assert result.is_spatial
    np.testing.assert_allclose(result.attributions, expected, atol=1e-6)
    np.testing.assert_allclose(result.channel_totals, expected.sum(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(result.spatial, expected.sum(axis=0), atol=1e-6)
    assert result.spatial.shape == (2, 2) and result.spatial.dtype == np.float32
    assert result.output_diff == pytest.approx(expected.sum())


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("layer", ["conv1", "act1", "conv2", "act2"])
def test_completeness_on_a_smooth_model(method, layer):
    model = gentle_cnn()
    x = 0.2 * positive_image()
    baseline = torch.zeros_like(x)
    result = checked(compute_conductance, model, layer, x, 3, baseline, method=method, n_steps=100)
    with torch.no_grad():
        expected_diff = float(model(x)[0, 3] - model(baseline)[0, 3])
    assert result.output_diff == pytest.approx(expected_diff, rel=1e-9)
    assert result.output_diff > 0.05  # a meaningful test: the output really changes
    total = float(result.channel_totals.astype(np.float64).sum())
    assert total == pytest.approx(result.output_diff, rel=1e-3)
    assert result.relative_delta < 1e-3
    # The reported delta is exactly what the attributions leave unexplained.
    assert result.delta == pytest.approx(total - result.output_diff, abs=1e-6)
    assert result.attributions.shape == ((4, 16, 16) if layer.endswith("1") else (6, 16, 16))
    np.testing.assert_allclose(
        result.spatial, result.attributions.sum(axis=0), rtol=1e-5, atol=1e-7
    )


def test_the_conductance_sum_converges_at_first_order():
    # Conductance sums grad * (change of the layer between neighbouring path points), a
    # Riemann-Stieltjes sum: with the evenly spaced trapezoid points the error falls like
    # 1 / n_steps, so four times the steps leave a quarter of the delta.
    model = gentle_cnn()
    x = positive_image()
    baseline = torch.zeros_like(x)
    for layer in ("conv1", "act1"):
        coarse = compute_conductance(
            model, layer, x, 0, baseline, method="riemann_trapezoid", n_steps=100
        )
        fine = compute_conductance(
            model, layer, x, 0, baseline, method="riemann_trapezoid", n_steps=400
        )
        assert abs(coarse.delta) > 1e-6
        assert coarse.delta / fine.delta == pytest.approx(4.0, rel=0.05)
    # After "act2" the network is linear (pool, flatten, fc): the gradient is constant along
    # the path, so the sum is exact at any number of steps.
    exact = compute_conductance(
        model, "act2", x, 0, baseline, method="riemann_trapezoid", n_steps=3
    )
    assert exact.relative_delta < 1e-9


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left"])
def test_conductance_matches_captum(method):
    model = relu_cnn()
    x = image(seed=3)
    baseline = torch.full_like(x, -0.5)
    result = checked(compute_conductance, model, "relu1", x, 2, baseline, method=method, n_steps=16)
    reference, delta = CaptumLayerConductance(model, model.relu1).attribute(
        x, baselines=baseline, target=2, n_steps=16, method=method, return_convergence_delta=True
    )
    np.testing.assert_allclose(
        result.attributions, reference[0].detach().numpy(), rtol=1e-5, atol=1e-7
    )
    assert result.delta == pytest.approx(float(delta[0]), abs=1e-6)


def test_float32_input_runs_on_a_float64_model_and_the_input_is_left_alone():
    model = smooth_cnn()
    x = image(dtype=torch.float32)
    original = x.clone()
    result = checked(compute_conductance, model, "conv2", x, 0, torch.zeros_like(x), n_steps=8)
    assert result.attributions.dtype == np.float32
    assert torch.equal(x, original) and not x.requires_grad


def test_progress_reports_up_to_the_total():
    model = smooth_cnn()
    x = image()
    calls: list[tuple[int, int]] = []
    checked(
        compute_conductance,
        model,
        "conv1",
        x,
        1,
        torch.zeros_like(x),
        n_steps=10,
        internal_batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert len(calls) >= 2
    assert calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_results_do_not_depend_on_the_internal_batch_size():
    model = smooth_cnn()
    x = image()
    baseline = torch.zeros_like(x)
    whole = compute_conductance(model, "act1", x, 4, baseline, n_steps=12)
    chunked = checked(
        compute_conductance, model, "act1", x, 4, baseline, n_steps=12, internal_batch_size=5
    )
    np.testing.assert_allclose(chunked.attributions, whole.attributions, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- overview


def test_overview_equals_one_call_per_layer():
    model = smooth_cnn()
    x = image(seed=5)
    baseline = torch.full_like(x, 0.1)
    names = ["act2", "conv1", "fc", "act1"]
    overview = checked(
        compute_layer_overview, model, names, x, 2, baseline, method="riemann_trapezoid", n_steps=20
    )
    assert list(overview) == names
    for name in names:
        single = compute_conductance(
            model, name, x, 2, baseline, method="riemann_trapezoid", n_steps=20
        )
        got = overview[name]
        assert got.layer == name
        np.testing.assert_allclose(got.attributions, single.attributions, rtol=1e-5, atol=1e-7)
        assert got.delta == pytest.approx(single.delta, abs=1e-6)
        assert got.output_diff == pytest.approx(single.output_diff)
    assert overview["fc"].attributions.shape == (5,)
    assert not overview["fc"].is_spatial
    # At the output layer the gradient is one-hot on the target, and the trapezoid points
    # include both ends of the path: the target's conductance is exactly its score change.
    fc = overview["fc"].attributions
    assert fc[2] == pytest.approx(overview["fc"].output_diff, rel=1e-6)
    assert np.count_nonzero(np.delete(fc, 2)) == 0
    assert overview["fc"].relative_delta < 1e-6


class _Aliased(nn.Module):
    """Wraps a network and also holds one of its layers under a second name."""

    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.inner = inner
        self.alias = inner.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_overview_collapses_repeated_names_and_aliases():
    model = _Aliased(smooth_cnn()).eval()
    x = image()
    overview = checked(
        compute_layer_overview,
        model,
        ["inner.conv2", "alias", "inner.conv2"],
        x,
        0,
        torch.zeros_like(x),
        method="riemann_trapezoid",
        n_steps=4,
    )
    assert list(overview) == ["inner.conv2", "alias"]
    assert overview["alias"].layer == "alias"
    np.testing.assert_array_equal(
        overview["inner.conv2"].attributions, overview["alias"].attributions
    )


def test_overview_needs_a_list_of_known_layers():
    model = smooth_cnn()
    x = image()
    with pytest.raises(AttributionTypeError, match="list"):
        checked(compute_layer_overview, model, "conv1", x, 0, torch.zeros_like(x))
    with pytest.raises(AttributionError, match="at least one"):
        checked(compute_layer_overview, model, [], x, 0, torch.zeros_like(x))
    with pytest.raises(AttributionError, match="conv2"):
        checked(compute_layer_overview, model, ["conv1", "conv_2"], x, 0, torch.zeros_like(x))


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def smooth_setup():
    model = smooth_cnn()
    x = image()
    return model, x, torch.zeros_like(x)


def test_unknown_layer_suggests_close_names(smooth_setup):
    model, x, baseline = smooth_setup
    with pytest.raises(AttributionError, match="'conv1'") as info:
        checked(compute_conductance, model, "conv_1", x, 0, baseline)
    assert "no layer named 'conv_1'" in str(info.value)
    with pytest.raises(AttributionError, match="layer tree"):
        checked(compute_conductance, model, "zzzzzz", x, 0, baseline)
    with pytest.raises(AttributionError, match="empty"):
        checked(layer_activation, model, "", x)
    with pytest.raises(AttributionTypeError):
        checked(layer_activation, model, 3, x)


@pytest.mark.parametrize("target", [5, -1, 100])
def test_target_out_of_range_names_the_valid_range(smooth_setup, target):
    model, x, baseline = smooth_setup
    with pytest.raises(AttributionError, match="between 0 and 4"):
        checked(compute_conductance, model, "conv1", x, target, baseline)


def test_target_must_be_an_index(smooth_setup):
    model, x, baseline = smooth_setup
    with pytest.raises(AttributionTypeError, match="class index"):
        checked(compute_conductance, model, "conv1", x, 1.5, baseline)
    with pytest.raises(AttributionTypeError):
        checked(compute_conductance, model, "conv1", x, True, baseline)


def test_only_one_image_is_explained(smooth_setup):
    model, x, baseline = smooth_setup
    two = torch.cat([x, x])
    with pytest.raises(AttributionError, match="one image"):
        checked(compute_conductance, model, "conv1", two, 0, torch.cat([baseline, baseline]))
    with pytest.raises(AttributionError, match="one image"):
        checked(compute_conductance, model, "conv1", x[0], 0, baseline[0])
    with pytest.raises(AttributionError, match="one image"):
        checked(compute_neuron_gradient, model, "conv1", two, (0, 0, 0))
    with pytest.raises(AttributionError, match="one image"):
        checked(layer_activation, model, "conv1", two)
    with pytest.raises(AttributionTypeError):
        checked(layer_activation, model, "conv1", x.numpy())


def test_baseline_must_match_the_image(smooth_setup):
    model, x, _ = smooth_setup
    with pytest.raises(AttributionError, match="baseline has shape"):
        checked(compute_conductance, model, "conv1", x, 0, torch.zeros(1, 3, 8, 8))
    with pytest.raises(AttributionTypeError, match="make_baseline"):
        checked(compute_conductance, model, "conv1", x, 0, None)


def test_bad_settings_are_refused_before_any_work(smooth_setup):
    model, x, baseline = smooth_setup
    calls = []
    with pytest.raises(AttributionError, match="gausslegendre"):
        checked(
            compute_conductance,
            model,
            "conv1",
            x,
            0,
            baseline,
            method="simpson",
            progress=lambda *a: calls.append(a),
        )
    with pytest.raises(AttributionError, match="n_steps"):
        checked(compute_conductance, model, "conv1", x, 0, baseline, n_steps=0)
    assert calls == []


class _Pair(nn.Module):
    """Returns two tensors, which a conductance map cannot show as one layer."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, -x


class _PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.pair = _Pair()
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(self.conv(x))
        return self.fc((a * b).mean(dim=(2, 3)))


def test_layers_that_cannot_be_explained_are_reported():
    model = _PairNet().double().eval()
    x = image()
    baseline = torch.zeros_like(x)
    with pytest.raises(AttributionError, match="not used"):
        checked(compute_conductance, model, "unused", x, 0, baseline)
    with pytest.raises(AttributionError, match="not a single tensor"):
        checked(compute_conductance, model, "pair", x, 0, baseline)
    with pytest.raises(AttributionError, match="not a single tensor"):
        checked(layer_activation, model, "pair", x)


class _Reduced(nn.Module):
    """A convolution followed by a reduction that leaves no class dimension."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.how = how

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        if self.how == "per image":
            return y.mean(dim=(1, 2, 3))
        if self.how == "tuple":
            return y, -y
        if self.how == "dict":
            return {"seg": y}
        return y.argmax(dim=1)


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("per image", r"\(N, classes\), or \(N, classes, \.\.\.\).*returns \(N,\) for N"),
        ("tuple", r"a tuple of 2 tensors, not one tensor of class scores.*Wrap the model"),
        ("dict", r"dict \(keys: 'seg'\) without an 'out' or 'logits' entry.*Wrap the model"),
        ("argmax", r"torch\.int64 values \(class indices\?\)"),
    ],
)
def test_models_that_do_not_return_class_scores_are_reported(how, error):
    model = _Reduced(how).double().eval()
    x = image()
    with pytest.raises(AttributionError, match=error):
        checked(compute_conductance, model, "conv", x, 0, torch.zeros_like(x))
    with pytest.raises(AttributionError, match=error):
        checked(top_predictions, model, x, [])
    with pytest.raises(AttributionError, match=error):
        checked(score_shape, model, x)


def test_wrong_input_size_is_reported_readably():
    model = linear_net()
    x = image()  # 3x16x16 where the model wants 1x2x2
    with pytest.raises(AttributionError, match="could not run"):
        checked(compute_conductance, model, "hidden", x, 0, torch.zeros_like(x))


# ----------------------------------------------------------------------------- neuron gradients


def test_neuron_gradient_of_a_linear_unit_is_its_weight_row():
    model = linear_net()
    x = linear_input()
    result = checked(compute_neuron_gradient, model, "hidden", x, (1,))
    assert isinstance(result, NeuronGradientResult)
    assert result.layer == "hidden" and result.neuron == (1,)
    np.testing.assert_array_equal(result.gradient, [[[0.0, 2.0], [0.0, 0.0]]])
    assert result.gradient.dtype == np.float32
    assert result.activation == pytest.approx(5.0)
    assert result.abs_max == pytest.approx(2.0)


def test_batched_neuron_gradients_match_autograd_and_captum():
    model = relu_cnn()
    x = image(seed=2)
    neurons = [(0, 0, 0), (3, 15, 15), (2, 7, 9), (1, 8, 0)]
    results = checked(compute_neuron_gradients, model, "conv1", x, neurons)
    assert [r.neuron for r in results] == neurons
    activation = layer_activation(model, "conv1", x)
    for result, neuron in zip(results, neurons, strict=True):
        leaf = x.clone().requires_grad_(True)
        value = model.conv1(leaf)[(0, *neuron)]
        (expected,) = torch.autograd.grad(value, leaf)
        np.testing.assert_allclose(result.gradient, expected[0].numpy(), rtol=1e-6, atol=1e-7)
        leaf = x.clone().requires_grad_(True)
        reference = CaptumNeuronGradient(model, model.conv1).attribute(leaf, neuron)
        np.testing.assert_allclose(
            result.gradient, reference[0].detach().numpy(), rtol=1e-6, atol=1e-7
        )
        assert result.activation == pytest.approx(float(activation[neuron]), rel=1e-6)
        assert result.abs_max == pytest.approx(float(expected.abs().max()), rel=1e-6)
        assert result.gradient.shape == (3, 16, 16)
    # A corner neuron of a 3x3 convolution sees only a 2x2 patch of the input.
    assert np.count_nonzero(results[0].gradient.any(axis=0)) == 4


def test_neuron_gradients_through_later_layers_match_single_calls():
    model = relu_cnn()
    x = image(seed=4)
    neurons = [(5, 2, 3), (0, 7, 7)]
    batched = checked(compute_neuron_gradients, model, "relu2", x, neurons)
    for result in batched:
        single = compute_neuron_gradient(model, "relu2", x, result.neuron)
        np.testing.assert_allclose(result.gradient, single.gradient, rtol=1e-6, atol=1e-8)
        assert result.activation == single.activation


def test_neuron_indices_are_checked_against_the_layer():
    model = relu_cnn()
    x = image()
    with pytest.raises(AttributionError, match="give 3 indices"):
        checked(compute_neuron_gradient, model, "conv1", x, (0, 0))
    with pytest.raises(AttributionError, match="between 0 and 3"):
        checked(compute_neuron_gradient, model, "conv1", x, (4, 0, 0))
    with pytest.raises(AttributionError, match="between 0 and 15"):
        checked(compute_neuron_gradient, model, "conv1", x, (0, -1, 0))
    with pytest.raises(AttributionTypeError, match="whole numbers"):
        checked(compute_neuron_gradient, model, "conv1", x, (0, 1.5, 0))
    with pytest.raises(AttributionError, match="fc"):
        checked(compute_neuron_gradient, model, "fcc", x, (0,))
    assert checked(compute_neuron_gradients, model, "conv1", x, []) == []


# ----------------------------------------------------------------------------- activations


def test_layer_activation_is_the_layer_output():
    model = smooth_cnn()
    x = image()
    activation = checked(layer_activation, model, "act1", x)
    with torch.no_grad():
        expected = model.act1(model.conv1(x))[0]
    assert activation.dtype == np.float32 and activation.shape == (4, 16, 16)
    np.testing.assert_allclose(activation, expected.numpy(), rtol=1e-6)
    flat = checked(layer_activation, model, "fc", x)
    assert flat.shape == (5,)


def test_concurrent_calls_on_one_shared_model_do_not_mix():
    model = smooth_cnn()
    inputs = [image(seed=s) for s in range(4)]
    baseline = torch.zeros_like(inputs[0])
    expected_acts = [layer_activation(model, "conv2", x) for x in inputs]
    expected_cond = [
        compute_conductance(model, "act1", x, t, baseline, n_steps=6).attributions
        for t, x in enumerate(inputs)
    ]
    barrier = threading.Barrier(4)

    def work(i: int):
        barrier.wait(timeout=10)
        acts = [layer_activation(model, "conv2", inputs[i]) for _ in range(3)]
        cond = compute_conductance(model, "act1", inputs[i], i, baseline, n_steps=6)
        return acts, cond.attributions

    before = snapshot(model)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(work, range(4)))
    assert_untouched(model, before)
    for i, (acts, cond) in enumerate(outcomes):
        for act in acts:
            np.testing.assert_array_equal(act, expected_acts[i])
        np.testing.assert_allclose(cond, expected_cond[i], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- predictions


def test_top_predictions_are_the_softmax_in_order():
    model = linear_net()
    x = torch.cat([linear_input(), torch.zeros_like(linear_input())])
    result = checked(top_predictions, model, x, ["cat", "dog"], k=5)
    # Scores: image 0 -> [14.5, 23.5], image 1 (zeros) -> [-2.5, 1.5].
    p_dog = 1.0 / (1.0 + math.exp(-9.0))
    p_dog_zero = 1.0 / (1.0 + math.exp(-4.0))
    assert len(result) == 2
    assert [(label, index) for label, index, _ in result[0]] == [("dog", 1), ("cat", 0)]
    assert result[0][0][2] == pytest.approx(p_dog)
    assert result[0][1][2] == pytest.approx(1.0 - p_dog)
    assert result[1][0][2] == pytest.approx(p_dog_zero)


def test_top_predictions_clips_k_and_names_unlabelled_classes():
    model = smooth_cnn()
    x = image()
    result = checked(top_predictions, model, x, ["a", "b"], k=3)
    assert len(result) == 1 and len(result[0]) == 3
    probs = [p for _, _, p in result[0]]
    assert probs == sorted(probs, reverse=True)
    for label, index, _ in result[0]:
        assert label == (["a", "b"][index] if index < 2 else f"class {index}")
    everything = top_predictions(model, x, [], k=50)
    assert len(everything[0]) == 5
    assert sum(p for _, _, p in everything[0]) == pytest.approx(1.0)
    with pytest.raises(AttributionError, match="positive"):
        checked(top_predictions, model, x, [], k=0)


# ----------------------------------------------------------------------------- neighbours


def test_neighbours_in_the_middle_of_a_feature_map():
    result = neighbours((1, 2, 2), (3, 5, 5))
    assert result == [
        (1, 1, 1),
        (1, 1, 2),
        (1, 1, 3),
        (1, 2, 1),
        (1, 2, 3),
        (1, 3, 1),
        (1, 3, 2),
        (1, 3, 3),
        (0, 2, 2),
        (2, 2, 2),
    ]


def test_neighbours_at_corners_and_edges():
    assert neighbours((0, 0, 0), (3, 4, 4)) == [(0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0)]
    assert neighbours((2, 3, 3), (3, 4, 4)) == [(2, 2, 2), (2, 2, 3), (2, 3, 2), (1, 3, 3)]
    edge = neighbours((1, 0, 2), (3, 4, 4))
    assert edge == [(1, 0, 1), (1, 0, 3), (1, 1, 1), (1, 1, 2), (1, 1, 3), (0, 0, 2), (2, 0, 2)]
    # A single channel, single pixel map has no neighbours at all.
    assert neighbours((0, 0, 0), (1, 1, 1)) == []


def test_neighbours_radius_and_flat_layers():
    wide = neighbours((0, 2, 2), (1, 5, 5), radius=2)
    assert len(wide) == 24 and (0, 2, 2) not in wide and len(set(wide)) == 24
    assert neighbours((0, 2, 2), (2, 5, 5), radius=0) == [(1, 2, 2)]
    assert neighbours((0,), (5,)) == [(1,)]
    assert neighbours((4,), (5,)) == [(3,)]
    assert neighbours((2,), (5,)) == [(1,), (3,)]
    assert neighbours((2,), (5,), radius=2) == [(0,), (1,), (3,), (4,)]


def test_neighbours_reject_neurons_outside_the_layer():
    with pytest.raises(AttributionError, match="between 0 and 4"):
        neighbours((0, 5, 0), (3, 5, 5))
    with pytest.raises(AttributionError, match="give 3 indices"):
        neighbours((0, 1), (3, 5, 5))
    with pytest.raises(AttributionError, match="radius"):
        neighbours((0, 1, 1), (3, 5, 5), radius=-1)


# ----------------------------------------------------------------------------- convergence


def test_convergence_sweep_orders_points_and_reports_progress():
    model = smooth_cnn()
    x = image(seed=7)
    baseline = torch.zeros_like(x)
    calls: list[tuple[int, int]] = []
    points = checked(
        convergence_sweep,
        model,
        "act1",
        x,
        1,
        baseline,
        ["riemann_right", "riemann_trapezoid"],
        [2, 64],
        progress=lambda done, total: calls.append((done, total)),
    )
    assert all(isinstance(p, ConvergencePoint) for p in points)
    assert [(p.method, p.n_steps) for p in points] == [
        ("riemann_right", 2),
        ("riemann_right", 64),
        ("riemann_trapezoid", 2),
        ("riemann_trapezoid", 64),
    ]
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    for point in points:
        single = compute_conductance(
            model, "act1", x, 1, baseline, method=point.method, n_steps=point.n_steps
        )
        assert point.delta == pytest.approx(single.delta, rel=1e-6, abs=1e-9)
        assert point.relative_delta == pytest.approx(single.relative_delta, rel=1e-6, abs=1e-9)
    # More steps approximate the path integral better.
    assert points[1].relative_delta < points[0].relative_delta
    assert points[3].relative_delta < points[2].relative_delta
    assert points[3].relative_delta < 1e-3


def test_convergence_sweep_checks_everything_before_running():
    model = smooth_cnn()
    x = image()
    baseline = torch.zeros_like(x)
    calls = []
    with pytest.raises(AttributionError, match="at least one"):
        checked(convergence_sweep, model, "conv1", x, 0, baseline, [], [10])
    with pytest.raises(AttributionError, match="n_steps"):
        checked(
            convergence_sweep,
            model,
            "conv1",
            x,
            0,
            baseline,
            ["gausslegendre"],
            [10, 0],
            progress=lambda *a: calls.append(a),
        )
    with pytest.raises(AttributionError, match="between 0 and 4"):
        checked(
            convergence_sweep,
            model,
            "conv1",
            x,
            9,
            baseline,
            ["gausslegendre"],
            [10],
            progress=lambda *a: calls.append(a),
        )
    assert calls == []


def test_step_limit_is_enforced(monkeypatch):
    """n_steps above the operator's EXPLAINER_MAX_STEPS is refused with the limit named."""
    from explainer.analysis import compute_conductance

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)
    )
    x = torch.rand(1, 3, 6, 6)
    monkeypatch.setenv("EXPLAINER_MAX_STEPS", "16")
    with pytest.raises(AttributionError, match="limit of 16 steps"):
        compute_conductance(model.eval(), "0", x, 1, torch.zeros_like(x), n_steps=17)
    result = compute_conductance(model.eval(), "0", x, 1, torch.zeros_like(x), n_steps=16)
    assert result.attributions.shape == (2, 4, 4)


def test_non_finite_scores_are_refused_plainly():
    from explainer.analysis import compute_conductance

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.flatten(1)) * float("nan")

    x = torch.rand(1, 1, 2, 2)
    with pytest.raises(AttributionError, match="NaN or infinite"):
        compute_conductance(Broken().eval(), "lin", x, 0, torch.zeros_like(x))


# ----------------------------------------------------------------------------- per-position scores


class _RowMean(nn.Module):
    """(N, C, H, W) -> (N, C, W): one score per class at every column."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2)


def pixel_net(per: str = "pixel") -> nn.Sequential:
    """conv -> softplus -> 1x1 conv: 3 class scores at every pixel of an 8x8 image, or (with
    ``per="column"``) averaged over the rows: 3 scores at each of 8 columns."""
    torch.manual_seed(5)
    layers = OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1),
        act1=nn.Softplus(),
        head=nn.Conv2d(4, 3, 1),
    )
    if per == "column":
        layers["rows"] = _RowMean()
    return nn.Sequential(layers).double().eval()


class _WithAux(nn.Module):
    """Returns ``{"out": scores, "aux": ...}`` like torchvision's segmentation models."""

    def __init__(self) -> None:
        super().__init__()
        self.body = pixel_net()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.body(x)
        return {"aux": scores.flip(1), "out": scores}


def pixel_image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 8, 8, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(
    ("per", "target", "layer"),
    [
        ("pixel", (2, 3, 5), "conv1"),
        ("pixel", (0, 7, 0), "act1"),
        ("column", (1, 4), "conv1"),
        ("column", (2, 0), "act1"),
    ],
)
def test_conductance_with_a_tuple_target_matches_captum(per, target, layer):
    model = pixel_net(per)
    x = pixel_image(1)
    baseline = torch.full_like(x, -0.25)
    result = checked(compute_conductance, model, layer, x, target, baseline, n_steps=24)
    module = model.get_submodule(layer)
    reference, delta = CaptumLayerConductance(model, module).attribute(
        x, baselines=baseline, target=target, n_steps=24, return_convergence_delta=True
    )
    np.testing.assert_allclose(
        result.attributions, reference[0].detach().numpy(), rtol=1e-4, atol=1e-9
    )
    assert result.target == target
    assert result.target_class == target[0] and result.target_position == target[1:]
    with torch.no_grad():
        expected_diff = float(model(x)[(0, *target)] - model(baseline)[(0, *target)])
    assert result.output_diff == pytest.approx(expected_diff, rel=1e-12)
    assert result.delta == pytest.approx(float(result.attributions.sum()) - expected_diff, abs=1e-5)
    assert result.delta == pytest.approx(float(delta[0]), abs=1e-6)


def test_conductance_of_the_score_layer_sits_in_the_explained_unit():
    """At the layer that computes the scores, only the explained score's own unit conducts;
    with a path that includes both ends, its conductance is exactly the score difference."""
    model = pixel_net()
    x = pixel_image(2)
    result = checked(
        compute_conductance,
        model,
        "head",
        x,
        (1, 2, 6),
        torch.zeros_like(x),
        method="riemann_trapezoid",
        n_steps=5,
    )
    expected = np.zeros((3, 8, 8))
    expected[1, 2, 6] = result.output_diff
    np.testing.assert_allclose(result.attributions, expected, rtol=1e-6, atol=1e-12)
    assert abs(result.delta) < 1e-9


def test_overview_and_sweep_take_tuple_targets():
    model = pixel_net()
    x = pixel_image(3)
    baseline = torch.zeros_like(x)
    target = (2, 4, 4)
    overview = checked(compute_layer_overview, model, ["conv1", "act1"], x, target, baseline)
    for name in ("conv1", "act1"):
        single = compute_conductance(model, name, x, target, baseline)
        np.testing.assert_allclose(overview[name].attributions, single.attributions, rtol=1e-6)
        assert overview[name].target == target
    points = checked(
        convergence_sweep, model, "act1", x, target, baseline, ["gausslegendre"], [4, 50]
    )
    assert points[-1].delta == pytest.approx(overview["act1"].delta, abs=1e-9)
    assert abs(points[-1].delta) <= abs(points[0].delta) + 1e-12


def test_a_dict_output_is_explained_through_its_out_entry():
    model = _WithAux().eval()
    plain = model.body
    x = pixel_image(4)
    baseline = torch.zeros_like(x)
    result = checked(compute_conductance, model, "body.act1", x, (1, 3, 3), baseline)
    expected = compute_conductance(plain, "act1", x, (1, 3, 3), baseline)
    np.testing.assert_allclose(result.attributions, expected.attributions, rtol=1e-9)
    assert result.output_diff == pytest.approx(expected.output_diff, rel=1e-12)
    assert score_shape(model, x) == (3, 8, 8)
    np.testing.assert_array_equal(class_scores(model, x), class_scores(plain, x))
    sweep = checked(
        convergence_sweep, model, "body.conv1", x, (1, 3, 3), baseline, ["gausslegendre"], [8]
    )
    assert np.isfinite(sweep[0].delta)


@pytest.mark.parametrize(
    ("target", "error", "pattern"),
    [
        (
            1,
            AttributionError,
            r"names a class only.*every position of its 8 × 8 output.*\(class, row, column\) "
            r"with class between 0 and 2, row between 0 and 7 and column between 0 and 7",
        ),
        ((1, 2), AttributionError, r"has 2 indices.*give 3, \(class, row, column\)"),
        ((1, 2, 3, 4), AttributionError, r"has 4 indices"),
        ((1, 9, 3), AttributionError, r"out of range: row 9 is not between 0 and 7"),
        ((3, 0, 0), AttributionError, r"out of range: class 3 is not between 0 and 2"),
        ((0, -1, 0), AttributionError, r"row -1 is not between 0 and 7"),
        ((0, 1.5, 0), AttributionTypeError, r"class index .* or a tuple \(class, row, column\)"),
        ([0, 1, 1], AttributionTypeError, r"got \[0, 1, 1\]"),
        ((True, 1, 1), AttributionTypeError, r"class index"),
    ],
)
def test_bad_tuple_targets_say_what_is_valid(target, error, pattern):
    model = pixel_net()
    x = pixel_image()
    with pytest.raises(error, match=pattern):
        checked(compute_conductance, model, "conv1", x, target, torch.zeros_like(x))
    with pytest.raises(error, match=pattern):
        convergence_sweep(model, "conv1", x, target, torch.zeros_like(x), ["gausslegendre"], [4])


def test_validate_target_normalises_and_names_positions():
    assert validate_target(np.int64(2), (5,)) == 2 and type(validate_target(2, (5,))) is int
    assert validate_target((2,), (5,)) == 2  # a one-index tuple for class scores
    assert validate_target((np.int64(1), 2), (3, 4)) == (1, 2)
    with pytest.raises(AttributionError, match=r"give 2, \(class, position\)"):
        validate_target((1,), (3, 4))
    with pytest.raises(AttributionError, match="Target class 7 is out of range"):
        validate_target(7, (5,))
    assert position_names(1) == ("position",)
    assert position_names(2) == ("row", "column")
    assert position_names(3) == ("depth", "row", "column")
    assert position_names(4) == ("index 1", "index 2", "index 3", "index 4")


def _one_by_one() -> nn.Conv2d:
    """Scores equal to the input: class c at (y, x) scores x[c, y, x]."""
    conv = nn.Conv2d(3, 3, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    return conv.eval()


def test_top_predictions_of_per_position_scores_are_shares_of_the_output():
    model = _one_by_one()
    # Class 0 has the highest score at three of the four positions, class 2 at one, class 1 at
    # none.
    x = torch.tensor(
        [
            [[5.0, 5.0], [5.0, 0.0]],  # class 0
            [[4.0, 4.0], [4.0, 4.0]],  # class 1
            [[0.0, 0.0], [0.0, 6.0]],  # class 2
        ],
        dtype=torch.float64,
    ).reshape(1, 3, 2, 2)
    (ranked,) = checked(top_predictions, model, x, ["sky", "road"], k=3)
    assert [(label, index) for label, index, _ in ranked] == [
        ("sky", 0),
        ("class 2", 2),
        ("road", 1),
    ]
    assert [share for _, _, share in ranked] == [0.75, 0.25, 0.0]
    # Ties in share are broken by the mean softmax probability over the positions.
    tied = torch.stack([x[0, 0], x[0, 2] - 10.0, x[0, 2] - 20.0]).reshape(1, 3, 2, 2)
    tied[0, 0, 1, 1] = 7.0  # class 0 now wins everywhere
    (ranked,) = top_predictions(model, tied, [], k=3)
    assert [index for _, index, _ in ranked] == [0, 1, 2]
    assert ranked[0][2] == 1.0 and ranked[1][2] == ranked[2][2] == 0.0
    scores = class_scores(model, x)
    assert scores.shape == (3, 2, 2) and scores.dtype == np.float64
    assert rank_classes(scores, [], k=1) == [("class 0", 0, 0.75)]


def test_top_predictions_of_column_scores():
    model = nn.Sequential(_one_by_one(), _RowMean()).eval()
    x = torch.zeros(1, 3, 2, 3, dtype=torch.float64)
    x[0, 1, :, 0] = 1.0
    x[0, 1, :, 1] = 1.0
    x[0, 2, :, 2] = 1.0
    assert score_shape(model, x) == (3, 3)
    (ranked,) = top_predictions(model, x, [], k=2)
    assert [(index, share) for _, index, share in ranked] == [(1, pytest.approx(2 / 3)), (2, 1 / 3)]
    assert default_target(class_scores(model, x)) == (1, 0)
    assert default_target(class_scores(model, x), 2) == (2, 2)


def test_default_target_is_the_top_class_at_its_highest_score():
    scores = np.zeros((2, 3, 4))
    scores[1] = 1.0  # class 1 wins everywhere...
    scores[1, 2, 1] = 3.0  # ...and scores highest at row 2, column 1
    scores[0, 0, 3] = 0.5
    scores[0, 1, 2] = 0.9  # class 0's own peak
    assert default_target(scores) == (1, 2, 1)
    assert default_target(scores, 0) == (0, 1, 2)
    assert default_target(scores, 1, (0, None)) == (1, 0, 0)  # first of equal scores in row 0
    assert default_target(scores, 1, (None, 3)) == (1, 0, 3)
    assert default_target(scores, 0, (2, 3)) == (0, 2, 3)  # a full position is kept
    assert default_target(np.array([0.1, 2.0, -1.0])) == 1  # class scores: just the class
    with pytest.raises(AttributionError, match=r"has 1 index, but the scores have 2 position"):
        default_target(scores, 1, (2,))
    with pytest.raises(AttributionError, match="column 7 is not between 0 and 3"):
        default_target(scores, 1, (None, 7))
    with pytest.raises(AttributionError, match="class 4 is not between 0 and 1"):
        default_target(scores, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rank_classes_refuses_scores_that_are_not_finite(bad):
    scores = np.array([[0.5, 1.0], [bad, 0.0]])
    with pytest.raises(AttributionError, match="NaN or infinite"):
        rank_classes(scores, ["a", "b"])


class _Stepped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.sign(self.conv(x)).mean((2, 3)))


def test_zero_conductance_tells_a_still_layer_from_one_without_gradient():
    torch.manual_seed(0)
    model = _Stepped().eval()
    x = torch.rand(1, 3, 8, 8)
    blocked = compute_conductance(model, "conv", x, 1, torch.zeros_like(x), n_steps=4)
    assert not blocked.attributions.any() and blocked.layer_moves
    still = compute_conductance(model, "conv", x, 1, x.clone(), n_steps=4)
    assert not still.attributions.any() and not still.layer_moves


@pytest.mark.parametrize(
    ("diff", "scale", "expected"),
    [
        (0.0, 0.0, True),  # no difference at all
        (0.0, 5.0, True),
        (1e-6, 1.0, True),  # below 1e-5 of the largest score
        (1e-5, 1.0, True),  # the bound itself
        (2e-5, 1.0, False),
        (-3e-4, 30.0, True),  # the sign does not matter
        (1e-12, 1e-10, False),  # tiny scores: the difference is large next to them
        (0.3, 2.0, False),
        (float("nan"), 1.0, False),  # NaN is reported elsewhere, not as noise
    ],
)
def test_negligible_difference_is_relative_to_the_scores(diff, scale, expected):
    from explainer.analysis import negligible_difference

    assert negligible_difference(diff, scale) is expected
