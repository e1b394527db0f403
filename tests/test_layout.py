"""Layout detection and the mapping between view neurons and the engine's raw indices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from explainer.analysis import compute_neuron_gradients
from explainer.errors import AttributionError
from explainer.layout import Layout, choose_layout, detect_layout, layout_for
from explainer.tree import module_tree


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    # torchvision starts the head at zero (every score 0): give it weights so scores vary.
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def tiny_swin() -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
        num_classes=5,
    ).eval()  # fmt: skip


def tiny_convnext() -> ConvNeXt:
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5).eval()


def shapes(model: torch.nn.Module, size: int = 32) -> dict[str, tuple[int, ...]]:
    tree = module_tree(model, torch.zeros(1, 3, size, size))
    return {
        name: node.output_shapes[0][1:]
        for name, node in tree.nodes.items()
        if node.usable and len(node.output_shapes) == 1
    }


# --------------------------------------------------------------------------- detection


def test_vit_b_16_encoder_output_is_class_token_plus_patch_grid() -> None:
    found = detect_layout((197, 768), (224, 224))
    assert found.sure
    assert found.layout == Layout("class_patch_tokens", (197, 768), (14, 14))
    assert found.layout.view_shape == (768, 14, 14)
    assert found.layout.channel_word == "feature"
    # The user may still read it as a plain sequence.
    assert {o.kind for o in found.options} == {"class_patch_tokens", "tokens", "sequence"}


def test_patch_tokens_without_class_token() -> None:
    found = detect_layout((196, 384), (224, 224))
    assert found.layout.kind == "patch_tokens" and found.layout.grid == (14, 14)
    # A non-square image: 224×448 with 16-pixel patches is a 14×28 grid.
    assert detect_layout((14 * 28, 64), (224, 448)).layout.grid == (14, 28)
    assert detect_layout((1 + 14 * 28, 64), (224, 448)).layout.grid == (14, 28)


def test_tiny_vit_built_in_the_test() -> None:
    found = shapes(tiny_vit())
    for name in ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder"):
        layout = layout_for(found[name], (32, 32))
        assert layout.kind == "class_patch_tokens", name
        assert layout.grid == (4, 4) and layout.view_shape == (16, 4, 4)
    # The MLP inside a block has more features, still on the same tokens.
    mlp = layout_for(found["encoder.layers.encoder_layer_0.mlp.0"], (32, 32))
    assert mlp.view_shape == (32, 4, 4)
    # The patch embedding is an ordinary convolution, and the head a vector.
    assert layout_for(found["conv_proj"], (32, 32)).kind == "channels_first"
    assert layout_for(found["heads"], (32, 32)).kind == "flat"


def test_swin_t_stage_shapes_are_channels_last() -> None:
    for shape in ((56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)):
        found = detect_layout(shape, (224, 224))
        assert found.sure, shape
        assert found.layout.kind == "channels_last"
        assert found.layout.view_shape == (shape[2], shape[0], shape[1])


def test_tiny_swin_built_in_the_test() -> None:
    found = shapes(tiny_swin())
    assert found["features.0"] == (8, 8, 8)  # 8 channels on an 8x8 map: both orders fit
    stage = detect_layout(found["features.3"], (32, 32))  # (4, 4, 16)
    assert stage.layout.kind == "channels_last" and stage.sure
    ambiguous = detect_layout(found["features.0"], (32, 32))
    assert not ambiguous.sure
    assert {o.kind for o in ambiguous.options} == {"channels_first", "channels_last"}


def test_convnext_blocks_inside_permutes() -> None:
    found = shapes(tiny_convnext())
    # Inside a block, the linear layers run on (N, H, W, C).
    inner = [n for n, s in found.items() if n.endswith("block.3")]
    assert inner, sorted(found)
    for name in inner:
        assert layout_for(found[name], (32, 32)).kind == "channels_last", (name, found[name])
    # Block outputs are permuted back to channels first.
    assert layout_for(found["features.1"], (32, 32)).kind == "channels_first"
    assert layout_for((96, 56, 56), (224, 224)).kind == "channels_first"
    assert layout_for((56, 56, 384), (224, 224)).kind == "channels_last"


def test_existing_layouts_unchanged() -> None:
    for shape, kind in (
        ((64, 56, 56), "channels_first"),
        ((512, 7, 7), "channels_first"),
        ((2048, 1, 1), "channels_first"),
        ((1000,), "flat"),
        ((32, 100), "sequence"),
        ((2, 3, 4, 5), "other"),
    ):
        layout = layout_for(shape, (224, 224))
        assert layout.kind == kind, shape
        assert layout.view_shape == shape
        values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        np.testing.assert_array_equal(layout.view(values).values, values)
    # Inception-sized maps (no whole stride) stay channels first and sure.
    found = detect_layout((288, 35, 35), (299, 299))
    assert found.layout.kind == "channels_first" and found.sure


def test_ambiguous_shapes_are_flagged() -> None:
    sequence = detect_layout((60, 768), (224, 224))  # 60 tokens: no grid either way
    assert not sequence.sure and sequence.layout.kind == "sequence"
    assert {o.kind for o in sequence.options} == {"sequence", "tokens"}
    cube = detect_layout((16, 16, 16), (64, 64))
    assert not cube.sure and cube.layout.kind == "channels_first"
    # A remembered choice wins when it fits; one that does not fit the shape is ignored.
    assert choose_layout(cube, "channels_last").kind == "channels_last"
    assert choose_layout(cube, "class_patch_tokens").kind == "channels_first"
    assert choose_layout(sequence, None).kind == "sequence"


# --------------------------------------------------------------------------- mapping


LAYOUTS = [
    Layout("flat", (7,)),
    Layout("channels_first", (3, 4, 5), (4, 5)),
    Layout("sequence", (3, 6)),
    Layout("tokens", (6, 3)),
    Layout("patch_tokens", (6, 3), (2, 3)),
    Layout("class_patch_tokens", (7, 3), (2, 3)),
    Layout("channels_last", (4, 5, 3), (4, 5)),
    Layout("other", (2, 3, 4, 5)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.kind)
def test_every_raw_index_round_trips_through_its_view_neuron(layout: Layout) -> None:
    values = np.random.default_rng(0).normal(size=layout.shape)
    view = layout.view(values)
    seen = set()
    for raw in itertools.product(*(range(n) for n in layout.shape)):
        neuron = layout.from_raw(raw)
        assert layout.fits(neuron)
        assert layout.to_raw(neuron) == raw
        seen.add(neuron)
        # The view shows the raw value at the view neuron.
        if layout.is_class_token(neuron):
            assert view.class_token is not None
            assert view.class_token[neuron[0]] == values[raw]
        else:
            assert view.values[neuron] == values[raw]
    assert len(seen) == values.size  # one view neuron per raw unit
    np.testing.assert_allclose(view.channel_totals.sum(), values.sum())


def test_vit_neuron_in_user_terms() -> None:
    layout = layout_for((197, 768), (224, 224))
    assert layout.to_raw((100, 3, 4)) == (1 + 3 * 14 + 4, 100)
    assert layout.to_raw((100,)) == (0, 100)  # the class token
    assert layout.from_raw((0, 5)) == (5,)
    assert layout.neuron_text((100, 3, 4)) == "feature 100 at patch row 3, column 4"
    assert layout.neuron_text((5,)) == "feature 5 of the class token"
    swin = layout_for((56, 56, 96), (224, 224))
    assert swin.to_raw((10, 2, 3)) == (2, 3, 10)
    assert swin.neuron_text((10, 2, 3)) == "channel 10 at row 2, column 3"


def test_neurons_outside_the_layout_are_refused_with_the_ranges() -> None:
    layout = layout_for((197, 768), (224, 224))
    # The old bug: "unit 100" of a 197×768 output is not a neuron of this layout.
    assert not layout.fits((100, 3)) and not layout.fits((768, 0, 0)) and not layout.fits(None)
    with pytest.raises(AttributionError, match="features 0–767, patch rows 0–13"):
        layout.to_raw((100, 14, 0))
    with pytest.raises(AttributionError, match="outside"):
        layout.from_raw((197, 0))
    with pytest.raises(AttributionError, match="do not match"):
        layout.view(np.zeros((196, 768)))


def test_view_of_a_vit_output() -> None:
    layout = layout_for((17, 2), (32, 32))
    raw = np.arange(34, dtype=np.float32).reshape(17, 2)
    view = layout.view(raw)
    np.testing.assert_array_equal(view.class_token, [0, 1])
    assert view.values.shape == (2, 4, 4)
    # Patch (row 1, column 2) is token 1 + 1 * 4 + 2 = 7.
    np.testing.assert_array_equal(view.values[:, 1, 2], raw[7])
    np.testing.assert_allclose(view.spatial, raw[1:].sum(axis=1).reshape(4, 4))
    np.testing.assert_allclose(view.channel_totals, raw.sum(axis=0))


# --------------------------------------------------------------------------- engine


def test_vit_neuron_gradient_equals_captum_on_the_raw_index() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model = tiny_vit().double()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    name = "encoder.layers.encoder_layer_1"
    layout = layout_for(shapes(tiny_vit())[name], (32, 32))
    neurons = [(3, 1, 2), (7,), (15, 3, 3)]  # a patch, the class token, the last patch
    raw = [layout.to_raw(n) for n in neurons]
    ours = compute_neuron_gradients(model, name, x, raw)
    layer = model.get_submodule(name)
    for neuron, index, result in zip(neurons, raw, ours, strict=True):
        expected = captum_attr.NeuronGradient(model, layer).attribute(x, neuron_selector=index)
        np.testing.assert_allclose(result.gradient, expected[0].numpy(), rtol=1e-5, atol=1e-7)
        assert result.neuron == index
        assert np.abs(result.gradient).max() > 0, neuron
    # The patch neuron reads the right number of the raw output.
    with torch.no_grad():
        captured = []
        handle = model.get_submodule(name).register_forward_hook(
            lambda m, a, out: captured.append(out)
        )
        try:
            model(x)
        finally:
            handle.remove()
    view = layout.view(captured[0][0].numpy())
    assert ours[0].activation == pytest.approx(view.values[3, 1, 2])
    assert ours[1].activation == pytest.approx(view.class_token[7])


# --------------------------------------------------------------------------- .pt2 module types


def test_a_pt2_models_tree_shows_the_original_module_types() -> None:
    import io

    from explainer.intake import load_model

    program = torch.export.export(
        tiny_vit(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    loaded = load_model(buffer.getvalue(), filename="vit.pt2")
    tree = module_tree(loaded.model, torch.zeros(1, 3, 32, 32))
    types = {name: node.type for name, node in tree.nodes.items()}
    assert types["conv_proj"] == "Conv2d"
    assert types["encoder.layers.encoder_layer_0"] == "EncoderBlock"
    assert types["encoder.layers.encoder_layer_0.mlp"] == "MLPBlock"
    assert types["encoder.layers.encoder_layer_0.ln_1"] == "LayerNorm"
    assert not any("Interpreter" in t for t in types.values()), types


def test_module_types_from_program_metadata_are_plain_class_names_only() -> None:
    from types import SimpleNamespace

    from explainer.intake.export import _original_types

    def node(stack):
        return SimpleNamespace(meta={"nn_module_stack": stack})

    graph = SimpleNamespace(
        nodes=[
            node({"a": ("conv", "torch.nn.modules.conv.Conv2d")}),
            node({"b": ("block", "<b onmouseover=x>Evil</b>"), "c": ("odd", 42)}),
            node({"d": ("head", Layout)}),  # a class object, as in a program not yet saved
            node("not a dict"),
        ]
    )
    found = _original_types(SimpleNamespace(graph=graph))
    assert found == {"conv": "Conv2d", "head": "Layout"}
