"""Agreement with Captum, the independent reference for both attribution methods.

Every test runs the same call through ``explainer.attribution`` and through
``captum.attr.LayerConductance`` / ``captum.attr.NeuronGradient`` (a test-only dependency) and
requires agreement within 1e-4, relative to the largest reference value. The models are
Captum's own test helpers plus a randomly initialised torchvision ResNet-18, in float64 so
that the tolerance measures the engine and not rounding.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
torchvision_models = pytest.importorskip("torchvision.models")

from explainer.attribution import LayerConductance, NeuronGradient  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
EXPLAINER_MODULES = (
    "attribution",
    "models",
    "images",
    "tree",
    "analysis",
    "cache",
    "baselines",
    "demo",
    "limits",
)


# --------------------------------------------------------------------------------------------
# helpers


def assert_matches(ours, ref) -> None:
    """``ours`` equals Captum's ``ref`` within 1e-4 of the largest reference value."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, type(ref)), f"expected a {type(ref).__name__}, got {type(ours)}"
        assert len(ours) == len(ref)
        for o, r in zip(ours, ref, strict=True):
            assert_matches(o, r)
        return
    assert isinstance(ours, Tensor), f"expected a tensor, got {type(ours).__name__}"
    ref = ref.detach()
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale + 1e-8)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def conductance_pair(model, layer, inputs, **kwargs):
    """(ours, captum's) conductance for the same call."""
    ours = LayerConductance(model, layer).attribute(inputs, **kwargs)
    ref = captum_attr.LayerConductance(model, layer).attribute(inputs, **kwargs)
    return ours, ref


def check_conductance(model, layer, inputs, **kwargs) -> None:
    """Attributions and convergence deltas agree with the reference."""
    ours, ref = conductance_pair(model, layer, inputs, return_convergence_delta=True, **kwargs)
    assert_matches(ours[0], ref[0])
    assert_matches(ours[1], ref[1])
    assert ours[1].shape == (ref[1].shape[0],)


def check_neuron_gradient(model, layer, inputs, selector, **kwargs) -> None:
    ours = NeuronGradient(model, layer).attribute(inputs, selector, **kwargs)
    ref = captum_attr.NeuronGradient(model, layer).attribute(inputs, selector, **kwargs)
    assert_matches(ours, ref)


class ScalarOutput(nn.Module):
    """One number per example: a target of ``None`` is the only valid one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = basic_models.BasicModel_MultiLayer()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 1]


class Output3D(nn.Module):
    """Output of shape (N, 2, 2): targets are tuples of two indices."""

    def __init__(self) -> None:
        super().__init__()
        self.net = basic_models.BasicModel_MultiLayer()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, None, True)[..., 1]


def multilayer(**kwargs) -> nn.Module:
    return basic_models.BasicModel_MultiLayer(**kwargs).double().eval()


def layer_of(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


@pytest.fixture(scope="module")
def convnet() -> nn.Module:
    torch.manual_seed(0)
    model = basic_models.BasicModel_ConvNet().double().eval()
    # Captum's helper sets fc2 to all ones, which makes every class score nearly the same and
    # conductances of about 1e-17: random weights give values the comparison can see.
    with torch.no_grad():
        model.fc2.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision_models.resnet18(num_classes=10).double().eval()


# --------------------------------------------------------------------------------------------
# LayerConductance: targets

TARGET_CASES = {
    "none-scalar-output": ("scalar", None),
    "int": ("2d", 1),
    "negative-int": ("2d", -2),
    "one-element-tensor": ("2d", torch.tensor([1])),
    "zero-dim-tensor": ("2d", torch.tensor(0)),
    "list-of-ints": ("2d", [1, 0, 1]),
    "1d-tensor": ("2d", torch.tensor([0, 1, 1])),
    "tuple": ("3d", (1, 0)),
    "list-of-tuples": ("3d", [(1, 0), (0, 1), (1, 1)]),
}


def target_model(kind: str) -> nn.Module:
    model = {"scalar": ScalarOutput, "3d": Output3D}.get(kind, basic_models.BasicModel_MultiLayer)()
    return model.double().eval()


@pytest.mark.parametrize("layer_name", ["linear0", "linear1", "relu", "linear2"])
@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_conductance_targets(case, layer_name):
    kind, target = TARGET_CASES[case]
    model = target_model(kind)
    inner = model if kind == "2d" else model.net
    x = randn(3, 3, seed=1) * 3
    check_conductance(model, layer_of(inner, layer_name), x, target=target, n_steps=9)


def test_conductance_target_tuple_on_4d_output_with_non_tensor_args():
    model = multilayer()
    x = randn(2, 3, seed=2) * 2
    # (add_input=None, multidim_output=True): neither is a tensor, both pass through unchanged.
    check_conductance(
        model, model.linear1, x, target=(1, 0, 1), additional_forward_args=(None, True), n_steps=6
    )


# --------------------------------------------------------------------------------------------
# LayerConductance: baselines and inputs

SINGLE_BASELINES = {
    "none": lambda x: None,
    "float": lambda x: 0.25,
    "int": lambda x: -1,
    "full-tensor": lambda x: randn(*x.shape, seed=5),
    "batch-1-tensor": lambda x: randn(1, *x.shape[1:], seed=6),
}


@pytest.mark.parametrize("baseline", list(SINGLE_BASELINES))
@pytest.mark.parametrize("layer_name", ["linear1", "relu"])
def test_conductance_baselines_single_input(baseline, layer_name):
    model = multilayer()
    x = randn(2, 3, seed=3) * 3
    check_conductance(
        model,
        layer_of(model, layer_name),
        x,
        baselines=SINGLE_BASELINES[baseline](x),
        target=[0, 1],
        n_steps=8,
    )


TUPLE_BASELINES = {
    "none": lambda xs: None,
    "scalars": lambda xs: (-0.5, 1.0, -0.25),  # non-zero results (others give all zeros)
    "full-tensors": lambda xs: tuple(randn(*x.shape, seed=10 + i) for i, x in enumerate(xs)),
    "mixed": lambda xs: (0.3, randn(*xs[1].shape, seed=7), randn(1, *xs[2].shape[1:], seed=8)),
}


@pytest.mark.parametrize("baseline", list(TUPLE_BASELINES))
@pytest.mark.parametrize("layer_name", ["model.linear0", "model.linear1"])
def test_conductance_tuple_inputs_and_baselines(baseline, layer_name):
    model = basic_models.BasicModel_MultiLayer_MultiInput().double().eval()
    xs = tuple(randn(3, 3, seed=20 + i) for i in range(3))
    # `scale` is an int extra argument: passed to every forward call as it is.
    check_conductance(
        model,
        layer_of(model, layer_name),
        xs,
        baselines=TUPLE_BASELINES[baseline](xs),
        target=1,
        additional_forward_args=2,
        n_steps=7,
    )


# --------------------------------------------------------------------------------------------
# LayerConductance: integration methods and internal batching


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("internal_batch_size", [None, 2, 4, 6, 10, 16, 100])
def test_conductance_methods_and_internal_batch_size(convnet, method, internal_batch_size):
    """8 path points for 2 examples: 1, 2, 3 (not dividing 8), 5 or all points per pass."""
    x = randn(2, 1, 10, 10, seed=4)
    kwargs = dict(target=3, n_steps=7, method=method)
    ours, ref = conductance_pair(
        convnet, convnet.conv2, x, internal_batch_size=internal_batch_size, **kwargs
    )
    assert_matches(ours, ref)
    unchunked = LayerConductance(convnet, convnet.conv2).attribute(x, **kwargs)
    scale = float(unchunked.abs().max())
    torch.testing.assert_close(ours, unchunked, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("method", METHODS)
def test_conductance_methods_with_delta(convnet, method):
    x = randn(2, 1, 10, 10, seed=9)
    check_conductance(convnet, convnet.pool1, x, target=[2, 7], n_steps=5, method=method)


# --------------------------------------------------------------------------------------------
# LayerConductance: additional forward arguments


def test_conductance_tensor_additional_arg_is_expanded_along_the_path():
    model = multilayer()
    x, add = randn(3, 3, seed=11), randn(3, 3, seed=12) * 2
    for layer in (model.linear0, model.linear1, model.relu):
        check_conductance(
            model,
            layer,
            x,
            target=[1, 0, 0],
            additional_forward_args=add,
            n_steps=6,
            internal_batch_size=9,
        )


def test_conductance_tensor_and_non_tensor_additional_args_together():
    model = multilayer()
    x, add = randn(2, 3, seed=13), randn(2, 3, seed=14)
    check_conductance(
        model,
        model.linear1,
        x,
        target=[(0, 1, 1), (1, 0, 0)],
        additional_forward_args=(add, True),
        n_steps=5,
        method="riemann_middle",
    )


def test_conductance_convnet_with_tensor_additional_input():
    model = basic_models.BasicModel_ConvNet_One_Conv().double().eval()
    x, x2 = randn(2, 1, 4, 4, seed=15) * 10, randn(2, 1, 4, 4, seed=16) * 10
    for layer in (model.conv1, model.relu1, model.fc1):
        check_conductance(
            model,
            layer,
            x,
            target=2,
            additional_forward_args=x2,
            n_steps=6,
            baselines=randn(1, 1, 4, 4, seed=17),
        )


# --------------------------------------------------------------------------------------------
# LayerConductance: layers with several tensors


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left"])
def test_conductance_tuple_layer(to_input, method):
    """MultiRelu returns two tensors and takes two: attributions are a tuple of two."""
    model = multilayer(multi_input_module=True)
    x = randn(3, 3, seed=18) * 3
    ours, ref = conductance_pair(
        model,
        model.multi_relu,
        x,
        target=[0, 1, 1],
        n_steps=8,
        method=method,
        attribute_to_layer_input=to_input,
        return_convergence_delta=True,
        internal_batch_size=7,
    )
    assert isinstance(ours[0], tuple) and len(ours[0]) == 2
    assert_matches(ours, ref)


def test_conductance_to_layer_input_single_tensor(convnet):
    x = randn(2, 1, 10, 10, seed=19)
    for layer in (convnet.conv2, convnet.fc1, convnet.softmax):
        check_conductance(
            convnet,
            layer,
            x,
            target=4,
            n_steps=5,
            attribute_to_layer_input=True,
            method="riemann_right",
        )


# --------------------------------------------------------------------------------------------
# LayerConductance: convergence delta computed directly


@pytest.mark.parametrize("baseline", ["none", "float", "full-tensor", "batch-1-tensor"])
def test_compute_convergence_delta_matches_reference(baseline):
    model = multilayer()
    x = randn(3, 3, seed=21) * 2
    base = SINGLE_BASELINES[baseline](x)
    attrs = randn(3, 4, seed=22)
    ours = LayerConductance(model, model.linear1).compute_convergence_delta(
        attrs, base, x, target=[1, 0, 1]
    )
    ref = captum_attr.LayerConductance(model, model.linear1).compute_convergence_delta(
        attrs, base, x, target=[1, 0, 1]
    )
    assert ours.shape == (3,)
    assert_matches(ours, ref)


def test_compute_convergence_delta_tuple_attributions_inputs_and_args():
    model = basic_models.BasicModel_MultiLayer_MultiInput().double().eval()
    xs = tuple(randn(2, 3, seed=30 + i) for i in range(3))
    starts = (0.5, randn(2, 3, seed=33), randn(1, 3, seed=34))
    attrs = (randn(2, 4, seed=35), randn(2, 2, 2, seed=36))
    kwargs = dict(target=torch.tensor([1, 0]), additional_forward_args=3)
    ours = LayerConductance(model, model.model.linear1).compute_convergence_delta(
        attrs, starts, xs, **kwargs
    )
    ref = captum_attr.LayerConductance(model, model.model.linear1).compute_convergence_delta(
        attrs, starts, xs, **kwargs
    )
    assert_matches(ours, ref)


def test_convergence_delta_is_signed_per_example():
    """The delta is not an absolute value: an attribution shifted down gives a negative one."""
    model = multilayer()
    x = randn(2, 3, seed=37) * 3
    attrs, delta = LayerConductance(model, model.linear1).attribute(
        x, target=0, n_steps=20, return_convergence_delta=True
    )
    shifted = attrs - torch.tensor([[1.0], [-2.0]], dtype=attrs.dtype)
    ref = captum_attr.LayerConductance(model, model.linear1).compute_convergence_delta(
        shifted, None, x, target=0
    )
    ours = LayerConductance(model, model.linear1).compute_convergence_delta(shifted, None, x, 0)
    assert_matches(ours, ref)
    torch.testing.assert_close(ours - delta, torch.tensor([-4.0, 8.0], dtype=ours.dtype))


# --------------------------------------------------------------------------------------------
# LayerConductance: lists of layers


def test_conductance_layer_list_equals_single_layer_reference():
    model = multilayer(multi_input_module=True)
    x = randn(3, 3, seed=40) * 3
    layers = [model.linear2, model.linear0, model.multi_relu, model.linear1]
    kwargs = dict(target=[1, 0, 1], n_steps=7, method="riemann_trapezoid", internal_batch_size=8)
    attrs, deltas = LayerConductance(model, layers).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    assert isinstance(attrs, list) and isinstance(deltas, list)
    assert len(attrs) == len(deltas) == len(layers)
    for layer, attr, delta in zip(layers, attrs, deltas, strict=True):
        ref_attr, ref_delta = captum_attr.LayerConductance(model, layer).attribute(
            x, return_convergence_delta=True, **kwargs
        )
        assert_matches(attr, ref_attr)
        assert_matches(delta, ref_delta)


def test_conductance_layer_list_of_one_and_without_delta(convnet):
    x = randn(2, 1, 10, 10, seed=41)
    kwargs = dict(target=[3, 8], n_steps=6)
    attrs = LayerConductance(convnet, [convnet.conv1]).attribute(x, **kwargs)
    assert isinstance(attrs, list) and len(attrs) == 1
    ref = captum_attr.LayerConductance(convnet, convnet.conv1).attribute(x, **kwargs)
    assert_matches(attrs[0], ref)
    layers = [convnet.conv1, convnet.relu2, convnet.fc2]
    attrs = LayerConductance(convnet, layers).attribute(x, attribute_to_layer_input=True, **kwargs)
    for layer, attr in zip(layers, attrs, strict=True):
        ref = captum_attr.LayerConductance(convnet, layer).attribute(
            x, attribute_to_layer_input=True, **kwargs
        )
        assert_matches(attr, ref)


# --------------------------------------------------------------------------------------------
# LayerConductance: ResNet-18


def test_resnet_block_conductance_float64(resnet):
    x = randn(1, 3, 64, 64, seed=50)
    check_conductance(resnet, resnet.layer2, x, target=3, n_steps=3)


def test_resnet_layer_list_chunked_float64(resnet):
    x = randn(1, 3, 32, 32, seed=51)
    layers = [resnet.layer1[0].conv1, resnet.layer3[1].bn2, resnet.fc]
    kwargs = dict(target=7, n_steps=3, method="riemann_trapezoid", internal_batch_size=2)
    attrs, deltas = LayerConductance(resnet, layers).attribute(
        x, return_convergence_delta=True, **kwargs
    )
    for layer, attr, delta in zip(layers, attrs, deltas, strict=True):
        ref_attr, ref_delta = captum_attr.LayerConductance(resnet, layer).attribute(
            x, return_convergence_delta=True, **kwargs
        )
        assert_matches(attr, ref_attr)
        assert_matches(delta, ref_delta)


def test_resnet_conductance_float32():
    torch.manual_seed(1)
    model = torchvision_models.resnet18(num_classes=10).float().eval()
    x = randn(2, 3, 32, 32, seed=52, dtype=torch.float32)
    ours, ref = conductance_pair(model, model.layer1[1].conv2, x, target=[0, 9], n_steps=3)
    assert ours.dtype == torch.float32
    rel = float((ours - ref.detach()).norm() / ref.detach().norm())
    assert rel < 1e-4


# --------------------------------------------------------------------------------------------
# NeuronGradient


@pytest.mark.parametrize(
    "layer_name, selector",
    [
        ("fc1", 3),
        ("fc2", -1),
        ("fc1", (5,)),
        ("conv1", (1, 2, 3)),
        ("conv2", (3, 0, 1)),
        ("conv1", (slice(0, 2), slice(1, 4), 2)),
        ("conv1", (0, slice(None), slice(None))),
        ("pool1", (slice(None), 1, slice(0, 3))),
        ("fc1", (slice(2, 6),)),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_neuron_gradient_index_selectors(convnet, layer_name, selector):
    x = randn(2, 1, 10, 10, seed=60)
    check_neuron_gradient(convnet, layer_of(convnet, layer_name), x, selector)


@pytest.mark.parametrize(
    "selector",
    [
        lambda t: t[:, 1].sum((1, 2)),  # one value per example
        lambda t: t[:, 0, 1, 1] * t[:, 3, 0, 1],  # one value per example, not linear
        lambda t: t.sum(),  # one value in total (0-d)
        lambda t: t[:, 2].amax((1, 2)).sum().reshape(1),  # one value, as a 1-element tensor
    ],
    ids=["per-example", "per-example-product", "one-value", "one-element"],
)
def test_neuron_gradient_callable_selectors(convnet, selector):
    x = randn(2, 1, 10, 10, seed=61)
    check_neuron_gradient(convnet, convnet.conv2, x, selector)


@pytest.mark.parametrize(
    "layer_name, selector",
    [("conv2", (1, 0, 1)), ("fc1", 2), ("relu3", (slice(0, 4),)), ("softmax", 9)],
)
def test_neuron_gradient_attribute_to_neuron_input(convnet, layer_name, selector):
    x = randn(2, 1, 10, 10, seed=62)
    check_neuron_gradient(
        convnet, layer_of(convnet, layer_name), x, selector, attribute_to_neuron_input=True
    )


def test_neuron_gradient_tuple_inputs_with_non_tensor_arg():
    model = basic_models.BasicModel_MultiLayer_MultiInput().double().eval()
    xs = tuple(randn(3, 3, seed=63 + i) for i in range(3))
    ours = NeuronGradient(model, model.model.linear1).attribute(xs, 2, additional_forward_args=3)
    assert isinstance(ours, tuple) and len(ours) == 3
    check_neuron_gradient(model, model.model.linear1, xs, 2, additional_forward_args=3)
    check_neuron_gradient(model, model.model.relu, xs, (slice(1, 3),), additional_forward_args=3)


def test_neuron_gradient_tensor_additional_args():
    model = multilayer()
    x, add = randn(3, 3, seed=66) * 2, randn(3, 3, seed=67)
    check_neuron_gradient(model, model.linear1, x, 1, additional_forward_args=add)
    check_neuron_gradient(model, model.linear2, x, 1, additional_forward_args=(add, True))
    conv = basic_models.BasicModel_ConvNet_One_Conv().double().eval()
    x, x2 = randn(2, 1, 4, 4, seed=68) * 10, randn(2, 1, 4, 4, seed=69) * 10
    check_neuron_gradient(conv, conv.conv1, x, (1, 0, 1), additional_forward_args=x2)
    check_neuron_gradient(conv, conv.fc1, x, 3, additional_forward_args=x2)


@pytest.mark.parametrize("to_input", [False, True])
def test_neuron_gradient_tuple_layer_with_callable(to_input):
    model = multilayer(multi_input_module=True)
    x = randn(3, 3, seed=70) * 3
    check_neuron_gradient(
        model,
        model.multi_relu,
        x,
        lambda t: t[0][:, 1] + 2 * t[1][:, 3],
        attribute_to_neuron_input=to_input,
    )


def test_neuron_gradient_selector_lists_equal_single_reference_calls(convnet):
    x = randn(2, 1, 10, 10, seed=71)
    selectors = [
        (1, 2, 3),
        (slice(0, 2), 4, slice(None)),
        lambda t: t[:, 1, 3, 3],
        (0, 0, 0),
        lambda t: t.sum(),
    ]
    ours = NeuronGradient(convnet, convnet.conv1).attribute(x, selectors)
    assert ours.shape == (len(selectors), *x.shape)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronGradient(convnet, convnet.conv1).attribute(x, selector)
        assert_matches(ours[i], ref)


def test_neuron_gradient_selector_list_tuple_inputs():
    model = basic_models.BasicModel_MultiLayer_MultiInput().double().eval()
    xs = tuple(randn(2, 3, seed=72 + i) for i in range(3))
    selectors = [0, 3, lambda t: t[:, 1] - t[:, 2]]
    ours = NeuronGradient(model, model.model.linear1).attribute(
        xs, selectors, additional_forward_args=2
    )
    assert isinstance(ours, tuple) and all(o.shape == (3, 2, 3) for o in ours)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronGradient(model, model.model.linear1).attribute(
            xs, selector, additional_forward_args=2
        )
        assert_matches(tuple(o[i] for o in ours), ref)


def test_resnet_neuron_gradients_float64(resnet):
    x = randn(2, 3, 32, 32, seed=73)
    selectors = [(5, 1, 2), (slice(0, 8), slice(None), 0), lambda t: t[:, 3].mean((1, 2))]
    ours = NeuronGradient(resnet, resnet.layer2[0].conv2).attribute(x, selectors)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronGradient(resnet, resnet.layer2[0].conv2).attribute(x, selector)
        assert_matches(ours[i], ref)
    check_neuron_gradient(resnet, resnet.fc, x, 17, attribute_to_neuron_input=True)


# --------------------------------------------------------------------------------------------
# Known differences from the reference (engine bugs; see the reasons)


class EarlyUse(nn.Module):
    """The tensor fed to ``lin1`` (and returned by ``ident``) is also used before that call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(3, 3)
        self.ident = nn.Identity()
        self.lin1 = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin0(x))
        side = (h**2).sum(1, keepdim=True)  # a use of h before the tapped module runs
        return self.lin1(self.ident(h)) + side


@pytest.mark.parametrize("layer_name, to_input", [("lin1", True), ("ident", False)])
def test_tensor_used_before_the_layer_runs(layer_name, to_input):
    torch.manual_seed(0)
    model = EarlyUse().double()
    x = randn(2, 3, seed=80)
    check_conductance(
        model,
        layer_of(model, layer_name),
        x,
        target=0,
        n_steps=10,
        attribute_to_layer_input=to_input,
    )


# --------------------------------------------------------------------------------------------
# Models that cannot run channels-last


class ConvThenView(nn.Module):
    """Calls ``.view`` on a convolution output: fails on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 8))


def test_model_that_views_a_conv_output():
    """The engine runs convolutions channels-last on the CPU; a model that cannot take that
    layout is run again in the default one, from a clean layer tap."""
    torch.manual_seed(0)
    model = ConvThenView().double()
    x = randn(2, 3, 4, 4, seed=81)
    check_conductance(model, model.conv, x, target=1, n_steps=4)


def test_model_that_views_a_conv_output_neuron_gradient():
    """The neuron gradient stops at the layer, before the ``.view``: it works."""
    torch.manual_seed(0)
    model = ConvThenView().double()
    check_neuron_gradient(model, model.conv, randn(2, 3, 4, 4, seed=82), (1, 0, 1))


# --------------------------------------------------------------------------------------------
# Import isolation


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_explainer_never_imports_captum():
    result = _run_python(
        """
        import sys
        import explainer
        bad = sorted(m for m in sys.modules if m == "captum" or m.startswith("captum."))
        assert not bad, bad
        """
    )
    assert result.returncode == 0, result.stderr


def test_explainer_imports_with_streamlit_blocked():
    present = [m for m in EXPLAINER_MODULES if importlib.util.find_spec(f"explainer.{m}")]
    assert "attribution" in present
    result = _run_python(
        f"""
        import importlib, sys
        sys.modules["streamlit"] = None  # any "import streamlit" now raises ImportError
        import explainer
        for name in {present!r}:
            importlib.import_module("explainer." + name)
        bad = sorted(m for m in sys.modules if m.startswith(("captum", "streamlit."))
                     or (m == "streamlit" and sys.modules[m] is not None))
        assert not bad, bad
        """
    )
    assert result.returncode == 0, result.stderr
