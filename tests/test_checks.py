"""The neuron card's checks: ablation, the flip count, neuron conductance maps and the cascading
randomisation test, on tiny models whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from explainer import analysis, checks
from explainer.compute import wire
from explainer.compute.tasks import result_fits
from explainer.errors import AttributionError


class Small(nn.Module):
    """conv -> relu -> global average -> linear, in float64 with fixed random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)).mean(dim=(2, 3)))


class Sum(nn.Module):
    """Four channels passed through ``features`` (an identity); class 0 scores their sum,
    class 1 a constant ``bar``: zeroing channels lowers class 0 until class 1 wins."""

    def __init__(self, bar: float) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.0, bar]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def small() -> tuple[Small, torch.Tensor]:
    torch.manual_seed(0)
    model = Small().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    return model, x


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not model.training


# --------------------------------------------------------------------------- ablation


def test_ablation_equals_a_forward_with_the_units_zeroed_by_hand():
    model, x = small()
    before = state_of(model)
    result = checks.ablate(model, "body", x, 1, [[(2,)], [(1, 3, 4)], [(0,), (3,)]])
    with torch.no_grad():
        hidden = model.body(x)

        def rest(h: torch.Tensor) -> np.ndarray:
            return model.head(model.act(h).mean(dim=(2, 3)))[0].detach().numpy()

        channel = hidden.clone()
        channel[:, 2] = 0
        neuron = hidden.clone()
        neuron[0, 1, 3, 4] = 0
        pair = hidden.clone()
        pair[:, [0, 3]] = 0
        plain = rest(hidden)
    np.testing.assert_allclose(result.scores, plain, rtol=1e-12)
    np.testing.assert_allclose(result.ablated[0], rest(channel), rtol=1e-12)
    np.testing.assert_allclose(result.ablated[1], rest(neuron), rtol=1e-12)
    np.testing.assert_allclose(result.ablated[2], rest(pair), rtol=1e-12)
    assert result.target_score() == pytest.approx(plain[1])
    assert result.target_score(0) == pytest.approx(rest(channel)[1])
    assert result.predicted() == int(np.argmax(plain))
    assert result.zeroed == (((2,),), ((1, 3, 4),), ((0,), (3,)))
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "variants, message",
    [
        ([[(4,)]], "outside"),
        ([[(0, 0, 0, 0)]], "does not index"),
        ([], "at least one"),
    ],
)
def test_ablation_refuses_units_outside_the_layer(variants, message):
    model, x = small()
    before = state_of(model)
    with pytest.raises(AttributionError, match=message):
        checks.ablate(model, "body", x, 0, variants)
    assert_untouched(model, before)


def test_channel_order_puts_the_largest_conductance_first():
    order = checks.channel_order(np.array([0.5, -1.0, 2.0, 0.0, 0.5]))
    assert order.tolist() == [2, 0, 4, 3, 1]


# --------------------------------------------------------------------------- flip count


def test_flip_count_is_the_smallest_k_that_changes_the_prediction():
    # Class 0 scores 4 - k with k channels zeroed, class 1 scores 2.5: the flip is at k = 2.
    model = Sum(2.5).double().eval()
    before = state_of(model)
    x = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    flip = checks.flip_search(model, "features", x, 0, [3, 1, 0, 2])
    assert flip.flipped_at == 2
    assert (flip.before, flip.after) == (0, 1)
    assert flip.searched == 2 and flip.order.tolist() == [3, 1]
    np.testing.assert_allclose(flip.target_scores, [4.0, 3.0, 2.0])
    assert flip.predicted.tolist() == [0, 0, 1]
    assert_untouched(model, before)


def test_flip_count_says_so_when_no_k_flips_the_decision():
    model = Sum(-1.0).double().eval()  # class 0 scores 4 - k >= 0 > -1 for every k
    x = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    flip = checks.flip_search(model, "features", x, 0, [0, 1, 2, 3])
    assert flip.flipped_at is None and flip.after is None
    assert flip.searched == 4 == flip.channels
    np.testing.assert_allclose(flip.target_scores, [4.0, 3.0, 2.0, 1.0, 0.0])


def test_flip_search_stops_at_its_limit_and_reports_progress():
    model = Sum(0.5).double().eval()  # would flip at k = 4
    x = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    seen = []
    flip = checks.flip_search(
        model, "features", x, 0, [0, 1, 2, 3], limit=3, progress=lambda d, t: seen.append((d, t))
    )
    assert flip.flipped_at is None and flip.searched == 3
    assert seen[-1] == (3, 3)
    assert checks.flip_search(model, "features", x, 0, [0, 1, 2, 3]).flipped_at == 4


def test_flip_search_refuses_a_bad_order():
    model = Sum(2.5).double().eval()
    x = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    for order in ([0, 0, 1], [0, 4]):
        with pytest.raises(AttributionError, match="distinct channels"):
            checks.flip_search(model, "features", x, 0, order)


# ---------------------------------------------------------------- flip count, other layouts


class ChannelsLast(nn.Module):
    """conv -> channels last -> a per-position linear map of the channels (``mix``, output
    ``(N, H, W, C)`` as in a ConvNeXt block) -> average -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.mix(torch.relu(self.body(x)).permute(0, 2, 3, 1))
        return self.head(torch.relu(hidden).mean(dim=(1, 2)))


def tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    with torch.no_grad():  # torchvision starts the head at zero: every class would tie
        nn.init.normal_(model.heads.head.weight, std=0.5)
        nn.init.normal_(model.heads.head.bias, std=0.1)
    return model.double().eval()


def scores_with_features_zeroed(
    model: nn.Module, layer: str, x: torch.Tensor, features: list[int]
) -> np.ndarray:
    """Plain torch: the model's scores with ``features`` (the last dimension of ``layer``'s
    output) set to 0 at every position."""

    def zero(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., features] = 0
        return out

    handle = model.get_submodule(layer).register_forward_hook(zero)
    try:
        with torch.no_grad():
            return model(x)[0].numpy()
    finally:
        handle.remove()


def check_against_plain_torch(
    model: nn.Module, layer: str, x: torch.Tensor, order: list[int], axis: int
) -> checks.FlipResult:
    """Run the flip search on ``layer`` along ``axis`` and compare every ``k`` it tried with
    a plain forward pass zeroing the same features; the flip must be the first change."""
    before = state_of(model)
    flip = checks.flip_search(model, layer, x, 0, order, channel_axis=axis)
    assert_untouched(model, before)
    assert flip.channel_axis == axis and flip.channels == len(order)
    expected_scores, expected_classes = [], []
    for k in range(len(order) + 1):
        scores = scores_with_features_zeroed(model, layer, x, order[:k])
        expected_scores.append(scores[0])
        expected_classes.append(int(np.argmax(scores)))
    changed = [k for k, c in enumerate(expected_classes) if c != expected_classes[0]]
    assert changed, "the test model must flip for some k"
    assert flip.flipped_at == changed[0]
    assert flip.searched == changed[0] and flip.order.tolist() == order[: changed[0]]
    steps = changed[0] + 1
    assert flip.predicted.tolist() == expected_classes[:steps]
    np.testing.assert_allclose(flip.target_scores, expected_scores[:steps], rtol=1e-10)
    return flip


def test_flip_search_zeroes_a_vision_transformer_feature_in_every_token():
    from explainer.layout import layout_for

    model = tiny_vit()
    torch.manual_seed(5)  # flips at k = 5: past the search's first batch of 4
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    layer = "encoder.layers.encoder_layer_0"
    layout = layout_for((17, 16), (32, 32))
    assert layout.kind == "class_patch_tokens" and layout.channel_axis == 1
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
    flip = check_against_plain_torch(model, layer, x, order, layout.channel_axis)
    assert flip.channels == 16  # features, not the 17 tokens
    # The same features zeroed one unit at a time (the card's "whole feature" rows) agree.
    units = [u for c in order[: flip.flipped_at] for u in _feature_units(layout, c)]
    ablated = checks.ablate(model, layer, x, 0, [units])
    assert ablated.predicted(0) == flip.after
    assert ablated.target_score(0) == pytest.approx(flip.target_scores[-1], rel=1e-10)


def _feature_units(layout, channel: int) -> list[tuple[int, ...]]:
    rows, columns = layout.grid
    units = [layout.to_raw((channel, y, x)) for y in range(rows) for x in range(columns)]
    return [*units, layout.to_raw((channel,))]


def test_flip_search_zeroes_a_channels_last_channel_at_every_position():
    from explainer.layout import layout_for

    torch.manual_seed(8)  # flips at k = 5: past the search's first batch of 4
    model = ChannelsLast().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    layout = layout_for((4, 4, 6), (8, 8), "channels_last")
    assert layout.kind == "channels_last" and layout.channel_axis == 2
    flip = check_against_plain_torch(model, "mix", x, [5, 0, 3, 1, 4, 2], layout.channel_axis)
    assert flip.channels == 6


def test_flip_search_refuses_a_channel_axis_outside_the_output():
    model, x = small()
    with pytest.raises(AttributionError, match="without a dimension 3"):
        checks.flip_search(model, "body", x, 0, [0, 1], channel_axis=3)
    with pytest.raises(AttributionError, match="distinct channels between 0 and 7"):
        checks.flip_search(model, "body", x, 0, [0, 8], channel_axis=2)  # 8 columns


def test_a_layer_without_channels_is_refused():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.total = nn.Flatten(0)  # (N, 4) -> (4N,): one number per image, no channels
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.flatten(1))

    model = Flat().double().eval()
    x = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(AttributionError):
        checks.ablate(model, "total", x, 0, [[(0,)]])


# --------------------------------------------------------------------------- neuron conductance


def test_neuron_conductance_map_adds_up_to_the_neurons_layer_conductance():
    model, x = small()
    before = state_of(model)
    baseline = torch.zeros_like(x)
    layer = analysis.compute_conductance(model, "body", x, 2, baseline, n_steps=64)
    strongest = np.unravel_index(np.argmax(np.abs(layer.attributions)), layer.attributions.shape)
    neuron = tuple(int(i) for i in strongest)
    result = checks.neuron_conductance_map(model, "body", x, 2, baseline, neuron, n_steps=64)
    assert result.attributions.shape == (3, 8, 8) and result.neuron == neuron
    # Two quadratures of the same path integral: equal up to the integration error.
    assert abs(result.total) > 1e-3
    assert result.total == pytest.approx(float(layer.attributions[neuron]), rel=1e-2)
    with torch.no_grad():
        assert result.activation == pytest.approx(float(model.body(x)[(0, *neuron)]))
    assert_untouched(model, before)


def test_neuron_conductance_refuses_a_neuron_outside_the_layer():
    model, x = small()
    with pytest.raises(AttributionError, match="outside"):
        checks.neuron_conductance_map(model, "body", x, 0, torch.zeros_like(x), (9, 0, 0))


# --------------------------------------------------------------------------- randomisation


def test_identical_maps_have_spearman_and_ssim_of_one():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16))
    rho, ssim = checks.map_similarity(a, a.copy())
    assert rho == pytest.approx(1.0) and ssim == pytest.approx(1.0)
    # A map and a rescaled copy rank the same pixels first: still 1, 1.
    rho, ssim = checks.map_similarity(a, 3.0 * a)
    assert rho == pytest.approx(1.0) and ssim == pytest.approx(1.0)
    rho, ssim = checks.map_similarity(a, rng.random((16, 16)))
    assert abs(rho) < 0.3 and ssim < 0.5


def test_only_the_pixels_the_maps_cover_are_compared():
    # Two maps of the same small receptive field, unrelated inside it: the zeros around it
    # must not make them look alike.
    rng = np.random.default_rng(1)
    a, b = np.zeros((32, 32)), np.zeros((32, 32))
    a[10:17, 10:17] = rng.random((7, 7))
    b[10:17, 10:17] = rng.random((7, 7))
    rho, ssim = checks.map_similarity(a, b)
    assert abs(rho) < 0.4 and ssim < 0.4
    rho, ssim = checks.map_similarity(a, a * 2.0)
    assert rho == pytest.approx(1.0) and ssim == pytest.approx(1.0)


def test_flat_and_tiny_maps_give_no_similarity():
    a = np.arange(16.0).reshape(4, 4)
    assert all(math.isnan(v) for v in checks.map_similarity(a, np.zeros((4, 4))))
    rho, ssim = checks.map_similarity(np.arange(4.0).reshape(2, 2), np.arange(4.0).reshape(2, 2))
    assert rho == pytest.approx(1.0) and math.isnan(ssim)
    with pytest.raises(AttributionError):
        checks.map_similarity(a, np.zeros((3, 3)))


@pytest.mark.parametrize(
    "rho, ssim, kind",
    [
        (0.3, 0.2, "depends"),
        (0.49, 0.49, "depends"),
        (float("nan"), float("nan"), "depends"),
        (0.5, 0.0, "partly"),
        (0.1, 0.79, "partly"),
        (0.8, 0.1, "same"),
        (0.1, 0.95, "same"),
        (1.0, 1.0, "same"),
    ],
)
def test_the_verdict_follows_the_thresholds(rho, ssim, kind):
    assert checks.DEPENDS_BELOW == 0.5 and checks.SAME_ABOVE == 0.8
    got, sentence = checks.randomisation_verdict(rho, ssim)
    assert got == kind
    assert sentence.endswith(".")


def test_an_empty_original_map_gives_no_verdict():
    kind, sentence = checks.randomisation_verdict(1.0, 1.0, original_flat=True)
    assert kind == "empty" and "cannot say" in sentence


def test_stages_run_from_the_output_down_and_are_bounded():
    model, x = small()
    stages = checks.randomisation_stages(model, x)
    assert stages == [["head"], ["body"]]
    deep = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)]).double().eval()
    stages = checks.randomisation_stages(
        deep, torch.ones(1, 4, 1, 1, dtype=torch.float64)[..., 0, 0]
    )
    assert len(stages) == checks.MAX_STAGES
    flat = [name for stage in stages for name in stage]
    assert flat == [str(i) for i in reversed(range(20))]
    assert not any(m._forward_pre_hooks for m in deep.modules())


def test_reinitialising_is_reproducible_and_changes_the_weights():
    model, _ = small()
    one, two = Small().double(), Small().double()
    one.load_state_dict(model.state_dict())
    two.load_state_dict(model.state_dict())
    checks._reinitialise(one.body, 7)
    checks._reinitialise(two.body, 7)
    assert torch.equal(one.body.weight, two.body.weight)
    assert not torch.equal(one.body.weight, model.body.weight)
    assert torch.equal(one.head.weight, model.head.weight)  # only the module asked for


def test_cascading_randomisation_changes_the_copy_and_never_the_model():
    model, x = small()
    before = state_of(model)
    baseline = torch.zeros_like(x)
    neuron = (1, 3, 4)
    seen = []
    result = checks.cascading_randomisation(
        model, "body", x, 2, baseline, neuron, n_steps=8, progress=lambda d, t: seen.append(d)
    )
    assert_untouched(model, before)
    assert result.stages == ("head", "body")
    assert result.modules.tolist() == [1, 2]
    assert result.maps.shape == (3, 8, 8) and seen == [1, 2, 3]
    original = checks.neuron_conductance_map(model, "body", x, 2, baseline, neuron, n_steps=8)
    np.testing.assert_allclose(
        result.maps[0], np.abs(original.attributions.sum(axis=0)), rtol=1e-5, atol=1e-7
    )
    # The head only scales the neuron's map (one weight per path point): the ranks stay.
    assert result.spearman[0] == pytest.approx(1.0, abs=1e-6)
    # Once the neuron's own convolution is random its map is another one.
    assert not np.allclose(result.maps[2], result.maps[0])
    assert result.spearman[1] < 0.9
    assert result.verdict[0] in {"depends", "partly", "same"}
    # Same seed, same answer.
    again = checks.cascading_randomisation(model, "body", x, 2, baseline, neuron, n_steps=8)
    np.testing.assert_array_equal(again.maps, result.maps)


def test_a_model_that_cannot_be_copied_gets_a_plain_message(monkeypatch):
    model, x = small()

    def refuse(value, memo=None):
        raise TypeError("cannot pickle")

    monkeypatch.setattr(checks.copy, "deepcopy", refuse)
    with pytest.raises(AttributionError, match="cannot be copied"):
        checks.cascading_randomisation(model, "body", x, 0, torch.zeros_like(x), (0, 0, 0))


# --------------------------------------------------------------------------- wire and workers


def test_results_cross_the_wire_and_pass_the_result_checks():
    model, x = small()
    baseline = torch.zeros_like(x)
    results = {
        "neuron_conductance": checks.neuron_conductance_map(
            model, "body", x, 0, baseline, (0, 1, 1), n_steps=4
        ),
        "ablate": checks.ablate(model, "body", x, 0, [[(0,)]]),
        "flip_search": checks.flip_search(model, "body", x, 0, [0, 1, 2, 3]),
        "randomisation": checks.cascading_randomisation(
            model, "body", x, 0, baseline, (0, 1, 1), n_steps=4
        ),
    }
    for op, result in results.items():
        back = wire.decode(wire.encode(result))
        assert type(back) is type(result)
        assert result_fits(op, back), op
        for name, value in vars(result).items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(getattr(back, name), value)
            else:
                assert getattr(back, name) == value, name
    # A worker sending a malformed record is not believed.
    bad = checks.FlipResult(**{**vars(results["flip_search"]), "predicted": [0, 1]})
    assert not result_fits("flip_search", bad)
    assert not result_fits("ablate", results["flip_search"])
    beyond = checks.FlipResult(**{**vars(results["flip_search"]), "flipped_at": 99})
    assert not result_fits("flip_search", beyond)
    short = results["randomisation"]
    assert not result_fits(
        "randomisation", checks.RandomisationResult(**{**vars(short), "maps": short.maps[:1]})
    )


def test_the_model_session_answers_the_card_operations():
    from explainer.compute import ModelSession, ModelSource

    session = ModelSession(ModelSource("builtin"))
    x = np.zeros((1, *session.info.input_size), dtype=np.float32)
    ablated = session.run("ablate", {"layer": "block3", "x": x, "target": 0, "variants": [[(1,)]]})
    assert result_fits("ablate", ablated)
    # The flip search takes the channel axis through the worker (block3 is 8 columns wide).
    args = {"layer": "block3", "x": x, "target": 0, "order": (7, 0, 1), "limit": 2}
    across = session.run("flip_search", {**args, "channel_axis": 2})
    assert result_fits("flip_search", across)
    assert (across.channel_axis, across.channels, across.searched) == (2, 8, 2)
    assert session.run("flip_search", args).channel_axis == 0
    with pytest.raises(AttributionError, match="list of whole numbers"):
        session.run(
            "neuron_conductance",
            {
                "layer": "block3",
                "x": x,
                "target": 0,
                "baseline": x,
                "neuron": ("a",),
                "method": "gausslegendre",
                "n_steps": 2,
            },
        )


class _SmallExportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.act(self.conv1(x))).mean(dim=(2, 3)))


def test_an_exported_model_gets_its_sanity_check_from_a_second_load():
    """An exported program cannot be deep-copied: the worker loads its file a second time for
    the randomised copies, and the model in use stays as it was."""
    from hostile import export_bytes

    from explainer.compute import ModelSource
    from explainer.compute.tasks import ModelSession

    torch.manual_seed(3)
    session = ModelSession(ModelSource("file", export_bytes(_SmallExportable()), "small.pt2"))
    with pytest.raises(Exception):  # noqa: B017 - the reason the second load exists
        __import__("copy").deepcopy(session.model)
    x = torch.rand(1, 3, 8, 8).numpy()
    common = {"layer": "conv2", "x": x, "target": 0, "baseline": np.zeros_like(x)}
    before = session.run("scores", {"x": x})
    result = session.run(
        "randomisation", {**common, "neuron": (1, 3, 3), "method": "gausslegendre", "n_steps": 4}
    )
    assert len(result.stages) >= 2 and result_fits("randomisation", result)
    random = session.run("random_conductance", {**common, "method": "gausslegendre", "n_steps": 4})
    plain = session.run("conductance", {**common, "method": "gausslegendre", "n_steps": 4})
    assert not np.allclose(random.attributions, plain.attributions)  # the weights did change
    np.testing.assert_array_equal(session.run("scores", {"x": x}), before)
