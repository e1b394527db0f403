"""Token rows a model never reads are left out of the engine's traced copy
(explainer/pruning.py); the results stay the model's."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerConductance as CaptumLayerConductance
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from explainer import LayerConductance, NeuronConductance, pruning
from explainer.folding import _FOLDED, folded

CUT = "slice(0, 1"  # what a cut looks like in the traced copy's code


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts it at zero
    return model.double().eval()


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, dtype=torch.float64, generator=generator)


def _copy_code(model: nn.Module) -> list[str]:
    return [copy.code for copy in _FOLDED[model].copies.values() if copy is not None]


def test_the_last_block_runs_for_the_class_token_alone_with_the_same_outputs():
    model = _vit()
    layer = model.encoder.layers.encoder_layer_0
    x = _images()
    traced = folded(model, [layer], (x,), None)
    assert traced is not model
    # the last block's query and the block's input, for the residual sum
    assert traced.code.count(CUT) == 2
    for n, seed in ((1, 5), (4, 6)):  # other rows than the example, other batch sizes
        other = _images(n, seed)
        torch.testing.assert_close(traced(other), model(other), rtol=1e-12, atol=1e-12)


def test_conductance_and_neuron_conductance_agree_with_captum_and_the_whole_model(monkeypatch):
    model = _vit()
    layer = model.encoder.layers.encoder_layer_1
    x = _images(3)
    got = LayerConductance(model, layer).attribute(x, target=2, n_steps=8)
    assert any(CUT in code for code in _copy_code(model))
    want = CaptumLayerConductance(model, layer).attribute(
        x, target=2, n_steps=8, method="gausslegendre"
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    neuron = NeuronConductance(model, layer).attribute(x, (3, 5), target=2, n_steps=8)
    monkeypatch.setenv("EXPLAINER_PRUNE_TOKENS", "0")
    torch.testing.assert_close(
        LayerConductance(model, layer).attribute(x, target=2, n_steps=8), got,
        rtol=1e-10, atol=1e-12,
    )
    torch.testing.assert_close(
        NeuronConductance(model, layer).attribute(x, (3, 5), target=2, n_steps=8), neuron,
        rtol=1e-10, atol=1e-12,
    )


def test_a_chosen_layer_inside_the_last_block_sees_every_token():
    model = _vit()
    for name in ("encoder.layers.encoder_layer_2.mlp", "encoder.ln"):
        layer = model.get_submodule(name)
        x = _images()
        got = LayerConductance(model, layer).attribute(x, target=1, n_steps=8)
        assert got.shape == (2, 17, 16)  # the class token and 16 patches
        want = CaptumLayerConductance(model, layer).attribute(
            x, target=1, n_steps=8, method="gausslegendre"
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
        # everything after the chosen layer may still be cut; the layer itself is not
        for code in _copy_code(model):
            assert f"{name.replace('.', '_')} = " not in code or CUT not in code.split(
                f"{name.replace('.', '_')} = "
            )[1].split("\n")[0]


def test_a_model_with_hooks_or_extra_arguments_is_left_whole():
    model = _vit()
    layer = model.encoder.layers.encoder_layer_0
    x = _images()
    handle = model.encoder.layers.encoder_layer_2.mlp.register_forward_hook(lambda m, a, o: None)
    try:
        assert folded(model, [layer], (x,), None) is model
    finally:
        handle.remove()
    assert folded(model, [layer], (x,), (torch.zeros(1),)) is model
    assert folded(model, [layer]) is model  # no example: nothing to learn shapes from


class _Mixing(nn.Module):
    """Attention, then an average over every token beside the first token's value: the last
    block's tokens are all read."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        y = self.mlp(a + h)
        return self.head(y[:, 0] + y.mean(1))


class _FirstToken(_Mixing):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        y = self.mlp(a + h)
        return self.head(y[:, 0])


class _Offsets(_FirstToken):
    """Operands that broadcast: a (1, features) offset and a per-token (1, tokens, 1) scale."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, 8))
        self.scale = nn.Parameter(torch.randn(1, 5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        y = self.mlp((a + h) * self.scale) + self.offset
        return self.head(y[:, 0])


class _Features(nn.Module):
    """``x[:, 0]`` on a (batch, features) tensor: dimension 1 is not tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attention(x, x, x, need_weights=False)
        return self.out(self.fc(a.mean(1)))[:, 0:2] + self.fc(a[:, 1])[:, 0, None]


def _tokens(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize(
    "make, cuts",
    [
        (_FirstToken, 1),  # the attention's query, and the same tensor for the sum
        (_Mixing, 0),
        # attention along dimension 0 is left whole; what follows it is per token: the sum's
        # two operands are cut
        (lambda: _FirstToken(batch_first=False), 2),
        (_Features, 0),
        (_Offsets, 2),  # also the per-token scale; the offset reaches every token as it is
    ],
)
def test_only_what_reads_the_first_token_alone_is_cut(make, cuts):
    torch.manual_seed(0)
    model = make().double().eval()
    layer = next(model.children())
    x = _tokens()
    traced = folded(model, [layer], (x,), None)
    assert (traced.code.count(CUT) if traced is not model else 0) == cuts
    other = _tokens(3)
    torch.testing.assert_close(traced(other), model(other), rtol=1e-12, atol=1e-12)


def test_a_rewrite_that_changes_the_output_is_undone(monkeypatch):
    model = _FirstToken().double().eval()
    monkeypatch.setattr(pruning, "_same", lambda a, b: False)
    x = _tokens()
    assert folded(model, [model.proj], (x,), None) is model  # nothing else to change: whole
    traced = torch.fx.symbolic_trace(model)
    assert not pruning.first_token_only(traced, set(), (x,))
    assert CUT not in traced.code
    torch.testing.assert_close(traced(x), model(x))


def test_the_example_check_catches_a_wrong_cut(monkeypatch):
    """With the per-token rule broken (a mean over the tokens taken for a per-token step), the
    rewrite gives another output on the example and is undone."""
    model = _Mixing().double().eval()
    monkeypatch.setattr(
        pruning, "_wants_first", lambda user, node, cut, queries: True
    )
    traced = torch.fx.symbolic_trace(model)
    assert not pruning.first_token_only(traced, set(), (_tokens(),))
    assert CUT not in traced.code


# ------------------------------------------------- what a review found (each failed before)


class _InPlace(_FirstToken):
    """An in-place step on a tensor that is also read whole later."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        z = a + h
        if self.how == "relu":
            y = self.mlp(self.act(z))
        else:
            y = self.mlp(z)
            h.mul_(2)
        return self.head(y[:, 0] + z.mean(1) + h.mean(1))


@pytest.mark.parametrize("how", ["relu", "mul_"])
def test_a_graph_with_an_in_place_step_is_left_whole(how):
    torch.manual_seed(0)
    model = _InPlace(how).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()  # the example's first token is never clamped
    x = _tokens()
    assert folded(model, [model.proj], (x,), None) is model
    other = -_tokens(3)
    want = LayerConductance(model, model.proj).attribute(other, target=0, n_steps=4)
    expected = CaptumLayerConductance(model, model.proj).attribute(
        other, target=0, n_steps=4, method="gausslegendre"
    )
    torch.testing.assert_close(want, expected, rtol=1e-6, atol=1e-12)


class _Squeezed(nn.Module):
    """``squeeze()`` drops the batch dimension of a one-row batch: ranks depend on the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.scale = nn.Parameter(torch.randn(2, 5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 2, 5, 6)
        h = self.proj(x)
        flat = h.flatten(0, 1)
        a, _ = self.attention(flat, flat, flat, need_weights=False)
        y = a.view_as(h).squeeze() * self.scale
        return y[:, 0].mean(-2)


def test_ranks_are_learned_from_two_rows_even_from_a_one_row_call():
    torch.manual_seed(0)
    model = _Squeezed().double().eval()
    one = torch.rand(1, 2, 5, 6, dtype=torch.float64)
    traced = folded(model, [model.proj], (one,), None)
    many = torch.rand(3, 2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(many), model(many), rtol=1e-12, atol=1e-12)


def test_training_mode_is_left_whole():
    model = _vit().train()
    folded(model, [model.encoder.layers.encoder_layer_0], (_images(),), None)
    assert not any(CUT in code for code in _copy_code(model))


class _Noisy(_FirstToken):
    """Draws random numbers in evaluation mode (and multiplies them by zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + 0 * torch.rand_like(x[..., :1])
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.head(self.mlp(a + h)[:, 0])


def test_the_example_runs_leave_the_random_stream_as_it_was():
    model = _Noisy().double().eval()
    torch.manual_seed(3)
    traced = folded(model, [model.proj], (_tokens(),), None)
    assert CUT in traced.code
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after)


class _Recorder(_FirstToken):
    """Keeps its attention outputs in a list and a dict (a debugging habit)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.last: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        self.seen.append(a)
        self.last["a"] = a
        return self.head(self.mlp(a + h)[:, 0])


def test_values_a_traced_forward_stores_in_containers_are_restored():
    model = _Recorder().double().eval()
    x = _tokens()
    assert folded(model, [model.proj], (x,), None) is model  # its forward must run as written
    assert model.seen == [] and model.last == {}
    model(x)
    assert [type(v) for v in model.seen] == [torch.Tensor]
    assert type(model.last["a"]) is torch.Tensor
