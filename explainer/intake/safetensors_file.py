"""``.safetensors`` files: a JSON header and raw tensor bytes, read without running any code."""

from __future__ import annotations

import torch

from explainer.errors import ModelLoadError
from explainer.intake.sources import short
from explainer.intake.state_dict import vet_tensors

__all__ = ["load_safetensors_state"]


def load_safetensors_state(data: bytes, display: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name (the library checks every offset)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{display} is not a valid safetensors file ({short(exc)}); it may be damaged or "
            "truncated. Save it again and upload the complete file."
        ) from exc
    vet_tensors(state, display)
    return state
