"""The module tree: every named module of a model, what it outputs, and where conductance works.

:func:`module_tree` runs one probe forward pass with temporary forward hooks and records, for
each module, the shapes it produced and how often it ran. A module qualifies for layer
conductance when its forward ran exactly once and returned a floating-point tensor (or a
tuple/list of them); every other module carries a ``reason`` a user can read. The tree also
suggests a handful of layers worth looking at first.

The probe leaves the model exactly as it found it: hooks are removed and training flags restored
in ``finally`` blocks, also when the forward pass fails.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from explainer.errors import AttributionError, AttributionTypeError
from explainer.hooks import lone_tensor_index, thread_bound

__all__ = [
    "MAX_SUGGESTED",
    "ORIGINAL_TYPE",
    "ModuleNode",
    "ModuleTree",
    "get_module",
    "module_tree",
    "type_name",
]

#: Most layers :attr:`ModuleTree.suggested` lists.
MAX_SUGGESTED = 8

NOT_REACHED = "not reached by the forward pass"

ORIGINAL_TYPE = "_explainer_original_type"
"""Attribute naming a module's original class when the module was rebuilt from a program (a
``.pt2`` file's modules are all ``InterpreterModule``); :func:`type_name` shows it."""


def type_name(module: nn.Module) -> str:
    """The class name to show for ``module``: its original class for a rebuilt module."""
    original = module.__dict__.get(ORIGINAL_TYPE)
    return original if isinstance(original, str) and original else type(module).__name__


@dataclass
class ModuleNode:
    """One named module of a model, as seen during the probe forward pass.

    Attributes
    ----------
    name : str
        Dotted name as in ``model.named_modules()``; ``""`` for the model itself.
    type : str
        Class name, e.g. ``"Conv2d"``.
    depth : int
        0 for the model, 1 for its direct children, and so on.
    parent : str or None
        Name of the enclosing module; ``None`` for the model itself.
    children : list[str]
        Names of the direct child modules.
    output_shapes : list[tuple[int, ...]]
        One shape per output tensor of the (first) call; empty when it did not run or
        returned something other than tensors.
    num_params : int
        Parameters of the module and all its descendants.
    num_calls : int
        How often its forward ran in the probe.
    usable : bool
        Whether layer conductance can be computed at its output.
    reason : str
        Why it is not usable; empty when it is.
    is_leaf : bool
        Whether it has no child modules.
    """

    name: str
    type: str
    depth: int
    parent: str | None
    children: list[str]
    output_shapes: list[tuple[int, ...]]
    num_params: int
    num_calls: int
    usable: bool
    reason: str
    is_leaf: bool


@dataclass
class ModuleTree:
    """All named modules of a model plus the layers worth exploring first.

    Attributes
    ----------
    nodes : dict[str, ModuleNode]
        Every named module, in ``named_modules()`` order (the model itself first, as ``""``).
    suggested : list[str]
        Up to :data:`MAX_SUGGESTED` good layers for conductance, in execution order.
    execution_order : list[str]
        Names in the order their forward first finished during the probe.
    input_shapes : list[tuple[int, ...]]
        Shapes of the example input(s) the probe used.
    """

    nodes: dict[str, ModuleNode]
    suggested: list[str] = field(default_factory=list)
    execution_order: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def root(self) -> ModuleNode:
        """The node of the model itself."""
        return self.nodes[""]

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def __getitem__(self, name: str) -> ModuleNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise AttributionError(_unknown_name_message(name, list(self.nodes))) from None

    def search(self, query: str) -> list[str]:
        """Names whose name or class name contains ``query`` (case-insensitive).

        An empty query matches every module. Results keep ``named_modules()`` order.
        """
        needle = query.strip().lower()
        return [
            name
            for name, node in self.nodes.items()
            if needle in name.lower() or needle in node.type.lower()
        ]

    def usable_names(self, *, include_root: bool = False) -> list[str]:
        """Names of the modules where conductance can be computed, in ``named_modules()`` order.

        Parameters
        ----------
        include_root : bool
            Also list the model itself (``""``) when its output qualifies.
        """
        return [
            name
            for name, node in self.nodes.items()
            if node.usable and (include_root or name != "")
        ]


# --------------------------------------------------------------------------- lookup


def _unknown_name_message(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, [n for n in names if n], n=3, cutoff=0.6)
    hint = (
        "Did you mean " + ", ".join(repr(c) for c in close) + "?"
        if close
        else "Pick a name from the module tree (dotted, e.g. 'layer1.0.conv1')."
    )
    return f"The model has no module named {name!r}. {hint}"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (``""`` is the model itself).

    Raises
    ------
    AttributionError
        No such module; the message names the closest existing names.
    AttributionTypeError
        ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise AttributionTypeError(
            f"A layer is named by a dotted string such as 'layer1.0', got {type(name).__name__}."
        )
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        raise AttributionError(_unknown_name_message(name, names)) from None


# --------------------------------------------------------------------------- probe


@dataclass
class _Record:
    calls: int = 0
    started: int | None = None
    finished: int | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    problem: str = ""


def _describe_output(output: Any) -> tuple[list[tuple[int, ...]], str]:
    """Shapes of an output's tensors, and why it cannot carry conductance ('' when it can)."""
    lone = lone_tensor_index(output)
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif lone is not None:
        # One tensor next to sizes or None (an exported program's submodule, an attention
        # block): the tensor is what is explained.
        tensors = [output[lone]]
    elif isinstance(output, (tuple, list)):
        kind = type(output).__name__
        if len(output) == 0:
            return [], f"output is an empty {kind}, not tensors"
        others = sorted({type(o).__name__ for o in output if not isinstance(o, torch.Tensor)})
        if others:
            shapes = [tuple(o.shape) for o in output if isinstance(o, torch.Tensor)]
            found = ", ".join("None" if o == "NoneType" else o for o in others)
            if len(shapes) > 1:
                return shapes, (
                    f"output is a {kind} of {len(shapes)} tensors next to {found}; only one "
                    "tensor (or tensors only) can be explained, so choose one of its sub-layers"
                )
            return shapes, f"output is a {kind} containing {found}, not only tensors"
        tensors = list(output)
    elif output is None:
        return [], "output is None, not tensors"
    else:
        return [], f"output is a {type(output).__name__}, not tensors"
    shapes = [tuple(int(s) for s in t.shape) for t in tensors]
    not_float = sorted({str(t.dtype) for t in tensors if not t.is_floating_point()})
    if not_float:
        return shapes, f"output has dtype {', '.join(not_float)}, not floating point"
    return shapes, ""


def _as_inputs(example_input: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if (
        isinstance(example_input, (tuple, list))
        and example_input
        and all(isinstance(t, torch.Tensor) for t in example_input)
    ):
        return tuple(example_input)
    raise AttributionTypeError(
        "The example input must be a tensor (e.g. shaped (1, 3, 224, 224)) or a tuple of "
        f"tensors, got {type(example_input).__name__}."
    )


def _shape_text(inputs: Sequence[torch.Tensor]) -> str:
    shapes = [tuple(t.shape) for t in inputs]
    return str(shapes[0]) if len(shapes) == 1 else ", ".join(str(s) for s in shapes)


def module_tree(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> ModuleTree:
    """Probe ``model`` once on ``example_input`` and describe every named module.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; it is left unchanged (no hooks left behind, training flags restored). Modules
        in training mode are switched to eval mode for the probe so that e.g. batch-norm
        statistics are not updated.
    example_input : torch.Tensor or sequence of torch.Tensor
        Input(s) for one forward pass, already on the model's device, e.g. ``(1, 3, H, W)``.

    Returns
    -------
    ModuleTree

    Raises
    ------
    AttributionError
        The forward pass failed on the example input.
    AttributionTypeError
        ``model`` is not a module or ``example_input`` is not a tensor.
    """
    if not isinstance(model, nn.Module):
        raise AttributionTypeError(
            f"module_tree needs a torch.nn.Module, got {type(model).__name__}."
        )
    inputs = _as_inputs(example_input)

    named = list(model.named_modules())
    records: dict[int, _Record] = {id(module): _Record() for _, module in named}
    counter = [0]
    probe_thread = threading.get_ident()

    def pre_hook(module: nn.Module, args: Any) -> None:
        # Hooks are global to the module; ignore forwards run by other threads meanwhile.
        if threading.get_ident() != probe_thread:
            return
        record = records[id(module)]
        if record.started is None:
            record.started = counter[0]
            counter[0] += 1

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != probe_thread:
            return
        record = records[id(module)]
        record.calls += 1
        if record.calls == 1:
            record.shapes, record.problem = _describe_output(output)
            record.finished = counter[0]
            counter[0] += 1

    training = {id(module): module.training for _, module in named}
    handles = []
    try:
        for _, module in named:
            handles.append(module.register_forward_pre_hook(thread_bound(pre_hook)))
            handles.append(module.register_forward_hook(thread_bound(post_hook)))
        if any(training.values()):
            model.eval()
        with torch.no_grad():
            try:
                model(*inputs)
            except Exception as exc:
                raise AttributionError(
                    f"The model's forward pass failed on the example input of shape "
                    f"{_shape_text(inputs)}: {type(exc).__name__}: {exc}. Check that the input "
                    "size, channel count and device match what the model expects."
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for _, module in named:
            module.training = training[id(module)]

    nodes: dict[str, ModuleNode] = {}
    names = [name for name, _ in named]
    children_of: dict[str, list[str]] = {name: [] for name in names}
    for name in names[1:]:
        parent = name.rpartition(".")[0]
        if parent in children_of:
            children_of[parent].append(name)
    for name, module in named:
        record = records[id(module)]
        if record.calls == 0:
            reason = NOT_REACHED
        elif record.calls > 1:
            reason = f"called {record.calls} times in one forward pass (a reused module)"
        else:
            reason = record.problem
        nodes[name] = ModuleNode(
            name=name,
            type=type_name(module),
            depth=0 if name == "" else name.count(".") + 1,
            parent=None if name == "" else name.rpartition(".")[0],
            children=children_of[name],
            output_shapes=list(record.shapes),
            num_params=sum(p.numel() for p in module.parameters()),
            num_calls=record.calls,
            usable=reason == "",
            reason=reason,
            is_leaf=next(iter(module.children()), None) is None,
        )

    finished = sorted(
        (records[id(m)].finished, name) for name, m in named if records[id(m)].finished is not None
    )
    started = {name: records[id(m)].started for name, m in named}
    execution_order = [name for _, name in finished]
    input_shapes = [tuple(int(s) for s in t.shape) for t in inputs]
    tree = ModuleTree(nodes=nodes, execution_order=execution_order, input_shapes=input_shapes)
    tree.suggested = _suggest(tree, started)
    return tree


# --------------------------------------------------------------------------- suggestions


def _spatial(node: ModuleNode, input_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (H, W) of a module's single 4-D output when it looks like an NCHW feature map."""
    if len(node.output_shapes) != 1 or len(node.output_shapes[0]) != 4:
        return None
    height, width = node.output_shapes[0][2:]
    if (height, width) == (1, 1):
        return None  # pooled: no spatial layout left to show
    if input_hw is not None:
        in_h, in_w = input_hw
        # Channels-last tensors inside blocks (N, H, W, C) would show (W, C): skip shapes that
        # are larger than the input or whose aspect ratio does not follow the input's.
        if height > in_h or width > in_w:
            return None
        if abs(height * in_w - width * in_h) > max(in_h, in_w):
            return None
    return height, width


def _block_stacks(tree: ModuleTree) -> list[list[str]]:
    """Containers of two or more children of one class whose outputs are token sequences."""
    stacks = []
    for node in tree.nodes.values():
        kids = [tree.nodes[c] for c in node.children]
        if len(kids) < 2 or len({k.type for k in kids}) != 1:
            continue
        if all(
            k.usable and len(k.output_shapes) == 1 and len(k.output_shapes[0]) == 3 for k in kids
        ):
            stacks.append([k.name for k in kids])
    return stacks


def _spread(items: list[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items``, always keeping the first and the last."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


def _suggest(tree: ModuleTree, started: dict[str, int | None]) -> list[str]:
    order = {name: i for i, name in enumerate(tree.execution_order)}
    candidates = [
        tree.nodes[name] for name in tree.execution_order if name != "" and tree.nodes[name].usable
    ]
    first_input = tree.input_shapes[0] if tree.input_shapes else ()
    input_hw = (first_input[2], first_input[3]) if len(first_input) == 4 else None

    picks: set[str] = set()
    # One layer per spatial resolution: the shallowest module producing it, the last such to run
    # (a stage container rather than a layer deep inside one of its blocks).
    by_resolution: dict[tuple[int, int], ModuleNode] = {}
    for node in candidates:
        hw = _spatial(node, input_hw)
        if hw is None:
            continue
        best = by_resolution.get(hw)
        if best is None or (node.depth, -order[node.name]) <= (best.depth, -order[best.name]):
            by_resolution[hw] = node
    picks.update(node.name for node in by_resolution.values())

    # Transformers keep one resolution: take blocks of each repeated stack at a few depths.
    for stack in _block_stacks(tree):
        picks.update(_spread(stack, 4))

    # The last usable module before the classifier head.
    before_head = _before_classifier(tree, candidates, started)
    if before_head is not None:
        picks.add(before_head)

    ordered = sorted(picks, key=order.__getitem__)
    if len(ordered) > MAX_SUGGESTED:
        ordered = _spread(ordered, MAX_SUGGESTED)
        if before_head is not None and before_head not in ordered:
            ordered[-1] = before_head
    return ordered


def _is_flat(shape: tuple[int, ...]) -> bool:
    """Whether a shape is (N, F) or (N, F, 1, ..., 1): one vector per sample, no layout."""
    return all(size == 1 for size in shape[2:])


def _classifier_head(tree: ModuleTree) -> ModuleNode | None:
    """The module that maps features to the model's output, e.g. 'fc' or 'classifier'.

    Starts at the last leaf to run, which must produce the model's output shape, and climbs to
    enclosing modules with that output as long as everything inside them works on flat vectors
    (so a wrapper around the whole network is not mistaken for the head).
    """
    root = tree.root
    if not root.usable or len(root.output_shapes) != 1:
        return None
    leaves = [n for n in tree.execution_order if n and tree.nodes[n].is_leaf]
    if not leaves or tree.nodes[leaves[-1]].output_shapes != root.output_shapes:
        return None
    head = tree.nodes[leaves[-1]]
    while head.parent:  # never climb to the model itself
        parent = tree.nodes[head.parent]
        inside = [tree.nodes[n] for n in tree.nodes if n.startswith(parent.name + ".")]
        if parent.output_shapes != root.output_shapes or not all(
            _is_flat(shape) for node in inside for shape in node.output_shapes
        ):
            break
        head = parent
    return head


def _before_classifier(
    tree: ModuleTree, candidates: list[ModuleNode], started: dict[str, int | None]
) -> str | None:
    """Name of the last usable module to finish before the classifier head starts."""
    head = _classifier_head(tree)
    if head is None or started[head.name] is None:
        return None
    head_start = started[head.name]
    enclosing = _ancestors(head.name)
    best = None
    # Candidates are in finish order: keep the last one that ran before the head began.
    for node in candidates:
        begun = started[node.name]
        if begun is not None and begun < head_start and node.name not in enclosing:
            best = node.name
    return best


def _ancestors(name: str) -> set[str]:
    out = {""}
    while name:
        name = name.rpartition(".")[0]
        out.add(name)
    return out
