"""Drop-in points: code written for Captum runs unchanged against the engine.

One test (or one small group) per point: the call signatures, ``grad_kwargs``, the
``multiplies_by_inputs`` / ``has_convergence_delta`` / ``get_name`` / ``interpolate`` members,
``internal_batch_size`` below the number of examples, and errors that Captum code catches as
``AssertionError``. Captum (a test-only dependency) is the reference wherever there is a
result to compare.
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")

from explainer import (  # noqa: E402
    AttributionError,
    AttributionTypeError,
    ExplainerError,
    LayerConductance,
    NeuronConductance,
    NeuronGradient,
)

OURS = {cls.__name__: cls for cls in (LayerConductance, NeuronGradient, NeuronConductance)}
CLASSES = tuple(OURS)


# --------------------------------------------------------------------------------------------
# helpers


def assert_matches(ours, ref) -> None:
    """``ours`` equals Captum's ``ref`` within 1e-4 of the largest reference value."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, type(ref)) and len(ours) == len(ref)
        for o, r in zip(ours, ref, strict=True):
            assert_matches(o, r)
        return
    assert isinstance(ours, Tensor)
    ref = ref.detach()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale + 1e-8)


def randn(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name!r} received a .grad"


def multi_input(discard_relu: bool = False) -> nn.Module:
    """Captum's three-input model. With ``discard_relu`` its inner model runs ``relu`` and
    throws the result away (``multi_input_module=True``): a layer that runs but that the
    output does not depend on."""
    model = basic_models.BasicModel_MultiLayer_MultiInput()
    if discard_relu:
        model.model = basic_models.BasicModel_MultiLayer(multi_input_module=True)
    return model.double().eval()


def three_inputs(n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Non-negative inputs, so that the model's ReLUs fire along most of the path."""
    return tuple(randn(n, 3, seed=seed + i).abs() * 3 for i in range(3))


# --------------------------------------------------------------------------------------------
# call signatures


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("member", ["__init__", "attribute"])
def test_signatures_take_captums_arguments_in_captums_order(name, member):
    """Every argument Captum takes, positionally or by name, with Captum's default; the
    engine's extensions are keyword-only and come after them."""

    def plain(cls) -> list[tuple[str, object]]:
        params = inspect.signature(getattr(cls, member)).parameters.values()
        return [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]

    ours = inspect.signature(getattr(OURS[name], member)).parameters.values()
    assert plain(OURS[name]) == plain(getattr(captum_attr, name))
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in ours), (
        "no *args or **kwargs that would swallow a misspelt argument"
    )


# --------------------------------------------------------------------------------------------
# multiplies_by_inputs, has_convergence_delta, get_name


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("LayerConductance", {}),
        ("NeuronGradient", {}),
        ("NeuronConductance", {}),
        ("NeuronConductance", {"multiply_by_inputs": True}),
        ("NeuronConductance", {"multiply_by_inputs": False}),
    ],
)
def test_properties_match_captum(name, kwargs):
    model = basic_models.BasicModel_MultiLayer().double()
    ours = OURS[name](model, model.linear1, **kwargs)
    ref = getattr(captum_attr, name)(model, model.linear1, **kwargs)
    assert ours.multiplies_by_inputs is ref.multiplies_by_inputs
    assert ours.has_convergence_delta() is ref.has_convergence_delta()
    assert ours.get_name() == ref.get_name() == OURS[name].get_name()
    assert OURS[name].get_name.__self__ is OURS[name], "get_name is a classmethod"


def test_property_values():
    """The values themselves, in case the reference ever changes under us."""
    model = basic_models.BasicModel_MultiLayer().double()
    assert LayerConductance(model, model.linear1).multiplies_by_inputs is True
    assert NeuronGradient(model, model.linear1).multiplies_by_inputs is False
    assert NeuronConductance(model, model.linear1).multiplies_by_inputs is True
    assert NeuronConductance(model, model.linear1, None, False).multiplies_by_inputs is False
    assert LayerConductance(model, model.linear1).has_convergence_delta() is True
    assert NeuronGradient(model, model.linear1).has_convergence_delta() is False
    assert NeuronConductance(model, model.linear1).has_convergence_delta() is False
    names = [cls.get_name() for cls in (LayerConductance, NeuronGradient, NeuronConductance)]
    assert names == ["Layer Conductance", "Neuron Gradient", "Neuron Conductance"]


# --------------------------------------------------------------------------------------------
# LayerConductance.interpolate


@pytest.mark.parametrize(
    "dims, mode",
    [(10, "nearest"), ((10, 10), "nearest"), ((10, 7), "bilinear"), ((1, 1), "area")],
)
def test_interpolate_matches_captum(dims, mode):
    """Resizing a convolution's conductance (to the input's size, as Captum's examples do, or
    down); a static method, callable on the class and on an instance."""
    torch.manual_seed(0)
    model = basic_models.BasicModel_ConvNet().double().eval()
    x = randn(2, 1, 10, 10, seed=1)
    lc = LayerConductance(model, model.conv2)
    attr = lc.attribute(x, target=3, n_steps=4)
    ref = captum_attr.LayerConductance.interpolate(attr, dims, mode)
    for fn in (LayerConductance.interpolate, lc.interpolate):
        ours = fn(attr, dims, mode)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    if mode == "nearest":  # the default mode
        torch.testing.assert_close(LayerConductance.interpolate(attr, dims), ref)


# --------------------------------------------------------------------------------------------
# grad_kwargs


def test_grad_kwargs_reach_torch_autograd_grad(monkeypatch):
    """The options are handed to ``torch.autograd.grad`` itself (for the gradient at the
    layer), next to the engine's own arguments."""
    seen: list[dict] = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_grad(*args, **kwargs)

    model = multi_input()
    xs = three_inputs()
    expected = LayerConductance(model, model.model.relu).attribute(
        xs[:2], additional_forward_args=(xs[2], 5), target=0, n_steps=5
    )
    monkeypatch.setattr(torch.autograd, "grad", spy)
    got = LayerConductance(model, model.model.relu).attribute(
        xs[:2],
        additional_forward_args=(xs[2], 5),
        target=0,
        n_steps=5,
        grad_kwargs={"materialize_grads": True, "retain_graph": True},
    )
    assert any(k.get("materialize_grads") is True and k.get("retain_graph") for k in seen), seen
    torch.testing.assert_close(got, expected)
    seen.clear()
    NeuronConductance(model, model.model.relu).attribute(
        xs[:2], 1, additional_forward_args=(xs[2], 5), target=0, n_steps=3,
        grad_kwargs={"materialize_grads": True},
    )  # fmt: skip
    assert any(k.get("materialize_grads") is True for k in seen), seen


def test_grad_kwargs_on_a_layer_used_by_the_output():
    """Captum's setup (three-input model, its ReLU, two inputs and ``(x3, 5)`` as extra
    arguments): with ``materialize_grads`` the result is the ordinary conductance."""
    model = multi_input()
    x1, x2, x3 = three_inputs(seed=10)
    kwargs = dict(
        additional_forward_args=(x3, 5), target=0, n_steps=40, return_convergence_delta=True
    )
    ours, delta = LayerConductance(model, model.model.relu).attribute(
        (x1, x2), grad_kwargs={"materialize_grads": True}, **kwargs
    )
    ref, ref_delta = captum_attr.LayerConductance(model, model.model.relu).attribute(
        (x1, x2), grad_kwargs={"materialize_grads": True}, **kwargs
    )
    ref = ref.detach()
    assert float(ref.abs().max()) > 1
    assert_matches(ours, ref)
    assert_matches(delta, ref_delta)
    assert float(delta.abs().max()) < 1e-2 * float(ref.abs().max())


def test_grad_kwargs_materialize_grads_on_a_layer_the_output_ignores():
    """A layer that runs but whose output is thrown away: with ``materialize_grads`` its
    conductance is zero and the delta is the whole output change.

    Captum 0.9's public ``attribute`` does not forward ``grad_kwargs`` (and then fails on the
    unused tensor), so the reference is its ``_attribute``, which does."""
    model = multi_input(discard_relu=True)
    x1, x2, x3 = three_inputs(seed=20)
    ours, delta = LayerConductance(model, model.model.relu).attribute(
        (x1, x2),
        additional_forward_args=(x3, 5),
        target=0,
        n_steps=8,
        grad_kwargs={"materialize_grads": True},
        return_convergence_delta=True,
    )
    ref = captum_attr.LayerConductance(model, model.model.relu)._attribute(
        inputs=(x1, x2),
        baselines=(0, 0),
        target=0,
        additional_forward_args=(x3, 5),
        n_steps=8,
        method="gausslegendre",
        grad_kwargs={"materialize_grads": True},
    )
    assert ours.shape == (2, 4)
    torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ours, torch.zeros_like(ours), rtol=0, atol=0)
    with torch.no_grad():
        change = (model(x1, x2, x3, 5) - model(0 * x1, 0 * x2, x3, 5))[:, 0]
    assert float(change.abs().max()) > 1
    torch.testing.assert_close(delta, -change)
    assert_no_hooks(model)


@pytest.mark.parametrize("cls", [LayerConductance, NeuronConductance])
@pytest.mark.parametrize(
    "grad_kwargs, error, words",
    [
        ({"outputs": None}, AttributionError, "outputs"),
        ({"inputs": None}, AttributionError, "inputs"),
        ({"grad_outputs": None}, AttributionError, "grad_outputs"),
        ({"only_inputs": True}, AttributionError, "only_inputs"),
        ({"is_grads_batched": True}, AttributionError, "is_grads_batched"),
        ({"retain_graph": True, "inputs": None}, AttributionError, "inputs"),
        ([("materialize_grads", True)], AttributionTypeError, "dict"),
        ("materialize_grads", AttributionTypeError, "dict"),
        ({1: True}, AttributionTypeError, "dict"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else repr(v),
)
def test_grad_kwargs_that_would_change_what_is_differentiated_are_refused(
    cls, grad_kwargs, error, words
):
    model = multi_input()
    xs = three_inputs()
    selector = (1,) if cls is NeuronConductance else ()
    with pytest.raises(error, match=words) as info:
        cls(model, model.model.linear1).attribute(
            xs, *selector, target=0, additional_forward_args=2, n_steps=3,
            grad_kwargs=grad_kwargs,
        )  # fmt: skip
    assert "grad_kwargs" in str(info.value)
    assert_no_hooks(model)


def test_grad_kwargs_errors_from_torch_leave_no_hooks():
    """What torch itself refuses (here allow_unused=False on the ignored layer) is its error
    to report; the hooks are gone all the same."""
    model = multi_input(discard_relu=True)
    x1, x2, x3 = three_inputs(seed=30)
    with pytest.raises(RuntimeError, match="not have been used"):
        LayerConductance(model, model.model.relu).attribute(
            (x1, x2), additional_forward_args=(x3, 5), target=0, n_steps=3,
            grad_kwargs={"allow_unused": False},
        )  # fmt: skip
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# internal_batch_size below the number of examples


def _warned(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The warnings about the batch size (Captum says "batch size", the engine names the
    argument)."""
    return [
        w
        for w in caught
        if issubclass(w.category, UserWarning)
        and ("batch size" in str(w.message).lower() or "internal_batch_size" in str(w.message))
    ]


def _run_recording(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, _warned(caught)


@pytest.mark.parametrize("ibs", [1, 2])
def test_small_internal_batch_size_warns_and_matches_captum_conductance(ibs):
    """Three examples, ``internal_batch_size`` 1 or 2: both warn and run one path point per
    pass; the results agree, and equal a size of exactly three."""
    torch.manual_seed(0)
    model = basic_models.BasicModel_ConvNet().double().eval()
    model.fc2.weight = nn.Parameter(torch.randn(10, 8, dtype=torch.float64))
    x = randn(3, 1, 10, 10, seed=40)
    kwargs = dict(target=[1, 4, 8], n_steps=6, return_convergence_delta=True)
    (ours, delta), ours_warned = _run_recording(
        lambda: LayerConductance(model, model.conv2).attribute(x, internal_batch_size=ibs, **kwargs)
    )
    (ref, ref_delta), ref_warned = _run_recording(
        lambda: captum_attr.LayerConductance(model, model.conv2).attribute(
            x, internal_batch_size=ibs, **kwargs
        )
    )
    assert ref_warned, "the reference warns (the premise of this test)"
    assert len(ours_warned) == 1
    assert "number of examples" in str(ours_warned[0].message)
    assert float(ref.detach().abs().max()) > 1e-6
    assert_matches(ours, ref)
    assert_matches(delta, ref_delta)
    exact, exact_warned = _run_recording(
        lambda: LayerConductance(model, model.conv2).attribute(x, internal_batch_size=3, **kwargs)
    )
    assert not exact_warned
    torch.testing.assert_close(ours, exact[0], rtol=1e-10, atol=1e-14)


def test_small_internal_batch_size_warns_and_matches_captum_neuron_conductance():
    model = multi_input()
    xs = three_inputs(n=4, seed=50)
    kwargs = dict(target=1, additional_forward_args=2, n_steps=5, internal_batch_size=3)
    ours, ours_warned = _run_recording(
        lambda: NeuronConductance(model, model.model.linear1).attribute(xs, 2, **kwargs)
    )
    ref, ref_warned = _run_recording(
        lambda: captum_attr.NeuronConductance(model, model.model.linear1).attribute(xs, 2, **kwargs)
    )
    assert ref_warned and len(ours_warned) == 1
    assert max(float(r.detach().abs().max()) for r in ref) > 1e-6
    assert_matches(ours, ref)


@pytest.mark.parametrize("cls", [LayerConductance, NeuronConductance])
@pytest.mark.parametrize(
    "ibs, error",
    [
        (0, AttributionError),
        (-1, AttributionError),
        (2.5, AttributionTypeError),
        (True, AttributionTypeError),
        ("4", AttributionTypeError),
    ],
)
def test_internal_batch_size_that_is_not_a_positive_int_is_refused(cls, ibs, error):
    model = basic_models.BasicModel_MultiLayer().double()
    selector = (1,) if cls is NeuronConductance else ()
    with pytest.raises(error, match="internal_batch_size"):
        cls(model, model.linear1).attribute(
            randn(2, 3), *selector, target=0, n_steps=3, internal_batch_size=ibs
        )
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# errors that Captum code catches as AssertionError


def test_attribution_errors_are_assertion_and_value_errors():
    assert issubclass(AttributionError, AssertionError)
    assert issubclass(AttributionError, ValueError)
    assert issubclass(AttributionError, ExplainerError)
    assert issubclass(AttributionTypeError, TypeError)
    assert issubclass(AttributionTypeError, ExplainerError)


def _caught_as_assertion(fn) -> AssertionError:
    """Run ``fn`` the way Captum-era code does: ``except AssertionError``."""
    try:
        fn()
    except AssertionError as err:
        return err
    raise pytest.fail.Exception("no AssertionError was raised")


@pytest.mark.parametrize("target", [2, -3, [0, 5], torch.tensor([1, 2])], ids=repr)
def test_out_of_range_target_is_an_assertion_error(target):
    model = basic_models.BasicModel_MultiLayer().double()
    x = randn(2, 3, seed=60)
    lc = LayerConductance(model, model.linear1)
    err = _caught_as_assertion(lambda: lc.attribute(x, target=target, n_steps=3))
    assert isinstance(err, ValueError) and "out of range" in str(err)
    assert_no_hooks(model)
    err = _caught_as_assertion(lambda: lc.compute_convergence_delta(randn(2, 4), 0, x, target))
    assert "out of range" in str(err)
    assert_no_hooks(model)


@pytest.mark.parametrize("name", ["NeuronGradient", "NeuronConductance"])
@pytest.mark.parametrize(
    "layer_name, selector",
    [("linear1", 4), ("linear1", -5), ("conv1", (0, 0, 8)), ("conv1", (2, 0, 0))],
    ids=repr,
)
def test_out_of_range_neuron_is_an_assertion_error(name, layer_name, selector):
    convnet = basic_models.BasicModel_ConvNet().double()
    model = convnet if layer_name == "conv1" else basic_models.BasicModel_MultiLayer().double()
    x = randn(2, 1, 10, 10) if layer_name == "conv1" else randn(2, 3)
    method = OURS[name](model, model.get_submodule(layer_name))
    extra = {"target": 0, "n_steps": 3} if name == "NeuronConductance" else {}
    err = _caught_as_assertion(lambda: method.attribute(x, selector, **extra))
    assert isinstance(err, ValueError)
    assert "out of range" in str(err) and repr(selector) in str(err)
    assert_no_hooks(model)
    # Also inside a list of selectors.
    _caught_as_assertion(lambda: method.attribute(x, [selector], **extra))
    assert_no_hooks(model)


def _mistakes():
    """Calls that Captum refuses with an AssertionError, as ``(name, model, call)``: ``call``
    takes the namespace of the classes (``captum.attr``, or the engine's)."""
    multi = basic_models.BasicModel_MultiLayer().double()
    tuple_layer = basic_models.BasicModel_MultiLayer(multi_input_module=True).double()
    conv = basic_models.BasicModel_ConvNet().double()
    x, xc = randn(3, 3, seed=61), randn(2, 1, 10, 10, seed=62)
    lin = multi.linear1
    return [
        ("target list too long", multi, lambda m: m.LayerConductance(multi, lin).attribute(
            x, target=[0, 1, 1, 0], n_steps=3)),
        ("target tuple on a 2-D output", multi, lambda m: m.LayerConductance(multi, lin).attribute(
            x, target=(0, 1), n_steps=3)),
        ("unknown method", multi, lambda m: m.LayerConductance(multi, lin).attribute(
            x, target=0, method="foo")),
        ("negative n_steps", multi, lambda m: m.LayerConductance(multi, lin).attribute(
            x, target=0, n_steps=-1)),
        ("baseline of the wrong shape", multi, lambda m: m.LayerConductance(multi, lin).attribute(
            x, baselines=torch.zeros(2, 3, dtype=torch.float64), target=0, n_steps=3)),
        ("selector too long (NG)", conv, lambda m: m.NeuronGradient(conv, conv.conv1).attribute(
            xc, (0, 0, 0, 0))),
        ("selector too long (NC)", conv, lambda m: m.NeuronConductance(
            conv, conv.conv1).attribute(xc, (0, 0, 0, 0), target=1, n_steps=3)),
        ("index on a tuple layer (NG)", tuple_layer, lambda m: m.NeuronGradient(
            tuple_layer, tuple_layer.multi_relu).attribute(x, 1)),
        ("index on a tuple layer (NC)", tuple_layer, lambda m: m.NeuronConductance(
            tuple_layer, tuple_layer.multi_relu).attribute(x, 1, target=0, n_steps=3)),
        ("riemann with one step (NC)", multi, lambda m: m.NeuronConductance(
            multi, lin).attribute(x, 1, target=0, n_steps=1)),
    ]  # fmt: skip


_Ours = SimpleNamespace(**OURS)  # the engine, addressed like the ``captum.attr`` module


@pytest.mark.parametrize("index", range(len(_mistakes())), ids=[m[0] for m in _mistakes()])
def test_where_captum_asserts_so_does_the_engine(index):
    """Captum refuses these with ``AssertionError``; the engine refuses them with an error
    that is one too, and that says what to change."""
    _, model, call = _mistakes()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AssertionError):
            call(captum_attr)
    assert_no_hooks(model)
    err = _caught_as_assertion(lambda: call(_Ours))
    assert isinstance(err, AttributionError) and len(str(err)) > 20
    assert_no_hooks(model)
