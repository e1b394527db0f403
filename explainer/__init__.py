"""Layer conductance and neuron gradients for PyTorch image models.

The flat public surface: the attribution methods (Captum-compatible), model and image intake,
the module tree, the demo model, baselines and the content-addressed cache. Submodules hold the
details and may change freely.
"""

from explainer.attribution import LayerConductance, NeuronGradient
from explainer.baselines import BASELINE_KINDS, make_baseline
from explainer.cache import ContentCache, digest
from explainer.demo import sample_image_paths
from explainer.errors import (
    AttributionError,
    AttributionIndexError,
    AttributionTypeError,
    ExplainerError,
    ImageLoadError,
    ModelLoadError,
)
from explainer.images import Preprocessing, deprocess, load_image, preprocess
from explainer.intake import (
    LoadedModel,
    build_model,
    describe_model,
    list_architectures,
    load_demo_model,
    load_labels,
    load_model,
)
from explainer.integration import METHODS
from explainer.neuron_conductance import NeuronConductance
from explainer.tree import ModuleNode, ModuleTree, get_module, module_tree

__all__ = [
    "BASELINE_KINDS",
    "METHODS",
    "AttributionError",
    "AttributionIndexError",
    "AttributionTypeError",
    "ContentCache",
    "ExplainerError",
    "ImageLoadError",
    "LayerConductance",
    "LoadedModel",
    "ModelLoadError",
    "ModuleNode",
    "ModuleTree",
    "NeuronConductance",
    "NeuronGradient",
    "Preprocessing",
    "build_model",
    "deprocess",
    "describe_model",
    "digest",
    "get_module",
    "list_architectures",
    "load_demo_model",
    "load_image",
    "load_labels",
    "load_model",
    "make_baseline",
    "module_tree",
    "preprocess",
    "sample_image_paths",
]
