"""Batch norms folded into the convolutions before them (explainer.folding)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from explainer import LayerConductance, NeuronConductance, NeuronGradient
from explainer.folding import folded


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    """A stem (conv + batch norm), two residual blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block1 = Block(6)
        self.block2 = Block(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def _net(dtype=torch.float64) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype)
    with torch.no_grad():  # statistics and affine parameters that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _norms_run(forward) -> int:
    """Batch norms that run in one forward pass of ``forward``."""
    ran = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: ran.append(m) if isinstance(m, nn.BatchNorm2d) else None
    )
    try:
        forward(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    finally:
        handle.remove()
    return len(ran)


def _unfolded(monkeypatch) -> None:
    import explainer.attribution as attribution

    monkeypatch.setattr(attribution, "folded", lambda forward, layers, *example: forward)


def test_every_pair_outside_the_layer_is_folded_and_the_model_is_left_alone():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = list(net.modules())
    f = folded(net, [net.block2])
    assert isinstance(f, fx.GraphModule)
    assert _norms_run(net) == 5
    assert _norms_run(f) == 2  # the stem's and block1's are folded, block2's run whole
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(f(x), net(x), rtol=0, atol=1e-12)
    assert list(net.modules()) == modules and not net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert folded(net, [net.block2]) is f  # kept while nothing changes
    fused = [m for name, m in f.named_modules() if name.startswith("_folded")]
    assert len(fused) == 3 and not any(m in modules for m in fused)
    seen = []
    handle = net.stem[0].register_forward_hook(lambda m, a, o: seen.append(m))
    try:  # the folded convolutions share no hook registry with the model's
        f(x)
    finally:
        handle.remove()
    assert seen == []


@pytest.mark.parametrize("method", ["layer", "neuron", "gradient"])
def test_results_equal_the_unfolded_model(monkeypatch, method):
    net = _net()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)

    def run():
        if method == "layer":
            return LayerConductance(net, net.block1).attribute(x, target=1, n_steps=8)
        if method == "neuron":
            return NeuronConductance(net, net.block1).attribute(x, (2, 3, 4), target=1, n_steps=8)
        return NeuronGradient(net, net.block1).attribute(x, (2, 3, 4))

    got = run()
    _unfolded(monkeypatch)
    want = run()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["conv", "norm"])
def test_a_chosen_convolution_or_batch_norm_is_not_folded(which):
    """The layer's own output is what the user asked about: a conv followed by a batch norm
    keeps its output when it is the layer (and so does the batch norm)."""
    net = _net()
    layer = net.stem[0] if which == "conv" else net.stem[1]
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    try:
        net(x)
        folded(net, [layer])(x)
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    f = folded(net, [layer])
    assert _norms_run(f) == 1  # the stem's batch norm, kept; both blocks folded


def test_a_convolution_output_used_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head((self.bn(y) + y).mean((2, 3)))

    net = Twice().double().eval()
    with torch.no_grad():
        net.bn.running_mean.fill_(0.3)
    assert folded(net, [net.head]) is net  # nothing folded: the model runs as it is


def test_training_mode_and_untraceable_models_run_as_they_are():
    net = _net().train()
    assert folded(net, [net.block1]) is net
    net.eval()
    net.block1.bn1.train()  # one batch norm in training mode: it runs as it is
    f = folded(net, [net.block2])
    assert _norms_run(f) == 3  # block1's bn1 and block2's two
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(f(x), net(x), rtol=0, atol=1e-12)

    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = x * 2
            return super().forward(x)

    torch.manual_seed(0)
    branchy = Branchy().double().eval()
    assert folded(branchy, [branchy.block1]) is branchy
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    LayerConductance(branchy, branchy.block1).attribute(x, target=0, n_steps=4)  # still runs


def test_changed_weights_or_hooks_fold_again():
    net = _net()
    f = folded(net, [net.block2])
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        net.block1.bn1.running_var.mul_(4.0)
    g = folded(net, [net.block2])
    assert g is not f and torch.allclose(g(x), net(x), rtol=0, atol=1e-12)
    assert not torch.allclose(f(x), net(x))  # the old copy no longer matches the model

    calls = []
    handle = net.block1.conv2.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        h = folded(net, [net.block2])
        h(x)
        assert calls == [1]  # a hooked module stays whole, and its hook fires
        assert _norms_run(h) == 3  # block1's bn2 now runs after its hooked conv
    finally:
        handle.remove()


def test_float32_results_stay_within_rounding_of_the_unfolded_model(monkeypatch):
    net = _net(torch.float32)
    x = torch.rand(2, 3, 8, 8)
    got = LayerConductance(net, net.block2).attribute(x, target=3, n_steps=16)
    _unfolded(monkeypatch)
    want = LayerConductance(net, net.block2).attribute(x, target=3, n_steps=16)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_the_folded_copy_does_not_keep_the_model_alive():
    import gc
    import weakref

    from explainer import folding

    gc.collect()
    held = len(folding._FOLDED)  # other tests' models may still be alive
    net = _net()
    alive = weakref.ref(net)
    assert isinstance(folded(net, [net.block2]), fx.GraphModule)
    assert len(folding._FOLDED) == held + 1
    del net
    gc.collect()
    assert alive() is None and len(folding._FOLDED) == held


def test_threads_sharing_a_model_get_their_solo_results():
    """Four threads, four layers of one resnet18, three calls each: no error, and each result
    equal to the same call alone (a call run unfolded would differ by float rounding, up to
    1e-3 relative on small cells)."""
    import torchvision
    from test_attribution import layer_conductance_in_threads

    from explainer import folding

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64)
    jobs = [(net.layer1, 0), (net.layer2, 1), (net.layer3, 2), (net.layer4, 3)]
    solo = [LayerConductance(net, layer).attribute(x, target=t, n_steps=4) for layer, t in jobs]
    folding._FOLDED.clear()
    results = layer_conductance_in_threads(net, jobs, x, n_steps=4)
    for i, expected in enumerate(solo):
        for got in results[i]:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


class Pause(nn.Module):
    """Passes its input on; while it is traced, lets another thread run the model first."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.tracing, self.resume = threading.Event(), threading.Event()

    def forward(self, x):
        if isinstance(x, fx.Proxy):
            self.tracing.set()
            assert self.resume.wait(10)
        return x


def test_a_model_runs_as_usual_in_another_thread_while_it_is_traced():
    """Tracing patches every module's call and attribute lookup in the process: the tracer hands
    other threads' calls to the module as they are (without that, the other thread's forward
    returned a Proxy and the trace failed)."""
    import threading

    net = _net()
    net.pause = Pause()
    net.block1 = nn.Sequential(net.pause, net.block1)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
    got: list[object] = []

    def other() -> None:
        assert net.pause.tracing.wait(10)
        try:
            with torch.no_grad():
                got.append(net(x))
        except Exception as exc:  # noqa: BLE001 - reported below
            got.append(exc)
        finally:
            net.pause.resume.set()

    thread = threading.Thread(target=other)
    thread.start()
    copy = folded(net, [net.block2])
    thread.join()
    assert isinstance(got[0], torch.Tensor), got
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    assert isinstance(copy, fx.GraphModule) and _norms_run(copy) == 2
    torch.testing.assert_close(copy(x), want, rtol=0, atol=1e-12)


def test_hooks_of_other_threads_calls_leave_the_copy_as_it_is():
    """The engine's hooks act for their own thread only: a call's copy is the same, and folds
    the same pairs, while another thread's tap sits on a convolution."""
    from explainer.hooks import tap_layers

    net = _net()
    alone = folded(net, [net.block2])
    seen: list[object] = []

    def other() -> None:
        with tap_layers([net.block1.conv1], ["block1.conv1"], mode="root"):
            seen.append(folded(net, [net.block2]))

    import threading

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [alone] and _norms_run(alone) == 2  # block2's, chosen
    user = net.block1.conv1.register_forward_hook(lambda m, a, o: None)
    try:  # a hook of the user's acts for every thread: its module stays whole
        assert _norms_run(folded(net, [net.block2])) == 3
    finally:
        user.remove()


def test_copies_for_other_layers_share_the_folded_convolutions():
    net = _net()
    a, b = folded(net, [net.block2]), folded(net, [net.block1])
    assert a is not b
    shared = {id(m) for n, m in a.named_modules() if n.startswith("_folded")}
    assert shared & {id(m) for n, m in b.named_modules() if n.startswith("_folded")}
    assert folded(net, [net.block2]) is a  # both kept


def test_folding_can_be_switched_off(monkeypatch):
    net = _net()
    monkeypatch.setenv("EXPLAINER_FOLD_BATCH_NORM", "0")
    assert folded(net, [net.block2]) is net
    monkeypatch.delenv("EXPLAINER_FOLD_BATCH_NORM")
    assert isinstance(folded(net, [net.block2]), fx.GraphModule)


class Flagged(Net):
    """Reads a plain flag in forward: the traced graph takes it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.double_it = False

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if self.double_it else y


def _check_matches(net, x) -> nn.Module:
    copy = folded(net, [net.block2])
    torch.testing.assert_close(copy(x), net(x), rtol=0, atol=1e-12)
    return copy


@pytest.mark.parametrize(
    "change",
    ["swap a module without weights", "assign .data", "a batch norm's eps", "a plain flag"],
)
def test_every_change_the_graph_depends_on_traces_again(change):
    torch.manual_seed(0)
    net = _net()
    flagged = Flagged().double().eval()
    flagged.load_state_dict(net.state_dict())
    net = flagged
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    first = _check_matches(net, x)
    with torch.no_grad():
        if change == "swap a module without weights":
            net.stem[2] = nn.Tanh()
        elif change == "assign .data":
            net.block1.bn1.weight.data = net.block1.bn1.weight.data * 3
        elif change == "a batch norm's eps":
            net.block1.bn1.eps = 0.5
        else:
            net.double_it = True
    assert not torch.allclose(first(x), net(x))
    assert _check_matches(net, x) is not first


class Storing(Net):
    def forward(self, x):
        self.last_input_shape = x.shape[0]  # a traced value stored on the model
        return super().forward(x)


def test_a_model_that_stores_a_traced_value_on_itself_runs_as_it_is():
    net = Storing().double().eval()
    net.last_input_shape = 7
    assert folded(net, [net.block2]) is net
    assert net.last_input_shape == 7  # not left a Proxy
    fresh = Storing().double().eval()
    assert folded(fresh, [fresh.block2]) is fresh and "last_input_shape" not in vars(fresh)


def test_a_hook_on_every_module_keeps_the_model_whole_unless_marked():
    import threading

    from torch.nn.modules.module import register_module_forward_hook

    from explainer.compute.tasks import cancellable

    net = _net()
    handle = register_module_forward_hook(lambda m, a, o: None)
    try:  # a user's hook on every module would miss the batch norms folded away
        assert folded(net, [net.block2]) is net
    finally:
        handle.remove()
    with cancellable(threading.Event()):  # the workers' cancellation check runs on every module
        assert isinstance(folded(net, [net.block2]), fx.GraphModule)


def test_the_tracer_passes_calls_through_once_its_trace_is_over():
    """Overlapping fx traces in two threads can leave one tracer's patch of Module.__call__ in
    place; the calls it then sees must reach their modules."""
    from explainer.folding import _Tracer

    net = _net()
    tracer = _Tracer(set())
    tracer.trace(net)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    out = tracer.call_module(net.stem[0], lambda *a: net.stem[0].forward(*a), (x,), {})
    assert isinstance(out, torch.Tensor)
    assert tracer.getattr("weight", net.stem[0].weight, {}) is net.stem[0].weight
