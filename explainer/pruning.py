"""Token rows a model never reads, left out of its traced copy.

A vision transformer classifies from its class token: ``x[:, 0]`` after the last encoder block.
Of that block, only the keys and values need every token; its attention query, attention
output, MLP and residual sums are read for the first token alone. Computed for one token
instead of all of them, the last block of torchvision's ``vit_b_16`` costs about a quarter of
its forward pass and a sixth of its backward pass, for the same results up to float rounding.

:func:`first_token_only` rewrites a traced graph in place. It works backwards from each
``x[:, 0]`` of a tensor of rank 3 or more: a node whose every user reads only token 0 of
dimension 1 is computed for that token only, where the node acts on each token apart
(``Linear``, ``LayerNorm`` over trailing dimensions, activations, dropout in evaluation mode,
sums and products) or is a batch-first ``MultiheadAttention`` called without masks or weights
(its query alone is cut; keys and values keep every token). The ranks and sizes come from one
run of the graph on an example of two rows (so that a size of one is not taken for the batch),
and the rewritten graph must give that example's output again (to 1e-5 of its largest value)
or the rewrite is undone. A graph with an in-place operation anywhere, or with a module in
training mode, is left whole; the example runs leave the random streams as they were. Modules
in ``whole`` (the chosen layers and hooked modules) are never cut: they see every token.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["first_token_only"]

# Modules that act on each position of the trailing dimension(s) apart; exact types only (a
# subclass may do anything in its forward).
_PER_TOKEN_MODULES = (
    nn.Linear,
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,  # graphs with a module in training mode are left whole
)
_ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul)
_FIRST = (slice(None, None, None), 0)


def _rank(node: Any) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _size(node: fx.Node, dim: int) -> int:
    return node.meta["tensor_meta"].shape[dim]


def _is_first_token(node: fx.Node, ranked: bool = True) -> bool:
    """``x[:, 0]`` of a tensor whose dimension 1 is not its last (with ``ranked=False``,
    before ranks are known: of any tensor)."""
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and len(node.args) == 2
        and node.args[1] == _FIRST
        and (not ranked or (_rank(node.args[0]) or 0) >= 3)
    )


def _attention(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A batch-first self-attention call without masks, whose weights nobody reads."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if type(module) is not nn.MultiheadAttention or not module.batch_first:
        return False
    if len(node.args) != 3 or set(node.kwargs) - {"need_weights"}:
        return False
    if node.kwargs.get("need_weights", True) is not False:
        return False
    if any(_rank(a) != 3 for a in node.args):
        return False
    return all(
        u.op == "call_function"
        and u.target is operator.getitem
        and u.args[1] in (0, 1)
        and (u.args[1] == 0 or not u.users)
        for u in node.users
    )


def _per_token(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` computes each token (index of dimension 1) from that token alone."""
    rank = _rank(node)
    if rank is None or rank < 3:
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        if getattr(module, "inplace", False):
            return False
        if type(module) in _PER_TOKEN_MODULES:
            return True
        if type(module) is nn.LayerNorm:
            return len(module.normalized_shape) <= rank - 2
        return False
    if node.op == "call_function" and node.target in _ELEMENTWISE:
        if node.kwargs:
            return False
        for arg in node.args:
            if isinstance(arg, fx.Node):
                r = _rank(arg)
                # an operand that broadcasts over dimension 1 is left as it is; one of rank
                # ``rank - 1`` would meet dimension 1 with its first dimension
                if r is None or (r == rank - 1 and _size(arg, 0) != 1) or r > rank:
                    return False
            elif not isinstance(arg, (int, float, bool)):
                return False
        return True
    if (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and node.args[1] == 0
    ):  # the output of an attention call
        return _attention(node.args[0], modules)
    return False


def _wants_first(user: fx.Node, node: fx.Node, cut: set[fx.Node], queries: set[fx.Node]) -> bool:
    """Whether ``user`` reads only token 0 of ``node``."""
    if _is_first_token(user) and user.args[0] is node:
        return True
    if user not in cut:
        return False
    if user in queries:  # a cut attention call: its query alone is cut
        return user.args[0] is node and node not in user.args[1:]
    # a per-token user; ``node`` has its tokens along dimension 1 only if it has its rank
    # and number of tokens (otherwise it is broadcast over them and read whole)
    return _rank(node) == _rank(user) and _size(node, 1) == _size(user, 1)


def _mark(
    graph: fx.Graph, modules: dict[str, nn.Module], whole: set[int]
) -> tuple[set[fx.Node], set[fx.Node]]:
    """The nodes to compute for token 0 alone, and the attention calls among them."""
    cut: set[fx.Node] = set()
    queries: set[fx.Node] = set()
    for node in reversed(graph.nodes):  # every user of a node is seen before the node
        if node.op not in ("call_module", "call_function") or not node.users:
            continue
        if node.op == "call_module" and id(modules.get(node.target)) in whole:
            continue
        if _attention(node, modules):
            readers = [u for u in node.users if u.args[1] == 0]
            if readers and all(u in cut for u in readers):
                cut.add(node)
                queries.add(node)
        elif _per_token(node, modules) and all(
            _wants_first(u, node, cut, queries) for u in node.users
        ):
            cut.add(node)
    return cut, queries


def _insert_cuts(graph: fx.Graph, cut: set[fx.Node], queries: set[fx.Node]) -> int:
    """Feed every cut node the first token of its operands that are not cut themselves (the
    query alone of an attention call); operands that broadcast over the tokens stay whole."""
    slices: dict[fx.Node, fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        if node not in cut or node.target is operator.getitem:
            continue
        args = list(node.args)
        for i, arg in enumerate(args):
            if not isinstance(arg, fx.Node) or arg in cut or (node in queries and i != 0):
                continue
            if node not in queries and (_rank(arg) != _rank(node) or _size(arg, 1) == 1):
                continue  # broadcast over the tokens
            if arg not in slices:
                with graph.inserting_after(arg):
                    slices[arg] = graph.call_function(
                        operator.getitem, (arg, (slice(None, None, None), slice(0, 1, None)))
                    )
            args[i] = slices[arg]
            count += 1
        node.args = tuple(args)
    return count


def _untouched_random(example: tuple) -> Any:
    """The random streams of the example's devices as they were, after the example runs."""
    devices = sorted(
        {t.device.index or 0 for t in example if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    return torch.random.fork_rng(devices=devices)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        scale = float(a.abs().max()) if a.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(scale, 1e-12)))
    return False


_IN_PLACE = (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
)


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into a tensor it is given (a cut would hand it a view of
    part of that tensor, and autograd may have saved one)."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (
            node.target in _IN_PLACE
            or node.kwargs.get("inplace") is True
            or (name.endswith("_") and not name.endswith("__"))
        )
    return False


def first_token_only(traced: fx.GraphModule, whole: set[int], example: tuple) -> bool:
    """Rewrite ``traced`` (see the module's text) so that nodes whose every reader takes only
    token 0 are computed for that token; ``example`` is two rows of every input. Whether
    anything was cut (``traced`` is left as it was otherwise)."""
    graph = traced.graph
    if not any(_is_first_token(n, ranked=False) for n in graph.nodes):
        return False
    modules = dict(traced.named_modules())
    called = [modules[n.target] for n in graph.nodes if n.op == "call_module"]
    if any(m.training for c in called for m in c.modules()) or any(
        _in_place(n, modules) for n in graph.nodes
    ):  # (fx's new container modules of the copy are left in training mode: not called)
        return False
    try:
        with _untouched_random(example), torch.no_grad():
            expected = ShapeProp(traced).propagate(*example)
    except Exception:  # noqa: BLE001 - a graph that cannot run on the example is left whole
        return False
    cut, queries = _mark(graph, modules, whole)
    if not cut:
        return False
    before = {n: n.args for n in graph.nodes}
    if _insert_cuts(graph, cut, queries) == 0:
        return False
    graph.lint()
    traced.recompile()
    try:
        with _untouched_random(example), torch.no_grad():
            found = traced(*example)
        agrees = _same(expected, found)
    except Exception:  # noqa: BLE001 - the rewrite is undone below
        agrees = False
    if not agrees:
        for node in list(graph.nodes):
            if node in before:
                node.args = before[node]
        for node in [n for n in graph.nodes if n not in before]:
            graph.erase_node(node)
        graph.lint()
        traced.recompile()
    return agrees
