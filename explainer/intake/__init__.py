"""Model intake: everything that turns untrusted bytes into a model ready to explain.

One module per concern, so that the attack surface reads file by file:

``sources``          reading a path or bytes within the upload limit, digests
``formats``          what a file is (from its bytes), zip archives
``state_dict``       ``torch.load(weights_only=True)``, tensor layout vetting, unwrapping
``safetensors_file`` safetensors files
``export``           ``torch.export`` programs (.pt2), vetted and rebuilt without pickles
``pickled``          pickled modules (only where the operator allows), TorchScript refusal
``registry``         the architecture table, key matching, preprocessing, ``build_model``
``labels``           labels files
``builtin``          the built-in demo model
``loaded``           ``LoadedModel``, ``ModelInfo``, ``describe_model``
``loader``           ``load_model``
"""

from explainer.intake.builtin import load_demo_model
from explainer.intake.labels import load_labels
from explainer.intake.loaded import LoadedModel, ModelInfo, describe_model
from explainer.intake.loader import load_model
from explainer.intake.pickled import ALLOW_PICKLE_ENV, pickle_allowed
from explainer.intake.registry import (
    DEMO_ARCH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    list_architectures,
)

__all__ = [
    "ALLOW_PICKLE_ENV",
    "DEMO_ARCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "ModelInfo",
    "build_model",
    "describe_model",
    "list_architectures",
    "load_demo_model",
    "load_labels",
    "load_model",
    "pickle_allowed",
]
