"""Weights-only files: ``torch.load(weights_only=True)``, tensor layout vetting, unwrapping.

``torch.load(..., weights_only=True)`` never runs code from the file, but it trusts the
layout each tensor declares: a tensor with stride 0 may declare millions of rows over a few
bytes of storage, and whatever expands it later (a dtype cast, labels for each class, a
forward pass) takes the server's memory. So every file is first read onto the ``meta`` device
(nothing is allocated), every tensor's layout is checked against its storage, and only then
is the file read for real and checked again.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from explainer.errors import ModelLoadError
from explainer.intake.formats import SAVE_INSTEAD
from explainer.intake.sources import MAX_UPLOAD_ENV, short, upload_limit

__all__ = [
    "KEY_PREFIXES",
    "STATE_DICT_WRAPPERS",
    "layout_problem",
    "match_dtypes",
    "torch_load_weights",
    "unwrap_state_dict",
    "vet_tensors",
]

# Keys under which training scripts commonly nest the weights.
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers add to every key: DataParallel / DDP, and torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def layout_problem(
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
    storage_bytes: int,
    itemsize: int,
    *,
    dense: bool = True,
) -> str | None:
    """Why a tensor layout is unsafe to use, or None when it is sound.

    Sound means: sizes, strides and offset are non-negative; the elements the tensor reaches
    (offset plus span) lie within the storage; no dimension longer than 1 has stride 0; no two
    elements share memory; and, with ``dense``, the elements fill one block without gaps (a
    permutation of a contiguous layout).
    """
    if len(shape) != len(stride):
        return "declares a layout with as many strides as dimensions"
    if any(s < 0 for s in shape) or any(s < 0 for s in stride) or offset < 0:
        return "declares a negative size, stride or offset"
    numel = math.prod(shape)
    if numel == 0:
        return None
    dims = sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return (
            "repeats one value along a dimension (stride 0), so it declares more data than it holds"
        )
    reach = 0  # the furthest element the dimensions seen so far reach
    for st, sz in dims:
        if st <= reach or (dense and st != reach + 1):
            return (
                "has elements that share memory (overlapping strides)"
                if st <= reach
                else "has gaps between its elements"
            )
        reach += (sz - 1) * st
    if (offset + reach + 1) * itemsize > storage_bytes:
        return (
            f"declares {numel:,} elements, more than its storage of {storage_bytes:,} bytes holds"
        )
    return None


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a name for messages."""
    stack: list[tuple[str, Any]] = [(prefix, obj)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield name or "(the file itself)", item
        elif isinstance(item, Mapping):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(item))


def vet_tensors(obj: Any, display: str, *, dense: bool = True) -> None:
    """Refuse any tensor in ``obj`` whose layout is unsafe, and too many bytes in all.

    Works on tensors of the ``meta`` device as well, so it runs before anything is allocated.
    """
    budget = 2 * upload_limit()
    storages: dict[int, int] = {}
    viewed = 0
    for name, tensor in _tensors(obj):
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise ModelLoadError(
                f"Tensor {name} in {display} is stored as {tensor.layout} "
                f"{'(quantized)' if tensor.is_quantized else ''}; only plain dense tensors are "
                "read. Save the weights again as float tensors."
            )
        storage = tensor.untyped_storage()
        problem = layout_problem(
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.storage_offset(),
            storage.nbytes(),
            tensor.element_size(),
            dense=dense,
        )
        if problem is not None:
            raise ModelLoadError(
                f"Tensor {name} in {display} {problem}. The file is malformed or was crafted, so "
                "it is refused; save the weights again with "
                "torch.save(model.state_dict(), 'weights.pt')."
            )
        storages[getattr(storage, "_cdata", id(storage))] = storage.nbytes()
        viewed += tensor.numel() * tensor.element_size()
    if sum(storages.values()) > budget or viewed > budget:
        raise ModelLoadError(
            f"{display} declares tensors of more than {budget / 2**20:,.0f} MB, more than this "
            f"server accepts. Use a smaller model, or ask the operator to raise {MAX_UPLOAD_ENV}."
        )


def torch_load_weights(data: bytes, display: str) -> tuple[Any, str | None]:
    """``torch.load`` with ``weights_only=True``; on a pickled object return (None, its class).

    The file is read twice: once onto the ``meta`` device, where the layout of every tensor is
    vetted before anything is allocated from it, then for real, and vetted again.
    """
    obj, global_name = _load(data, display, "meta")
    if global_name is not None:
        return None, global_name
    vet_tensors(obj, display)
    obj, global_name = _load(data, display, "cpu")
    if global_name is None:
        vet_tensors(obj, display)
    return obj, global_name


def _load(data: bytes, display: str, device: str) -> tuple[Any, str | None]:
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location=device), None
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "GLOBAL" in message or "add_safe_globals" in message or "allowlisted" in message:
            found = _GLOBAL_RE.search(message)
            return None, found.group(1) if found else "a Python object"
        raise ModelLoadError(
            f"{display} could not be read as a PyTorch file: it looks damaged or truncated. "
            "Save it again and upload the complete file."
        ) from exc
    except Exception as exc:  # any decoding failure of user bytes; the cause is chained
        raise ModelLoadError(
            f"{display} could not be read as a PyTorch file ({short(exc)}); it may be damaged or "
            "truncated. Save it again and upload the complete file."
        ) from exc


def unwrap_state_dict(obj: Any, display: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """Find the ``{name: tensor}`` mapping in what ``torch.load`` returned."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in STATE_DICT_WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                notes.append(f"Used the weights stored under {key!r} in the checkpoint.")
                break
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{display} holds a {type(obj).__name__}, not a model or a dictionary of weights. "
            + SAVE_INSTEAD
        )
    if not obj:
        raise ModelLoadError(f"{display} holds an empty dictionary: there are no weights in it.")
    if not _all_tensors(obj):
        odd = [
            f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
        ]
        shown = ", ".join(odd[:3]) + (", ..." if len(odd) > 3 else "")
        raise ModelLoadError(
            f"{display} is a dictionary with entries that are not tensors ({shown}), "
            "so it is not a state_dict. Save only the weights: "
            "torch.save(model.state_dict(), 'weights.pt')."
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            notes.append(f"Removed the {prefix!r} prefix from every tensor name.")
    return state


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def match_dtypes(
    state: dict[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    display: str,
    notes: list[str],
) -> dict[str, torch.Tensor]:
    """Cast each tensor to the dtype the architecture uses, as copying into it would."""
    out = dict(state)
    converted = set()
    for key, tensor in state.items():
        target = reference.get(key)
        if target is None or tensor.dtype == target.dtype:
            continue
        if tensor.is_floating_point() != target.is_floating_point():
            raise ModelLoadError(
                f"Tensor {key} in {display} holds {tensor.dtype} values where the architecture "
                f"expects {target.dtype}; the file does not belong to this architecture."
            )
        out[key] = tensor.to(target.dtype)
        if tensor.is_floating_point():
            converted.add(str(tensor.dtype).replace("torch.", ""))
    if converted:
        notes.append(f"Weights stored as {', '.join(sorted(converted))} were converted to float32.")
    return out
