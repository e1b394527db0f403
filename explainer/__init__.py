"""Layer conductance and neuron gradients for PyTorch image models."""

from explainer.errors import (
    AttributionError,
    AttributionTypeError,
    ExplainerError,
    ImageLoadError,
    ModelLoadError,
)

__all__ = [
    "AttributionError",
    "AttributionTypeError",
    "ExplainerError",
    "ImageLoadError",
    "ModelLoadError",
]
