"""Normalising and checking the arguments of the attribution methods.

Inputs, baselines, targets and extra forward arguments arrive in the many shapes that
Captum accepts; these helpers turn them into one canonical form and reject what cannot
work with a sentence the user can act on, before any expensive pass starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from explainer.errors import AttributionError, AttributionIndexError, AttributionTypeError

__all__ = [
    "BaselineType",
    "TargetType",
    "as_input_tuple",
    "format_baselines",
    "format_additional_args",
    "repeat_additional_args",
    "check_target",
    "repeat_target",
    "select_target",
    "dense_baselines",
    "take_additional_args",
    "take_target",
]

TargetType = None | int | tuple | Tensor | list
BaselineType = None | int | float | Tensor | tuple


def as_input_tuple(inputs: Tensor | tuple[Tensor, ...], what: str = "inputs") -> tuple[Tensor, ...]:
    """Return ``inputs`` as a non-empty tuple of tensors that share the example dimension."""
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    if not items:
        raise AttributionError(f"{what} is an empty tuple; pass at least one tensor.")
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            raise AttributionTypeError(
                f"{what}[{i}] is a {type(item).__name__}; every input must be a torch.Tensor."
            )
        if item.dim() == 0:
            raise AttributionError(
                f"{what}[{i}] is a 0-d tensor; inputs need a leading example dimension "
                "(use x.unsqueeze(0) for a single example)."
            )
    n = items[0].shape[0]
    for i, item in enumerate(items[1:], start=1):
        if item.shape[0] != n:
            raise AttributionError(
                f"{what}[{i}] has {item.shape[0]} examples but {what}[0] has {n}; "
                "all input tensors must share dimension 0."
            )
    return items


def format_baselines(
    baselines: BaselineType, inputs: tuple[Tensor, ...]
) -> tuple[Tensor | int | float, ...]:
    """One baseline per input: ``None`` means zeros; scalars and batch-1 tensors broadcast."""
    if baselines is None:
        return tuple(0 for _ in inputs)
    items = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(items) != len(inputs):
        raise AttributionError(
            f"Got {len(items)} baseline(s) for {len(inputs)} input tensor(s); give one baseline "
            "(a scalar or a tensor) per input tensor."
        )
    for i, (inp, base) in enumerate(zip(inputs, items, strict=True)):
        if isinstance(base, bool) or not isinstance(base, (int, float, Tensor)):
            raise AttributionTypeError(
                f"Baseline {i} is a {type(base).__name__}; use a number or a tensor."
            )
        if isinstance(base, Tensor):
            if base.dim() == 0:
                continue
            full = tuple(base.shape) == tuple(inp.shape)
            single = (
                base.dim() == inp.dim() and base.shape[0] == 1 and base.shape[1:] == inp.shape[1:]
            )
            if not (full or single):
                raise AttributionError(
                    f"Baseline {i} has shape {tuple(base.shape)} but its input has shape "
                    f"{tuple(inp.shape)}; give a baseline of the input's shape, of shape "
                    f"{(1, *tuple(inp.shape[1:]))}, or a scalar."
                )
    return items


def dense_baselines(
    baselines: tuple[Tensor | int | float, ...], inputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Baselines as full tensors with the inputs' shape, dtype and device."""
    out = []
    for inp, base in zip(inputs, baselines, strict=True):
        if isinstance(base, Tensor):
            out.append(base.to(device=inp.device, dtype=inp.dtype).expand_as(inp))
        else:
            out.append(torch.full_like(inp, base))
    return tuple(out)


def format_additional_args(args: Any) -> tuple[Any, ...] | None:
    """Extra forward arguments as a tuple (``None`` stays ``None``)."""
    if args is None:
        return None
    return args if isinstance(args, tuple) else (args,)


def repeat_additional_args(args: tuple[Any, ...] | None, times: int) -> tuple[Any, ...] | None:
    """Repeat every tensor argument with an example dimension ``times`` along dimension 0.

    The path batch is laid out step-major (all examples at the first point, then all at the
    second, ...), so plain concatenation lines each extra argument up with its example.
    """
    if args is None or times == 1:
        return args
    return tuple(
        torch.cat([a] * times, dim=0) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args
    )


def _check_int(value: Any, size: int, where: str) -> None:
    if not -size <= int(value) < size:
        raise AttributionIndexError(
            f"Target index {int(value)} is out of range for {where} of size {size}; "
            f"choose an index from 0 to {size - 1}."
        )


def check_target(target: TargetType, output_shape: Sequence[int], num_examples: int) -> None:
    """Reject a target that does not address one number per example of an output of this shape.

    ``output_shape`` is the shape of the model output for ``num_examples`` examples.
    """
    shape = tuple(output_shape)
    rest = shape[1:]
    scores = f"the model output of shape {shape}"
    if target is None:
        if any(s != 1 for s in rest):
            hint = (
                "pass target=<class index>"
                if len(rest) == 1
                else f"pass target as a tuple of {len(rest)} indices"
            )
            raise AttributionError(
                f"No target given, but {scores} holds {int(torch.tensor(rest).prod())} numbers per "
                f"example; {hint} to say which one to explain."
            )
        return
    if isinstance(target, bool):
        raise AttributionTypeError(
            "target must be an int, a tuple, a list or a tensor, not a bool."
        )
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise AttributionTypeError(
                f"A target tensor must hold integer class indices, not {target.dtype} values."
            )
        if target.numel() == 1:
            check_target(int(target.item()), shape, num_examples)
            return
        if target.dim() != 1 or target.numel() != num_examples:
            raise AttributionError(
                f"A target tensor must hold one index or one index per example ({num_examples}); "
                f"got shape {tuple(target.shape)}."
            )
        check_target([int(t) for t in target.tolist()], shape, num_examples)
        return
    if isinstance(target, int):
        if len(rest) != 1:
            raise AttributionError(
                f"target={target} is a single index but {scores} needs {len(rest)} index(es) per "
                f"example; pass a tuple of {len(rest)} ints."
            )
        _check_int(target, rest[0], "the output's class dimension")
        return
    if isinstance(target, tuple):
        if len(target) != len(rest):
            raise AttributionError(
                f"target {target} has {len(target)} index(es) but {scores} needs exactly "
                f"{len(rest)} per example."
            )
        for dim, (t, size) in enumerate(zip(target, rest, strict=True), start=1):
            if not isinstance(t, int) or isinstance(t, bool):
                raise AttributionTypeError(f"target {target} must contain only ints.")
            _check_int(t, size, f"output dimension {dim}")
        return
    if isinstance(target, list):
        if len(target) != num_examples:
            raise AttributionError(
                f"The target list has {len(target)} entries but there are {num_examples} "
                "examples; give one target per example."
            )
        for t in target:
            if isinstance(t, Tensor) and t.numel() == 1:
                t = int(t.item())
            if isinstance(t, list):
                t = tuple(t)
            if not isinstance(t, (int, tuple)) or isinstance(t, bool):
                raise AttributionTypeError(
                    "Each entry of a target list must be an int or a tuple of ints, "
                    f"not {type(t).__name__}."
                )
            check_target(t, shape, num_examples)
        return
    raise AttributionTypeError(
        f"target must be None, an int, a tuple, a list or a tensor, not {type(target).__name__}."
    )


def repeat_target(target: TargetType, times: int) -> TargetType:
    """The target for ``times`` step-major copies of the examples."""
    if times == 1:
        return target
    if isinstance(target, list):
        return target * times
    if isinstance(target, Tensor) and target.numel() > 1:
        return torch.cat([target.reshape(-1)] * times)
    return target


def select_target(output: Tensor, target: TargetType) -> Tensor:
    """Pick one number per example (row) of ``output``; returns a 1-D tensor."""
    if not isinstance(output, Tensor):
        raise AttributionTypeError(
            f"The forward function returned a {type(output).__name__}; it must return a tensor."
        )
    n = output.shape[0] if output.dim() > 0 else 1
    if target is None:
        picked = output
    elif isinstance(target, Tensor) and target.numel() == 1:
        picked = output[:, int(target.item())]
    elif isinstance(target, int):
        picked = output[:, target]
    elif isinstance(target, tuple):
        picked = output[(slice(None), *target)]
    elif isinstance(target, Tensor):
        index = target.reshape(-1, 1).to(device=output.device, dtype=torch.long)
        picked = torch.gather(output, 1, index.remainder(output.shape[1]))
    elif isinstance(target, list):
        items = [int(t.item()) if isinstance(t, Tensor) else t for t in target]
        if all(isinstance(t, int) for t in items):
            index = torch.tensor(items, device=output.device, dtype=torch.long).reshape(-1, 1)
            picked = torch.gather(output, 1, index.remainder(output.shape[1]))
        else:
            picked = torch.stack([output[(i, *tuple(t))] for i, t in enumerate(items)])
    else:  # check_target rejects everything else first
        raise AttributionTypeError(f"Unsupported target type {type(target).__name__}.")
    return picked.reshape(n, -1).sum(1) if picked.dim() > 0 else picked.reshape(1)


def take_additional_args(args: tuple[Any, ...] | None, rows: Tensor) -> tuple[Any, ...] | None:
    """Extra forward arguments for arbitrary rows: tensors with an example dimension are
    indexed by ``rows`` (the example of every row); everything else passes unchanged."""
    if args is None:
        return None
    return tuple(
        a.index_select(0, rows.to(a.device)) if isinstance(a, Tensor) and a.dim() > 0 else a
        for a in args
    )


def take_target(target: TargetType, rows: Tensor) -> TargetType:
    """The target for arbitrary rows, ``rows`` holding the example of every row."""
    if isinstance(target, list):
        return [target[i] for i in rows.tolist()]
    if isinstance(target, Tensor) and target.numel() > 1:
        return target.reshape(-1).index_select(0, rows.to(target.device))
    return target
