"""Tests for explainer.tree: the probe, usability reasons, suggestions, and no model mutation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from explainer.errors import AttributionError, AttributionTypeError, ExplainerError
from explainer.tree import MAX_SUGGESTED, ModuleTree, get_module, module_tree

# --------------------------------------------------------------------------- tiny models


class PairOut(nn.Module):
    """Returns a tuple of two tensors."""

    def forward(self, x):
        return x * 2.0, x + 1.0


class DictOut(nn.Module):
    """Returns a dict, which conductance cannot use."""

    def forward(self, x):
        return {"out": x - 1.0}


class NoneOut(nn.Module):
    """Records something and returns None."""

    def forward(self, x):
        return None


class ArgMax(nn.Module):
    """Returns an integer tensor."""

    def forward(self, x):
        return x.argmax(dim=1)


class Branchy(nn.Module):
    """Branches, a reused module, a never-called module, and odd output types."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.shared = nn.ReLU()
        self.pair = PairOut()
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 1, bias=False)
        self.dicty = DictOut()
        self.nothing = NoneOut()
        self.argmax = ArgMax()
        self.unused = nn.Linear(3, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.shared(self.stem(x))
        a, b = self.pair(x)
        self.nothing(x)
        self.argmax(x)
        x = self.shared(self.left(a) + self.right(b)) + self.dicty(x)["out"]
        return self.fc(self.pool(x).flatten(1))


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        raise RuntimeError("boom inside forward")


def _all_hooks_removed(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


@pytest.fixture
def branchy() -> tuple[Branchy, ModuleTree]:
    torch.manual_seed(0)
    model = Branchy().eval()
    return model, module_tree(model, torch.randn(1, 3, 6, 6))


# --------------------------------------------------------------------------- structure


def test_every_named_module_becomes_a_node_in_order(branchy):
    model, tree = branchy
    assert list(tree.nodes) == [name for name, _ in model.named_modules()]
    assert tree.root is tree.nodes[""]
    assert tree.root.type == "Branchy"
    assert tree.root.parent is None and tree.root.depth == 0


def test_node_structure_fields(branchy):
    _, tree = branchy
    stem0 = tree.nodes["stem.0"]
    assert stem0.type == "Conv2d"
    assert stem0.depth == 2
    assert stem0.parent == "stem"
    assert stem0.is_leaf and stem0.children == []
    assert tree.nodes["stem"].children == ["stem.0", "stem.1"]
    assert not tree.nodes["stem"].is_leaf
    assert tree.root.children[:3] == ["stem", "shared", "pair"]


def test_num_params_include_descendants(branchy):
    model, tree = branchy
    assert tree.nodes["stem.0"].num_params == 3 * 4 * 9 + 4
    assert tree.nodes["stem.1"].num_params == 8
    assert tree.nodes["stem"].num_params == 3 * 4 * 9 + 4 + 8
    assert tree.nodes["right"].num_params == 16
    assert tree.nodes["shared"].num_params == 0
    assert tree.root.num_params == sum(p.numel() for p in model.parameters())


def test_output_shapes_and_usable(branchy):
    _, tree = branchy
    stem = tree.nodes["stem"]
    assert stem.output_shapes == [(1, 4, 6, 6)]
    assert stem.usable and stem.reason == "" and stem.num_calls == 1
    assert tree.nodes["pool"].output_shapes == [(1, 4, 1, 1)]
    assert tree.nodes["fc"].output_shapes == [(1, 2)]
    assert tree.root.output_shapes == [(1, 2)] and tree.root.usable


def test_reused_module_is_unusable_with_reason(branchy):
    _, tree = branchy
    shared = tree.nodes["shared"]
    assert shared.num_calls == 2
    assert not shared.usable
    assert "called 2 times" in shared.reason and "reused" in shared.reason
    assert shared.output_shapes == [(1, 4, 6, 6)]


def test_unreached_module_is_unusable(branchy):
    _, tree = branchy
    unused = tree.nodes["unused"]
    assert unused.num_calls == 0
    assert not unused.usable
    assert unused.reason == "not reached by the forward pass"
    assert unused.output_shapes == []
    assert "unused" not in tree.execution_order


def test_tuple_output_is_usable_with_two_shapes(branchy):
    _, tree = branchy
    pair = tree.nodes["pair"]
    assert pair.usable, pair.reason
    assert pair.output_shapes == [(1, 4, 6, 6), (1, 4, 6, 6)]


def test_dict_none_and_integer_outputs_are_unusable(branchy):
    _, tree = branchy
    assert not tree.nodes["dicty"].usable
    assert "dict" in tree.nodes["dicty"].reason
    assert not tree.nodes["nothing"].usable
    assert "None" in tree.nodes["nothing"].reason
    argmax = tree.nodes["argmax"]
    assert not argmax.usable and "int64" in argmax.reason
    assert argmax.output_shapes == [(1, 6, 6)]


def test_execution_order_follows_forward_finish(branchy):
    _, tree = branchy
    order = tree.execution_order
    assert order[-1] == ""
    # Children finish before their container, and the forward's call order is kept.
    assert order.index("stem.0") < order.index("stem.1") < order.index("stem")
    assert order.index("stem") < order.index("pair") < order.index("left") < order.index("fc")
    assert set(order) == {n for n, node in tree.nodes.items() if node.num_calls > 0}


def test_usable_names_and_search(branchy):
    _, tree = branchy
    usable = tree.usable_names()
    assert "" not in usable
    assert usable == [n for n, node in tree.nodes.items() if node.usable and n]
    assert {"stem", "pair", "left", "fc"} <= set(usable)
    assert not {"shared", "unused", "dicty"} & set(usable)
    assert tree.usable_names(include_root=True)[0] == ""
    assert tree.search("conv2D") == ["stem.0", "left", "right"]
    assert tree.search("FC") == ["fc"]
    assert tree.search("stem") == ["stem", "stem.0", "stem.1"]
    assert tree.search("batchnorm") == ["stem.1"]
    assert tree.search("") == list(tree.nodes)
    assert tree.search("no-such-thing") == []


def test_suggested_includes_layer_before_classifier(branchy):
    _, tree = branchy
    assert "pool" in tree.suggested
    assert all(tree.nodes[n].usable for n in tree.suggested)
    assert "" not in tree.suggested


def test_tree_getitem_unknown_name_suggests():
    model = nn.Sequential(nn.Linear(2, 2))
    tree = module_tree(model, torch.randn(1, 2))
    assert tree["0"].type == "Linear"
    with pytest.raises(AttributionError, match="no module named"):
        tree["1"]


def test_aliased_module_appears_once_and_counts_calls():
    class Alias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = Alias()
    tree = module_tree(model, torch.randn(1, 2))
    assert list(tree.nodes) == ["", "a"]
    assert tree.nodes["a"].num_calls == 2 and not tree.nodes["a"].usable
    assert get_module(model, "b") is model.a


def test_tuple_of_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x, y):
            return self.lin(x * y)

    tree = module_tree(TwoInputs(), (torch.randn(2, 3), torch.randn(2, 3)))
    assert tree.nodes["lin"].output_shapes == [(2, 1)]
    assert tree.input_shapes == [(2, 3), (2, 3)]


# --------------------------------------------------------------------------- no mutation


def test_probe_leaves_model_untouched():
    torch.manual_seed(1)
    model = Branchy()
    model.train()
    model.stem.eval()  # mixed flags must come back exactly
    model.left.weight.requires_grad_(False)
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    module_tree(model, torch.randn(2, 3, 6, 6))

    assert _all_hooks_removed(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_probe_in_training_mode_does_not_update_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).train()
    before = model[1].running_mean.clone()
    batches = model[1].num_batches_tracked.clone()
    module_tree(model, torch.randn(4, 3, 5, 5) * 10 + 3)
    assert torch.equal(model[1].running_mean, before)
    assert torch.equal(model[1].num_batches_tracked, batches)
    assert model.training and model[1].training


def test_failing_forward_raises_and_restores():
    model = Failing().train()
    with pytest.raises(AttributionError, match=r"forward pass failed .*\(1, 3, 4, 4\)") as info:
        module_tree(model, torch.randn(1, 3, 4, 4))
    assert isinstance(info.value, ExplainerError)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "boom inside forward" in str(info.value)
    assert _all_hooks_removed(model)
    assert model.training and model.bn.training


def test_wrong_input_shape_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    with pytest.raises(AttributionError, match=r"\(1, 1, 8, 8\)"):
        module_tree(model, torch.randn(1, 1, 8, 8))
    assert _all_hooks_removed(model)


def test_bad_arguments_are_type_errors():
    with pytest.raises(AttributionTypeError, match="tensor"):
        module_tree(nn.Linear(2, 2), [[1.0, 2.0]])
    with pytest.raises(AttributionTypeError, match="nn.Module"):
        module_tree("resnet", torch.randn(1, 2))


def test_existing_user_hooks_are_kept():
    model = nn.Sequential(nn.Linear(2, 2))
    calls = []
    handle = model[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        module_tree(model, torch.randn(1, 2))
        assert len(model[0]._forward_hooks) == 1
        assert calls == [1]
    finally:
        handle.remove()


# --------------------------------------------------------------------------- get_module


def test_get_module_finds_and_suggests():
    model = torchvision.models.resnet18(num_classes=3)
    assert get_module(model, "layer1.0.conv1") is model.layer1[0].conv1
    assert get_module(model, "") is model
    with pytest.raises(AttributionError, match=r"'layer1\.0\.conv1'") as info:
        get_module(model, "layer1.0.conv")
    assert "no module named 'layer1.0.conv'" in str(info.value)
    with pytest.raises(AttributionError, match="Pick a name"):
        get_module(model, "zzzzzzzz")
    with pytest.raises(AttributionTypeError):
        get_module(model, 3)


# --------------------------------------------------------------------------- torchvision


def _vgg11() -> nn.Module:
    """torchvision's VGG-11 with a narrow classifier (the stock one has 100M weights to init)."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    with torch.device("meta"):
        model = VGG(make_layers(cfgs["A"]), num_classes=10, init_weights=False)
    model.features = make_layers(cfgs["A"])
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 32),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(32, 32),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(32, 10),
    )
    return model


def _convnext() -> nn.Module:
    """torchvision's ConvNeXt class with four narrow one-block stages."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [
        CNBlockConfig(8, 16, 1),
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, None, 1),
    ]
    return ConvNeXt(stages, stochastic_depth_prob=0.0, num_classes=10)


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=10,
    )


TORCHVISION_CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "vgg11": (_vgg11, 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "convnext": (_convnext, 64),
    "vit": (_vit, 32),
}


@pytest.fixture(scope="module")
def torchvision_trees() -> dict[str, tuple[nn.Module, ModuleTree]]:
    torch.manual_seed(0)
    out = {}
    for key, (build, side) in TORCHVISION_CASES.items():
        model = build().eval()
        out[key] = (model, module_tree(model, torch.randn(1, 3, side, side)))
    return out


@pytest.mark.parametrize("key", list(TORCHVISION_CASES))
def test_torchvision_tree_invariants(torchvision_trees, key):
    model, tree = torchvision_trees[key]
    assert _all_hooks_removed(model)
    assert not model.training
    assert list(tree.nodes) == [n for n, _ in model.named_modules()]
    assert tree.root.output_shapes == [(1, 10)]
    assert 1 <= len(tree.suggested) <= MAX_SUGGESTED
    assert len(set(tree.suggested)) == len(tree.suggested)
    for name in tree.suggested:
        assert tree.nodes[name].usable, (name, tree.nodes[name].reason)
    positions = [tree.execution_order.index(n) for n in tree.suggested]
    assert positions == sorted(positions)


def test_resnet_suggests_its_stages(torchvision_trees):
    _, tree = torchvision_trees["resnet18"]
    assert tree.suggested == ["relu", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    # Inside a BasicBlock the ReLU runs twice, so it cannot carry conductance.
    assert "reused" in tree.nodes["layer1.0.relu"].reason
    assert tree.nodes["layer4"].output_shapes == [(1, 512, 2, 2)]


def test_vgg_suggests_layers_before_each_downsampling(torchvision_trees):
    _, tree = torchvision_trees["vgg11"]
    assert tree.suggested == [
        "features.1",
        "features.4",
        "features.9",
        "features.14",
        "features.19",
        "avgpool",
    ]
    sides = [tree.nodes[n].output_shapes[0][-1] for n in tree.suggested[:-1]]
    assert sides == [32, 16, 8, 4, 2]


@pytest.mark.parametrize(
    "key", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext"]
)
def test_features_models_suggest_stage_outputs(torchvision_trees, key):
    _, tree = torchvision_trees[key]
    spatial = [
        n
        for n in tree.suggested
        if len(tree.nodes[n].output_shapes[0]) == 4 and tree.nodes[n].output_shapes[0][-1] > 1
    ]
    assert spatial, tree.suggested
    # Stage outputs of the `features` Sequential, one per resolution, shrinking as it goes.
    assert all(n == "features" or n.count(".") == 1 for n in spatial)
    assert all(n.startswith("features") for n in spatial)
    sides = [tree.nodes[n].output_shapes[0][-1] for n in spatial]
    assert sides == sorted(set(sides), reverse=True)
    assert tree.nodes[spatial[-1]].output_shapes[0][-1] == 2


def test_vit_suggests_encoder_layers(torchvision_trees):
    _, tree = torchvision_trees["vit"]
    assert "encoder.layers.encoder_layer_0" in tree.suggested
    assert "encoder.layers.encoder_layer_1" in tree.suggested
    assert tree.suggested[-1] == "encoder"  # the last module before the `heads` classifier
    attention = tree.nodes["encoder.layers.encoder_layer_0.self_attention"]
    # It returns (output, None): the one tensor is explained, the None passed on.
    assert attention.usable and attention.output_shapes == [(1, 5, 16)]
    # MultiheadAttention uses out_proj's weights without calling it.
    out_proj = tree.nodes["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert out_proj.reason == "not reached by the forward pass"


def test_suggestions_are_capped():
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Conv2d(1, 1, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(1, 2))
    tree = module_tree(model, torch.randn(1, 1, 512, 512))
    resolutions = {
        tree.nodes[n].output_shapes[0][-2:]
        for n in tree.usable_names()
        if len(tree.nodes[n].output_shapes[0]) == 4
    }
    assert len(resolutions) > MAX_SUGGESTED
    assert len(tree.suggested) == MAX_SUGGESTED
    assert tree.suggested[0] == "0"
    assert tree.suggested[-1] == "24"  # Flatten, the module right before the Linear head


def test_forwards_from_other_threads_are_not_recorded():
    import threading

    class SideThread(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(2, 2)
            self.side = nn.Linear(2, 2)

        def forward(self, x):
            # Another thread using the same (shared) model while the probe runs.
            worker = threading.Thread(target=self.side, args=(x,))
            worker.start()
            worker.join()
            return self.main(x)

    tree = module_tree(SideThread(), torch.randn(1, 2))
    assert tree.nodes["main"].num_calls == 1
    assert tree.nodes["side"].num_calls == 0


def test_head_of_a_wrapped_model_is_found():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torchvision.models.resnet18(num_classes=4)

        def forward(self, x):
            return self.inner(x * 2.0)

    tree = module_tree(Wrapper().eval(), torch.randn(1, 3, 64, 64))
    assert tree.suggested[-1] == "inner.avgpool"
    assert "inner.layer4" in tree.suggested


def test_multi_layer_head_is_skipped_as_a_whole():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
    )
    tree = module_tree(model, torch.randn(1, 3, 8, 8))
    assert tree.suggested == ["0", "2"]
