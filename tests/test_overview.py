"""The layer overview (explainer.overview) and the randomised copy (explainer.randomise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_analysis import checked
from torch import nn

from explainer import LayerConductance
from explainer.compute import wire
from explainer.compute.tasks import result_fits
from explainer.errors import AttributionError
from explainer.overview import (
    LayerOverview,
    LayerSummary,
    layer_overview,
    overview_layers,
    summarise,
)
from explainer.randomise import randomised_copy
from explainer.tree import module_tree


def chain() -> nn.Module:
    """A plain chain: every path from the input to the output crosses every layer."""
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("act1", nn.Tanh())
    model.add_module("drop", nn.Dropout(0.5))
    model.add_module("conv2", nn.Conv2d(4, 6, 3, stride=2, padding=1))
    model.add_module("act2", nn.Softplus())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(6, 3))
    return model.double().eval()


class TwoBranches(nn.Module):
    """Two parallel branches added together: together they carry the whole output change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.left = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
        self.right = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.left(x) + self.right(x))


def image(seed: int = 0, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------- the numbers


def test_totals_equal_one_conductance_call_per_layer():
    model = chain()
    x, baseline = image(), torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    names = ["conv1", "act1", "conv2", "act2", "pool"]
    overview = checked(
        layer_overview, model, names, x, 1, baseline, method="riemann_trapezoid", n_steps=24
    )
    assert [s.layer for s in overview.layers] == names
    with torch.no_grad():
        diff = float(model(x)[0, 1] - model(baseline)[0, 1])
    assert overview.output_diff == pytest.approx(diff, rel=1e-12)
    for summary in overview.layers:
        alone = LayerConductance(model, model.get_submodule(summary.layer)).attribute(
            x, baselines=baseline, target=1, n_steps=24, method="riemann_trapezoid"
        )[0]
        totals = alone.reshape(alone.shape[0], -1).sum(dim=1).numpy()
        assert summary.total == pytest.approx(float(alone.sum()), rel=1e-6, abs=1e-9)
        assert summary.shape == tuple(alone.shape)
        assert summary.positive == pytest.approx(float(alone.clamp(min=0).sum()), rel=1e-6)
        assert summary.negative == pytest.approx(float(alone.clamp(max=0).sum()), rel=1e-6)
        assert summary.share == pytest.approx(summary.total / diff, rel=1e-12)
        assert summary.delta == pytest.approx(summary.total - diff, abs=1e-9)
        assert summary.relative_delta == pytest.approx(abs(summary.total - diff) / abs(diff))
        # The strongest channels by |total|, in that order, and the share of |conductance|
        # they hold.
        order = np.argsort(-np.abs(totals), kind="stable")[:5]
        assert summary.top_channels == tuple(int(c) for c in order)
        np.testing.assert_allclose(summary.top_values, totals[order], rtol=1e-5, atol=1e-9)
        assert summary.channels == totals.size
        assert summary.concentration == pytest.approx(
            np.abs(totals[order]).sum() / np.abs(totals).sum(), rel=1e-5
        )


def test_every_layer_of_a_chain_carries_the_whole_difference():
    model = chain()
    x, baseline = image(1), torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    names = ["conv1", "act1", "conv2", "act2", "pool", "fc"]
    coarse, fine = (
        checked(layer_overview, model, names, x, 0, baseline, method="riemann_trapezoid", n_steps=n)
        for n in (32, 256)
    )
    for rough, summary in zip(coarse.layers, fine.layers, strict=True):
        # A layer's share misses 1 by exactly its relative delta ...
        assert abs(summary.share - 1.0) == pytest.approx(summary.relative_delta, abs=1e-12)
        # ... which more steps shrink: completeness holds, so every layer carries it all.
        assert summary.relative_delta < 5e-3, summary.layer
        assert summary.relative_delta <= rough.relative_delta
        assert summary.share == pytest.approx(1.0, abs=5e-3), summary.layer
        assert summary.positive + summary.negative == pytest.approx(summary.total, rel=1e-5)
    # Layers after the last nonlinearity are exact at any step count; the output layer's
    # conductance all sits in the target unit.
    assert [s.relative_delta for s in coarse.layers[3:]] == pytest.approx([0, 0, 0], abs=1e-12)
    fc = fine.layers[-1]
    assert fc.top_channels[0] == 0 and fc.concentration == pytest.approx(1.0)


def test_parallel_branches_share_the_difference():
    model = TwoBranches().double().eval()
    x, baseline = image(2, size=8), torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    overview = checked(layer_overview, model, ["left", "right"], x, 1, baseline, n_steps=64)
    left, right = overview.layers
    # Neither branch carries everything, the two together do.
    assert not math.isclose(left.share, 1.0, abs_tol=0.05)
    assert not math.isclose(right.share, 1.0, abs_tol=0.05)
    assert left.share + right.share == pytest.approx(1.0, abs=1e-4)


def test_summary_of_a_zero_difference_has_no_share():
    model = chain()
    x = image()
    overview = layer_overview(model, ["conv1"], x, 0, x.clone())
    assert overview.output_diff == 0.0
    assert math.isnan(overview.layers[0].share)
    assert overview.layers[0].concentration == 0.0 and not overview.layers[0].layer_moves


def test_overview_rejects_unknown_layers_and_leaves_no_hooks():
    model = chain()
    with pytest.raises(AttributionError, match="conv3"):
        checked(layer_overview, model, ["conv1", "conv3"], image(), 0, torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------- the layers


def test_layers_are_the_usable_ones_in_network_order_without_pass_throughs_or_head():
    model = chain()
    tree = module_tree(model, image())
    names, rule = overview_layers(tree)
    # Dropout hands its input on; flat is (N, F) like fc but fc computes the output itself.
    assert names == ["conv1", "act1", "conv2", "act2", "pool", "flat"]
    assert "All 6 usable layers" in rule


def test_a_block_is_shown_instead_of_its_last_step():
    model = TwoBranches()
    tree = module_tree(model, torch.zeros(1, 3, 8, 8))
    names, _ = overview_layers(tree)
    # left.1 (Tanh) returns what 'left' returns; the head's last step is the model's output.
    assert "left.1" not in names and "left" in names
    assert "right.1" not in names and "right" in names
    assert "left.0" in names
    assert names.index("left.0") < names.index("left")


def test_big_models_keep_the_outer_levels_and_the_suggested_layers():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    tree = module_tree(model, torch.zeros(1, 3, 64, 64))
    names, rule = overview_layers(tree, max_layers=24)
    assert names == [
        "conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1", "layer2.0", "layer2",
        "layer3.0", "layer3", "layer4.0", "layer4", "avgpool",
    ]  # fmt: skip
    assert set(tree.suggested) <= set(names)
    assert "13 of 43" in rule and "level 2" in rule
    small, rule = overview_layers(tree, max_layers=6)
    assert len(small) == 6
    assert set(tree.suggested) & set(names) <= set(small) or len(tree.suggested) > 6
    order = [tree.execution_order.index(n) for n in small]
    assert order == sorted(order)
    assert "taken evenly" in rule


def test_no_usable_layer_is_a_clear_error():
    class Ints(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.long()

    model = nn.Sequential(Ints())
    tree = module_tree(model, torch.zeros(1, 3, 4, 4))
    with pytest.raises(AttributionError, match="no layer the overview can show"):
        overview_layers(tree)


# ----------------------------------------------------------------------------- the wire


def test_an_overview_crosses_the_wire_and_is_checked():
    model = chain()
    overview = layer_overview(model, ["conv1", "fc"], image(), 2, torch.zeros(1, 3, 16, 16))
    back = wire.decode(wire.encode(overview))
    assert isinstance(back, LayerOverview) and result_fits("layer_overview", back)
    assert all(isinstance(s, LayerSummary) for s in back.layers)
    assert back.layers[0] == overview.layers[0] and back.layers[0].shape == (4, 16, 16)
    assert not result_fits("layer_overview", back.layers)
    forged = LayerOverview(back.target, back.output_diff, back.method, back.n_steps, [{"a": 1}])
    assert not result_fits("layer_overview", forged)


def test_summarise_takes_a_flat_layer():
    from explainer.analysis import compute_conductance

    model = chain()
    result = compute_conductance(model, "flat", image(), 0, torch.zeros(1, 3, 16, 16))
    summary = summarise(result, top_k=2)
    assert summary.shape == (6,) and len(summary.top_channels) == 2


# ----------------------------------------------------------------------------- randomised copy


def test_randomised_copy_shuffles_a_copy_and_leaves_the_model_alone():
    model = chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = randomised_copy(model, seed=0)
    again = randomised_copy(model, seed=0)
    other = randomised_copy(model, seed=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    copied = first.state_dict()
    for name, parameter in model.named_parameters():
        shuffled = copied[name]
        assert shuffled.data_ptr() != parameter.data_ptr()
        # Same values, other places.
        assert torch.equal(torch.sort(shuffled.flatten())[0], torch.sort(parameter.flatten())[0])
        assert torch.equal(shuffled, again.state_dict()[name])
        if parameter.numel() > 4:
            assert not torch.equal(shuffled, parameter), name
            assert not torch.equal(shuffled, other.state_dict()[name]), name
    x = image()
    with torch.no_grad():
        assert not torch.allclose(first(x), model(x))
    assert first.training is model.training


# ----------------------------------------------------------------------------- worker operations


def test_worker_operations_answer_with_checked_records():
    from explainer.compute import ModelSource
    from explainer.compute.tasks import ModelSession

    session = ModelSession(ModelSource("builtin"))
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    x = torch.rand(1, 3, 64, 64).numpy()
    base = np.zeros_like(x)
    args = {"x": x, "target": 1, "baseline": base, "method": "gausslegendre", "n_steps": 8}
    overview = session.run("layer_overview", {**args, "layers": ["conv1", "block2"]})
    assert result_fits("layer_overview", overview)
    assert [s.layer for s in overview.layers] == ["conv1", "block2"]
    real = session.run("conductance", {**args, "layer": "block2"})
    assert overview.layers[1].total == pytest.approx(real.output_diff + real.delta, rel=1e-6)
    random = session.run("random_conductance", {**args, "layer": "block2", "seed": 0})
    assert result_fits("random_conductance", random)
    assert not np.allclose(random.attributions, real.attributions)
    again = session.run("random_conductance", {**args, "layer": "block2", "seed": 0})
    # The same seed, the same map (float32 rounding apart: a repeated call may split the path
    # into other passes than the first).
    np.testing.assert_allclose(again.attributions, random.attributions, rtol=1e-5, atol=1e-7)
    for key, value in session.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(AttributionError, match="list of layer names"):
        session.run("layer_overview", {**args, "layers": "conv1"})
