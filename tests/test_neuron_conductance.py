"""NeuronConductance against ``captum.attr.NeuronConductance``, the independent reference.

Every comparison runs the same call through :class:`explainer.NeuronConductance` and through
Captum (a test-only dependency) and requires agreement within 1e-4, relative to the largest
reference value, on the reference set of ``test_captum_reference.py``: Captum's own test models
and a randomly initialised torchvision ResNet-18, in float64 so that the tolerance measures the
engine and not rounding. Then the engine's own promises: lists of selectors, refusals with a
sentence (catchable as Captum's ``AssertionError``), no change to the model, progress reports
and passes split by the memory budget.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
torchvision_models = pytest.importorskip("torchvision.models")

from explainer import NeuronConductance  # noqa: E402
from explainer.errors import AttributionError, ExplainerError  # noqa: E402

# Captum warns for every callable selector and both warn for small internal batch sizes; the
# tests that are about a warning record it themselves.
pytestmark = pytest.mark.filterwarnings("ignore")

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
BUDGET = "EXPLAINER_MEMORY_BUDGET_MB"


# --------------------------------------------------------------------------------------------
# helpers


def assert_matches(ours, ref, *, nontrivial: bool = True) -> None:
    """``ours`` equals Captum's ``ref`` within 1e-4 of the largest reference value.

    ``nontrivial`` also requires the reference to be clearly non-zero, so that a comparison of
    two rounding-noise results cannot pass for agreement.
    """
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, type(ref)), f"expected a {type(ref).__name__}, got {type(ours)}"
        assert len(ours) == len(ref)
        if nontrivial:
            assert max(float(r.detach().abs().max()) for r in ref) > 1e-6, "a zero reference"
        for o, r in zip(ours, ref, strict=True):
            assert_matches(o, r, nontrivial=False)
        return
    assert isinstance(ours, Tensor), f"expected a tensor, got {type(ours).__name__}"
    ref = ref.detach()
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    assert not ours.requires_grad
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if nontrivial:
        assert scale > 1e-6, f"the reference is {scale:g} at most: the case tests nothing"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale + 1e-8)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def nc_pair(model, layer, inputs, selector, *, multiply_by_inputs: bool = True, **kwargs):
    """(ours, Captum's) neuron conductance for the same call."""
    ours = NeuronConductance(model, layer, multiply_by_inputs=multiply_by_inputs).attribute(
        inputs, selector, **kwargs
    )
    ref = captum_attr.NeuronConductance(
        model, layer, multiply_by_inputs=multiply_by_inputs
    ).attribute(inputs, selector, **kwargs)
    return ours, ref


def check_nc(model, layer, inputs, selector, *, nontrivial: bool = True, **kwargs) -> None:
    ours, ref = nc_pair(model, layer, inputs, selector, **kwargs)
    assert_matches(ours, ref, nontrivial=nontrivial)


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


def multi_input() -> nn.Module:
    return basic_models.BasicModel_MultiLayer_MultiInput().double().eval()


def make_convnet() -> nn.Module:
    """Captum's ConvNet with a random last layer. Its own ``fc2`` is all ones: every class then
    gets the same logit change, the softmax does not move, and the conductance of any neuron
    is rounding noise (about 1e-17) that would agree with anything."""
    torch.manual_seed(0)
    model = basic_models.BasicModel_ConvNet()
    model.fc2.weight = nn.Parameter(torch.randn(10, 8))
    return model.double().eval()


@pytest.fixture(scope="module")
def convnet() -> nn.Module:
    return make_convnet()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision_models.resnet18(num_classes=10).double().eval()


# --------------------------------------------------------------------------------------------
# targets

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


# Of linear2, both neurons: each one reaches only its own output, so one alone would have a
# zero conductance for half of the targets.
TARGET_LAYERS = {"linear0": 1, "linear1": 1, "relu": 2, "linear2": (slice(None),)}


@pytest.mark.parametrize("layer_name", list(TARGET_LAYERS))
@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_targets(case, layer_name):
    kind, target = TARGET_CASES[case]
    model = target_model(kind)
    inner = model if kind == "2d" else model.net
    x = randn(3, 3, seed=1) * 3
    selector = TARGET_LAYERS[layer_name]
    check_nc(model, inner.get_submodule(layer_name), x, selector, target=target, n_steps=9)


def test_target_tuple_on_4d_output_with_non_tensor_args():
    model = multilayer()
    x = randn(2, 3, seed=2) * 2
    # (add_input=None, multidim_output=True): neither is a tensor, both pass through unchanged.
    check_nc(
        model,
        model.linear1,
        x,
        2,
        target=(1, 0, 1),
        additional_forward_args=(None, True),
        n_steps=6,
    )


# --------------------------------------------------------------------------------------------
# baselines and inputs

SINGLE_BASELINES = {
    "none": lambda x: None,
    "float": lambda x: 0.25,
    "int": lambda x: -1,
    "full-tensor": lambda x: randn(*x.shape, seed=5),
    "batch-1-tensor": lambda x: randn(1, *x.shape[1:], seed=6),
}


@pytest.mark.parametrize("baseline", list(SINGLE_BASELINES))
@pytest.mark.parametrize("layer_name, selector", [("linear1", 3), ("relu", (slice(1, 4),))])
def test_baselines_single_input(baseline, layer_name, selector):
    model = multilayer()
    x = randn(2, 3, seed=3) * 3
    check_nc(
        model,
        model.get_submodule(layer_name),
        x,
        selector,
        baselines=SINGLE_BASELINES[baseline](x),
        target=[0, 1],
        n_steps=8,
    )


TUPLE_BASELINES = {
    "none": lambda xs: None,
    "scalars": lambda xs: (0.5, -1, 0),
    "full-tensors": lambda xs: tuple(randn(*x.shape, seed=10 + i) for i, x in enumerate(xs)),
    "mixed": lambda xs: (0.3, randn(*xs[1].shape, seed=7), randn(1, *xs[2].shape[1:], seed=8)),
}


@pytest.mark.parametrize("baseline", list(TUPLE_BASELINES))
@pytest.mark.parametrize("layer_name", ["model.linear0", "model.linear1"])
def test_tuple_inputs_and_baselines(baseline, layer_name):
    model = multi_input()
    # Shifted up so that the ReLUs fire along the path from every baseline.
    xs = tuple(randn(3, 3, seed=20 + i) + 1 for i in range(3))
    # `scale` is an int extra argument: passed to every forward call as it is.
    ours, ref = nc_pair(
        model,
        model.get_submodule(layer_name),
        xs,
        1,
        baselines=TUPLE_BASELINES[baseline](xs),
        target=1,
        additional_forward_args=2,
        n_steps=7,
    )
    assert isinstance(ours, tuple) and len(ours) == 3
    assert_matches(ours, ref)


@pytest.mark.parametrize("baseline", ["none", "mixed"])
def test_multiply_by_inputs_false(baseline):
    """Without the multiplier the result is the integrated gradient product alone; it still
    matches the reference, and differs from the multiplied one by exactly input - baseline."""
    model = multi_input()
    xs = tuple(randn(2, 3, seed=25 + i) * 2 for i in range(3))
    bases = TUPLE_BASELINES[baseline](xs)
    kwargs = dict(baselines=bases, target=0, additional_forward_args=3, n_steps=6)
    layer = model.model.linear1
    nc = NeuronConductance(model, layer, multiply_by_inputs=False)
    assert nc.multiplies_by_inputs is False
    ours, ref = nc_pair(model, layer, xs, 2, multiply_by_inputs=False, **kwargs)
    assert_matches(ours, ref)
    multiplied = NeuronConductance(model, layer).attribute(xs, 2, **kwargs)
    starts = bases if bases is not None else (0, 0, 0)
    for local, glob, x, b in zip(ours, multiplied, xs, starts, strict=True):
        torch.testing.assert_close(local * (x - b), glob)


def test_multiply_by_inputs_false_convnet(convnet):
    x = randn(2, 1, 10, 10, seed=26)
    check_nc(
        convnet,
        convnet.conv2,
        x,
        (1, 1, 0),
        multiply_by_inputs=False,
        target=[3, 5],
        n_steps=5,
        baselines=randn(1, 1, 10, 10, seed=27),
        method="gausslegendre",
    )


# --------------------------------------------------------------------------------------------
# integration methods and internal batching


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("internal_batch_size", [None, 1, 2, 3, 4, 6, 10, 14, 100])
def test_methods_and_internal_batch_size(convnet, method, internal_batch_size):
    """7 path points for 2 examples: 1, 2, 3, 5 or all points per pass; a size of 1 is below
    the number of examples and is raised to it with a warning, as Captum does."""
    x = randn(2, 1, 10, 10, seed=4)
    kwargs = dict(target=3, n_steps=7, method=method)
    nc = NeuronConductance(convnet, convnet.conv2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = nc.attribute(x, (1, 0, 1), internal_batch_size=internal_batch_size, **kwargs)
    ours_warned = [w for w in caught if "internal_batch_size" in str(w.message)]
    if internal_batch_size == 1:
        assert len(ours_warned) == 1 and issubclass(ours_warned[0].category, UserWarning)
        assert "number of examples" in str(ours_warned[0].message)
    else:
        assert not ours_warned
    ref = captum_attr.NeuronConductance(convnet, convnet.conv2).attribute(
        x, (1, 0, 1), internal_batch_size=internal_batch_size, **kwargs
    )
    assert_matches(ours, ref)
    unchunked = nc.attribute(x, (1, 0, 1), **kwargs)
    scale = float(unchunked.abs().max())
    torch.testing.assert_close(ours, unchunked, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("method", METHODS)
def test_methods_with_tensor_args_and_batching(method):
    model = multilayer()
    x, add = randn(3, 3, seed=28) * 2, randn(3, 3, seed=29)
    check_nc(
        model,
        model.relu,
        x,
        1,
        target=[1, 0, 1],
        additional_forward_args=add,
        n_steps=5,
        method=method,
        internal_batch_size=7,
    )


def test_one_gauss_legendre_point_matches_the_reference(convnet):
    """Gauss-Legendre has a one-point rule (the midpoint, weight 1); the Riemann rules need
    two points, as in the reference."""
    x = randn(2, 1, 10, 10, seed=30)
    check_nc(convnet, convnet.conv2, x, (1, 1, 0), target=1, n_steps=1, method="gausslegendre")
    for method in METHODS[:4]:
        with pytest.raises(AttributionError, match="n_steps"):
            NeuronConductance(convnet, convnet.conv2).attribute(
                x, (1, 1, 0), target=1, n_steps=1, method=method
            )
        with pytest.raises(AssertionError):  # Captum refuses it too
            captum_attr.NeuronConductance(convnet, convnet.conv2).attribute(
                x, (1, 1, 0), target=1, n_steps=1, method=method
            )


# --------------------------------------------------------------------------------------------
# additional forward arguments


def test_tensor_additional_arg_is_expanded_along_the_path():
    model = multilayer()
    x, add = randn(3, 3, seed=11), randn(3, 3, seed=12) * 2
    for layer, selector in ((model.linear0, 1), (model.linear1, 2), (model.relu, 3)):
        check_nc(
            model,
            layer,
            x,
            selector,
            target=[1, 0, 0],
            additional_forward_args=add,
            n_steps=6,
            internal_batch_size=9,
        )


def test_tensor_and_non_tensor_additional_args_together():
    model = multilayer()
    x, add = randn(2, 3, seed=13), randn(2, 3, seed=14)
    check_nc(
        model,
        model.linear1,
        x,
        1,
        target=[(0, 1, 1), (1, 0, 0)],
        additional_forward_args=(add, True),
        n_steps=5,
        method="riemann_middle",
    )


def test_convnet_with_tensor_additional_input():
    model = basic_models.BasicModel_ConvNet_One_Conv().double().eval()
    # Positive, so that the sums over the ones kernel clear the biases of -50 and -75.
    x, x2 = randn(2, 1, 4, 4, seed=15).abs() * 10, randn(2, 1, 4, 4, seed=16).abs() * 10
    for layer, selector in ((model.conv1, (1, 0, 1)), (model.relu1, (0, 1, 1)), (model.fc1, 2)):
        check_nc(
            model,
            layer,
            x,
            selector,
            target=2,
            additional_forward_args=x2,
            n_steps=6,
            baselines=randn(1, 1, 4, 4, seed=17),
        )


# --------------------------------------------------------------------------------------------
# selectors


@pytest.mark.parametrize(
    "layer_name, selector",
    [
        ("fc1", 3),
        ("fc2", -1),
        ("fc1", (5,)),
        ("conv1", (0, 2, 3)),
        ("conv2", (3, 1, 1)),
        ("conv1", (slice(0, 2), slice(1, 4), 2)),
        ("conv1", (0, slice(None), slice(None))),
        ("pool1", (slice(None), 1, slice(0, 3))),
        ("fc1", (slice(2, 6),)),
        ("conv2", (-3, -1, -2)),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_index_selectors(convnet, layer_name, selector):
    x = randn(2, 1, 10, 10, seed=60)
    check_nc(convnet, convnet.get_submodule(layer_name), x, selector, target=[2, 7], n_steps=6)


@pytest.mark.parametrize(
    "selector",
    [
        lambda t: t[:, 0, 2, 2],  # one neuron per example, as Captum asks
        lambda t: t[:, 0, 1, 1] - t[:, 0, 3, 0],  # linear: Captum applies it to the gradient too
        lambda t: t[:, 0, 0, 2] * t[:, 0, 2, 2],  # not linear, still computed as Captum does
    ],
    ids=["one-neuron", "difference", "product"],
)
def test_callable_selectors(convnet, selector):
    x = randn(2, 1, 10, 10, seed=61)
    check_nc(convnet, convnet.conv1, x, selector, target=4, n_steps=5)


@pytest.mark.parametrize(
    "layer_name, selector",
    [("conv2", (1, 0, 1)), ("fc1", 2), ("relu3", (slice(0, 4),)), ("softmax", 9)],
)
def test_attribute_to_neuron_input(convnet, layer_name, selector):
    x = randn(2, 1, 10, 10, seed=62)
    check_nc(
        convnet,
        convnet.get_submodule(layer_name),
        x,
        selector,
        target=[0, 9],
        n_steps=5,
        attribute_to_neuron_input=True,
    )


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left"])
def test_tuple_layer_with_callable(to_input, method):
    """MultiRelu takes and returns two tensors: the callable selector receives the tuple."""
    model = multilayer(multi_input_module=True)
    x = randn(3, 3, seed=70) * 3
    check_nc(
        model,
        model.multi_relu,
        x,
        lambda t: t[0][:, 1] + 2 * t[1][:, 3],
        target=[0, 1, 1],
        n_steps=8,
        method=method,
        attribute_to_neuron_input=to_input,
        internal_batch_size=7,
    )


def test_index_selector_on_a_tuple_layer_is_refused_like_captum():
    model = multilayer(multi_input_module=True)
    x = randn(3, 3, seed=71)
    with pytest.raises(AttributionError, match="callable"):
        NeuronConductance(model, model.multi_relu).attribute(x, 1, target=0, n_steps=4)
    with pytest.raises(AssertionError):
        captum_attr.NeuronConductance(model, model.multi_relu).attribute(x, 1, target=0, n_steps=4)


# --------------------------------------------------------------------------------------------
# lists of selectors (an extension: one forward pass along the path serves them all)


def test_selector_list_equals_single_reference_calls(convnet):
    x = randn(2, 1, 10, 10, seed=72)
    selectors = [
        (0, 2, 1),
        (slice(0, 2), 4, slice(None)),
        lambda t: t[:, 0, 3, 3],
        (1, 0, 0),  # channel 1 never fires for these inputs: an all-zero map, as in Captum
        (0, 2, 1),  # a repeat gets its own, equal, map
    ]
    kwargs = dict(target=[6, 1], n_steps=6, method="riemann_middle", internal_batch_size=6)
    ours = NeuronConductance(convnet, convnet.conv1).attribute(x, selectors, **kwargs)
    assert ours.shape == (len(selectors), *x.shape)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronConductance(convnet, convnet.conv1).attribute(x, selector, **kwargs)
        assert_matches(ours[i], ref, nontrivial=i != 3)
    torch.testing.assert_close(ours[0], ours[4], rtol=0, atol=0)


def test_selector_list_of_one_keeps_the_leading_dimension(convnet):
    x = randn(2, 1, 10, 10, seed=73)
    ours = NeuronConductance(convnet, convnet.fc1).attribute(x, [4], target=2, n_steps=4)
    assert ours.shape == (1, *x.shape)
    ref = captum_attr.NeuronConductance(convnet, convnet.fc1).attribute(x, 4, target=2, n_steps=4)
    assert_matches(ours[0], ref)


@pytest.mark.parametrize("multiply", [True, False])
def test_selector_list_tuple_inputs(multiply):
    model = multi_input()
    xs = tuple(randn(2, 3, seed=74 + i) for i in range(3))
    selectors = [1, 3, lambda t: t[:, 1] + 2 * t[:, 3]]
    kwargs = dict(target=1, additional_forward_args=2, baselines=(0.1, -0.2, 0), n_steps=5)
    layer = model.model.linear1
    ours = NeuronConductance(model, layer, multiply_by_inputs=multiply).attribute(
        xs, selectors, **kwargs
    )
    assert isinstance(ours, tuple) and all(o.shape == (3, 2, 3) for o in ours)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronConductance(model, layer, multiply_by_inputs=multiply).attribute(
            xs, selector, **kwargs
        )
        assert_matches(tuple(o[i] for o in ours), ref)


# --------------------------------------------------------------------------------------------
# ResNet-18


def test_resnet_layers_float64(resnet):
    x = randn(2, 3, 32, 32, seed=50)
    kwargs = dict(target=[3, 8], n_steps=2)
    check_nc(resnet, resnet.layer1[0].conv1, x, (6, 3, 3), **kwargs)
    check_nc(resnet, resnet.layer2, x, (slice(0, 8), 1, slice(None)), **kwargs)
    check_nc(resnet, resnet.layer3[1].bn2, x, lambda t: t[:, 7, 1, 0], **kwargs)
    check_nc(resnet, resnet.fc, x, 17, attribute_to_neuron_input=True, **kwargs)


def test_resnet_selector_list_chunked_float64(resnet):
    x = randn(1, 3, 32, 32, seed=51)
    selectors = [(5, 1, 2), (slice(0, 8), slice(None), 0), lambda t: t[:, 5, 2, 2]]
    kwargs = dict(target=7, n_steps=4, method="gausslegendre", internal_batch_size=2)
    ours = NeuronConductance(resnet, resnet.layer2[0].conv2).attribute(x, selectors, **kwargs)
    for i, selector in enumerate(selectors):
        ref = captum_attr.NeuronConductance(resnet, resnet.layer2[0].conv2).attribute(
            x, selector, **kwargs
        )
        assert_matches(ours[i], ref)


def test_resnet_float32():
    torch.manual_seed(1)
    model = torchvision_models.resnet18(num_classes=10).float().eval()
    x = randn(2, 3, 32, 32, seed=52, dtype=torch.float32)
    ours, ref = nc_pair(model, model.layer1[1].conv2, x, (3, 4, 4), target=[0, 9], n_steps=4)
    assert ours.dtype == torch.float32
    ref = ref.detach()
    assert float(ref.abs().max()) > 0
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 1e-4


# --------------------------------------------------------------------------------------------
# models that need the engine's slower paths


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


@pytest.mark.parametrize(
    "layer_name, to_input, selector",
    [("lin1", True, 1), ("lin1", False, 0), ("ident", False, 2), ("ident", True, 0)],
)
def test_tensor_used_before_the_layer_runs(layer_name, to_input, selector):
    torch.manual_seed(0)
    model = EarlyUse().double()
    x = randn(2, 3, seed=80)
    check_nc(
        model,
        model.get_submodule(layer_name),
        x,
        selector,
        target=0,
        n_steps=10,
        attribute_to_neuron_input=to_input,
    )


class ConvThenView(nn.Module):
    """Calls ``.view`` on a convolution output: fails on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 8))


def test_model_that_views_a_conv_output():
    """The engine runs convolutions channels-last on the CPU and falls back to the default
    layout for a model that cannot take it."""
    torch.manual_seed(0)
    model = ConvThenView().double()
    x = randn(2, 3, 4, 4, seed=81)
    check_nc(model, model.conv, x, (1, 0, 1), target=1, n_steps=4)
    check_nc(model, model.fc, x, 2, target=2, n_steps=4)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    "layer_name, selector",
    [("linear1", 9), ("linear1", -5), ("linear1", (4,)), ("linear2", (0, 2))],
    ids=["int", "negative", "tuple", "too-long"],
)
def test_bad_neuron_is_an_assertion_and_a_value_error(layer_name, selector):
    """Code written for Captum catches ``AssertionError``; new code may catch ``ValueError``.
    The message names the selector and the layer's neuron shape."""
    model = multilayer()
    layer = model.get_submodule(layer_name)
    x = randn(2, 3, seed=80)
    for kind in (AssertionError, ValueError, ExplainerError):
        with pytest.raises(kind) as info:
            NeuronConductance(model, layer).attribute(x, selector, target=0, n_steps=4)
        text = str(info.value)
        assert repr(selector) in text and f"'{layer_name}'" in text
        assert "out of range" in text or "index(es)" in text


def test_a_bad_selector_inside_a_list_is_refused():
    model = multilayer()
    x = randn(2, 3, seed=81)
    with pytest.raises(AssertionError, match="out of range"):
        NeuronConductance(model, model.linear1).attribute(x, [0, 1, 7], target=0, n_steps=4)


def test_empty_selector_list_is_refused():
    model = multilayer()
    with pytest.raises(AttributionError, match="empty list"):
        NeuronConductance(model, model.linear1).attribute(randn(2, 3), [], target=0)


@pytest.mark.parametrize("n_steps", [0, -1, 2.5, True, "3", None])
def test_invalid_n_steps_is_refused(n_steps):
    model = multilayer()
    with pytest.raises(ExplainerError, match="n_steps"):
        NeuronConductance(model, model.linear1).attribute(randn(2, 3), 1, target=0, n_steps=n_steps)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="riemann"), "method"),
        (dict(internal_batch_size=0), "internal_batch_size"),
        (dict(internal_batch_size=-3), "internal_batch_size"),
        (dict(internal_batch_size=2.5), "internal_batch_size"),
        (dict(internal_batch_size=True), "internal_batch_size"),
        (dict(target=7), "out of range"),
        (dict(baselines=torch.zeros(3, 3, dtype=torch.float64)), "aseline"),
        (dict(grad_kwargs={"inputs": None}), "grad_kwargs"),
        (dict(grad_kwargs=[("materialize_grads", True)]), "grad_kwargs"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_invalid_arguments_are_refused_with_a_sentence(kwargs, match):
    model = multilayer()
    kwargs = {"target": 0, "n_steps": 4, **kwargs}
    with pytest.raises(ExplainerError, match=match):
        NeuronConductance(model, model.linear1).attribute(randn(2, 3), 1, **kwargs)


def test_callable_selector_must_give_one_value_per_example():
    model = multilayer()
    with pytest.raises(AttributionError, match="one value per example"):
        NeuronConductance(model, model.linear1).attribute(
            randn(2, 3), lambda t: t.sum(), target=0, n_steps=4
        )


# --------------------------------------------------------------------------------------------
# the model is left as it was found


def model_state(model: nn.Module) -> dict:
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
        assert not module._backward_pre_hooks, f"backward pre-hook left on {name!r}"
        assert module.training == before["modes"][name], f"training mode of {name!r} changed"
    for name, p in model.named_parameters():
        assert p.requires_grad == before["flags"][name], f"requires_grad of {name!r} changed"
        assert p.grad is None, f"{name!r} received a .grad"
        assert torch.equal(p.detach(), before["params"][name]), f"{name!r} was modified"


class Failing:
    """A selector that raises, as a user's buggy callable would."""

    def __call__(self, t: Tensor) -> Tensor:
        raise RuntimeError("selector failed")


def test_model_unchanged_after_success_and_after_errors():
    model = basic_models.BasicModel_ConvNet().double()
    model.train()  # training mode must survive (the model has no dropout or batch norm)
    model.conv2.eval()
    model.fc1.weight.requires_grad_(False)
    x = randn(2, 1, 10, 10, seed=90).requires_grad_(True)
    x_before = x.detach().clone()
    before = model_state(model)
    nc = NeuronConductance(model, model.conv2)
    result = nc.attribute(x, [(1, 0, 1), (0, 1, 1)], target=3, n_steps=4, internal_batch_size=4)
    assert not result.requires_grad
    assert_untouched(model, before)
    calls = [
        lambda: nc.attribute(x, (9, 0, 0), target=3, n_steps=4),  # neuron out of range
        lambda: nc.attribute(x, (1, 0, 1), target=10, n_steps=4),  # target out of range
        lambda: nc.attribute(x, [(1, 0, 1), (0, 0)], target=3, n_steps=4),  # too short
        lambda: nc.attribute(x, Failing(), target=3, n_steps=4),  # the user's selector raises
        lambda: nc.attribute(x, (1, 0, 1), target=3, grad_kwargs={"inputs": x}),
    ]
    for call in calls:
        with pytest.raises((ExplainerError, RuntimeError)):
            call()
        assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="selector failed"):  # the user's error, unchanged
        nc.attribute(x, Failing(), target=3, n_steps=4)
    assert x.requires_grad and torch.equal(x.detach(), x_before)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"]
)
def test_callers_without_grad(ctx):
    """Like the other methods, the call works inside the caller's no-grad block, gives the
    same result, and leaves the block's grad mode as it was."""
    model = multilayer()
    x = randn(2, 3, seed=91)
    expected = NeuronConductance(model, model.linear1).attribute(x, [1, 2], target=0, n_steps=5)
    with ctx():
        got = NeuronConductance(model, model.linear1).attribute(x, [1, 2], target=0, n_steps=5)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------------
# progress and the memory budget


@pytest.mark.parametrize("internal_batch_size", [None, 2, 6, 7])
def test_progress_is_monotone_and_ends_at_the_total(convnet, internal_batch_size):
    x = randn(2, 1, 10, 10, seed=92)
    calls: list[tuple[int, int]] = []
    NeuronConductance(convnet, convnet.conv2).attribute(
        x,
        [(1, 0, 1), (2, 1, 0)],
        target=3,
        n_steps=10,
        internal_batch_size=internal_batch_size,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls, "progress was never reported"
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {10}, "the total is the number of path points"
    assert all(b > a for a, b in zip([0, *done], done, strict=False)), done
    assert done[-1] == 10
    if internal_batch_size is not None:
        per_pass = max(1, internal_batch_size // 2)
        steps = [b - a for a, b in zip([0, *done], done, strict=False)]
        assert max(steps) <= per_pass, steps
        assert len(done) >= -(-10 // per_pass)


def wide_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def test_memory_budget_splits_passes_without_changing_the_result(monkeypatch):
    model = wide_model()
    x = randn(2, 3, 24, 24, seed=93)
    base = randn(1, 3, 24, 24, seed=94)
    selectors = [(1, 3, 3), (0, slice(2, 6), 5)]
    nc = NeuronConductance(model, model[2])
    kwargs = dict(baselines=base, target=[0, 2], n_steps=20)
    monkeypatch.delenv(BUDGET, raising=False)
    full_calls: list[int] = []
    full = nc.attribute(x, selectors, progress=lambda d, t: full_calls.append(d), **kwargs)
    monkeypatch.setenv(BUDGET, "8")
    split_calls: list[int] = []
    split = nc.attribute(x, selectors, progress=lambda d, t: split_calls.append(d), **kwargs)
    # After at most two metered one-point passes, the rest no longer fits in one pass.
    assert len(split_calls) >= 4 and len(full_calls) <= 3, (split_calls, full_calls)
    assert split_calls[-1] == full_calls[-1] == 20
    scale = float(full.abs().max())
    assert scale > 0
    torch.testing.assert_close(split, full, rtol=1e-9, atol=1e-12 * scale)


def test_a_pass_that_cannot_fit_the_budget_is_refused(monkeypatch):
    model = wide_model()
    x = randn(2, 3, 24, 24, seed=95)
    before = model_state(model)
    monkeypatch.setenv(BUDGET, "0.05")
    with pytest.raises(AttributionError, match="neuron conductance.*EXPLAINER_MEMORY_BUDGET_MB"):
        NeuronConductance(model, model[2]).attribute(x, (1, 3, 3), target=0, n_steps=10)
    assert_untouched(model, before)
