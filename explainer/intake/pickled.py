"""Pickled modules, loaded only where the operator allows them; TorchScript, always refused."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import torch
from torch import nn

from explainer.errors import ModelLoadError
from explainer.intake.formats import SAVE_INSTEAD
from explainer.intake.sources import short

__all__ = [
    "ALLOW_PICKLE_ENV",
    "load_pickled_module",
    "pickle_allowed",
    "refuse_pickle",
    "refuse_torchscript",
]

ALLOW_PICKLE_ENV = "EXPLAINER_ALLOW_PICKLE"
"""Environment variable with which the server operator allows loading pickled modules."""


def pickle_allowed() -> bool:
    """Whether the server operator allowed pickled modules (``EXPLAINER_ALLOW_PICKLE=1``).

    Read at every call, so a change of the environment takes effect without a restart. Only the
    environment decides this, never an argument a browser could set: loading a pickle runs code
    from the file.
    """
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def refuse_pickle(display: str, global_name: str) -> ModelLoadError:
    """The error for a pickled object on a server that does not allow pickles."""
    return ModelLoadError(
        f"{display} is a pickled Python object ({global_name}), not just tensors. Loading a "
        "pickle runs code stored in the file, so this server refuses it. "
        + SAVE_INSTEAD
        + f" (The server operator can allow trusted pickles by setting {ALLOW_PICKLE_ENV}=1.)"
    )


def refuse_torchscript(display: str) -> ModelLoadError:
    """The error for a TorchScript archive (its layers cannot be hooked)."""
    return ModelLoadError(
        f"{display} is a TorchScript archive. Its layers run as compiled code, so the hooks this "
        "explorer attaches to look inside a layer cannot be registered on them. " + SAVE_INSTEAD
    )


def load_pickled_module(data: bytes, display: str, global_name: str) -> nn.Module:
    """Unpickle a whole module, only where :func:`pickle_allowed`; else refuse with what to do."""
    if not pickle_allowed():
        raise refuse_pickle(display, global_name)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as exc:  # the operator trusts this file, but it may still be broken
        raise ModelLoadError(f"{display} could not be unpickled ({short(exc)}).") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if isinstance(obj, torch.jit.ScriptModule):
        raise refuse_torchscript(display)
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{display} holds a {type(obj).__name__}, not a torch.nn.Module (or a dictionary with "
            "one under 'model'). " + SAVE_INSTEAD
        )
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module
    return obj
