"""Layer conductance and neuron gradients for PyTorch image models."""

from explainer.attribution import LayerConductance, NeuronGradient
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
    "LayerConductance",
    "ModelLoadError",
    "NeuronGradient",
]
