"""Layer outputs that are one tensor next to numbers: exported programs rebuilt by
``torch.export.unflatten`` return such lists from their submodules (the output tensor and the
sizes later parts of the graph read)."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torchvision
from torch import nn

from explainer import (
    AttributionTypeError,
    LayerConductance,
    NeuronConductance,
    NeuronGradient,
    get_module,
    load_model,
    module_tree,
)
from explainer.hooks import lone_tensor_index, with_tensor_at

LAYER = "encoder.layers.encoder_layer_0"


@functools.lru_cache(maxsize=1)
def _vit() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=5,
        )
        nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: no scores at all
        return vit.eval()


@functools.lru_cache(maxsize=1)
def _exported_vit() -> nn.Module:
    program = torch.export.export(
        _vit(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return load_model(buffer.getvalue(), filename="vit.pt2").model


@pytest.fixture
def images() -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torch.rand(2, 3, 32, 32)


def _raw_output(model: nn.Module, name: str, x: torch.Tensor):
    seen = []
    handle = get_module(model, name).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_exported_layer_returns_its_tensor_next_to_sizes(images):
    # What this file is about: if a later torch returns a plain tensor here, the tests below
    # no longer exercise anything, and this one says so.
    out = _raw_output(_exported_vit(), LAYER, images)
    assert isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor)
    lone = lone_tensor_index(out)
    assert lone is not None and tuple(out[lone].shape) == (2, 17, 32)


def test_the_layer_is_usable_with_the_shape_of_its_tensor(images):
    tree = module_tree(_exported_vit(), images[:1])
    node = tree[LAYER]
    assert node.usable, node.reason
    assert node.output_shapes == [(1, 17, 32)]
    assert LAYER in tree.usable_names()


def test_conductance_equals_the_eager_models(images):
    exported, eager = _exported_vit(), _vit()
    baseline = torch.zeros_like(images)
    got, got_delta = LayerConductance(exported, get_module(exported, LAYER)).attribute(
        images, baseline, target=3, n_steps=16, return_convergence_delta=True
    )
    want, want_delta = LayerConductance(eager, get_module(eager, LAYER)).attribute(
        images, baseline, target=3, n_steps=16, return_convergence_delta=True
    )
    assert isinstance(got, torch.Tensor) and got.shape == want.shape == (2, 17, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_delta, want_delta, rtol=0, atol=1e-5)
    assert float(got.abs().sum()) > 0
    assert _hook_count(exported) == 0


def test_neuron_methods_equal_the_eager_models(images):
    exported, eager = _exported_vit(), _vit()
    neuron = (0, 7)  # class token, feature 7
    got = NeuronGradient(exported, get_module(exported, LAYER)).attribute(images, neuron)
    want = NeuronGradient(eager, get_module(eager, LAYER)).attribute(images, neuron)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got = NeuronConductance(exported, get_module(exported, LAYER)).attribute(
        images, neuron, target=1, n_steps=8
    )
    want = NeuronConductance(eager, get_module(eager, LAYER)).attribute(
        images, neuron, target=1, n_steps=8
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert _hook_count(exported) == 0


class _Carrier(nn.Module):
    """Returns its tensor next to a size, like an unflattened submodule."""

    def __init__(self, extra_tensor: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.extra_tensor = extra_tensor

    def forward(self, x: torch.Tensor):
        y = self.linear(x)
        return (x.shape[0], y, y * 2) if self.extra_tensor else [x.shape[0], y, None]


class _Reader(nn.Module):
    def __init__(self, extra_tensor: bool = False) -> None:
        super().__init__()
        self.carrier = _Carrier(extra_tensor)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.carrier(x)
        assert out[0] == x.shape[0]  # the size still reaches the rest of the model
        return self.head(torch.relu(out[1]))


def test_the_numbers_next_to_the_tensor_pass_on_unchanged():
    torch.manual_seed(0)
    model = _Reader().double()
    x = torch.rand(4, 3, dtype=torch.float64)
    lc = LayerConductance(model, model.carrier)
    got = lc.attribute(x, target=1, n_steps=20, method="riemann_trapezoid")
    # Conductance of the carried tensor equals that of the layer that makes it.
    want = LayerConductance(model, model.carrier.linear).attribute(
        x, target=1, n_steps=20, method="riemann_trapezoid"
    )
    torch.testing.assert_close(got, want)
    assert _hook_count(model) == 0


def test_several_tensors_next_to_numbers_stay_unusable_and_say_why():
    model = _Reader(extra_tensor=True)
    node = module_tree(model, torch.rand(1, 3))["carrier"]
    assert not node.usable
    assert "tuple of 2 tensors next to int" in node.reason
    assert "sub-layers" in node.reason
    with pytest.raises(AttributionTypeError, match="tuple of Tensor, int"):
        LayerConductance(model, model.carrier).attribute(torch.rand(1, 3), target=0)


def test_lone_tensor_index_cases():
    t = torch.ones(2)
    assert lone_tensor_index(t) is None
    assert lone_tensor_index((t,)) is None  # a tuple of tensors keeps its tuple results
    assert lone_tensor_index((t, t)) is None
    assert lone_tensor_index([3, t]) == 1
    assert lone_tensor_index((t, None)) == 0
    assert lone_tensor_index((t, "text")) is None
    assert lone_tensor_index((t, {"a": 1})) is None
    assert lone_tensor_index([1, 2]) is None
    rebuilt = with_tensor_at((1, t, None), 1, t * 3)
    assert isinstance(rebuilt, tuple) and rebuilt[0] == 1 and rebuilt[2] is None
    assert torch.equal(rebuilt[1], t * 3)
