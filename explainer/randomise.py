"""A randomised copy of a model, for the sanity check "does the explanation depend on the weights?".

An explanation that looks the same for a trained model and for one whose weights carry no
learned structure tells little about the model. :func:`randomised_copy` makes such a model
without knowing its architecture: every parameter tensor of a deep copy has its entries shuffled
(a fixed seed makes it repeatable). Shuffling keeps each tensor's values, and so the scale of the
activations, while destroying what training arranged. Buffers (batch-norm statistics) are kept.
The original model is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["RANDOM_SEED", "randomised_copy"]

RANDOM_SEED = 0
"""The seed of the randomised copy the app shows."""


def randomised_copy(
    model: nn.Module, seed: int = RANDOM_SEED, copy_model: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """A deep copy of ``model`` with the entries of every parameter tensor shuffled.

    Parameters
    ----------
    model : nn.Module
        Left exactly as it was (its parameters, buffers, hooks and mode).
    seed : int
        Seed of the shuffles: the same seed gives the same copy.
    copy_model : callable, optional
        Makes the copy instead of ``copy.deepcopy`` (for a model that cannot be deep-copied,
        such as an exported program, whose file can be loaded again).

    Returns
    -------
    nn.Module
        The copy, in the original's training mode, on the original's devices.
    """
    clone = copy.deepcopy(model) if copy_model is None else copy_model()
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for parameter in clone.parameters():  # shared parameters come once
            flat = parameter.detach().reshape(-1)
            order = torch.randperm(flat.numel(), generator=generator).to(flat.device)
            parameter.copy_(flat[order].reshape(parameter.shape))
    return clone
