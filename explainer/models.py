"""Model intake: turn a user's file or an architecture name into a model ready to explain.

What a file holds is read from its bytes, never from its name:

- a ``state_dict`` (``torch.save`` zip or legacy file, also wrapped under ``state_dict`` /
  ``model`` / ``model_state_dict`` / ``net`` and with DataParallel's ``module.`` prefix), loaded
  with ``torch.load(..., weights_only=True)`` only, plus an architecture;
- a ``.safetensors`` file plus an architecture;
- a ``torch.export`` program (``.pt2``), checked for embedded code before it is loaded;
- a TorchScript archive: refused (hooks cannot be attached to its layers);
- a pickled module: refused unless the server operator set ``EXPLAINER_ALLOW_PICKLE=1``.

Architectures are torchvision's classification and semantic segmentation models plus the
project's ``demo_cnn``. Nothing here downloads anything: torchvision's builders are always called
with ``weights=None`` (and ``weights_backbone=None`` for segmentation models, whose builders would
otherwise fetch pretrained backbone weights).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import itertools
import json
import os
import pickle
import re
import types
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from explainer.errors import ModelLoadError

__all__ = [
    "ALLOW_PICKLE_ENV",
    "DEMO_ARCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_UPLOAD_ENV",
    "LoadedModel",
    "build_model",
    "describe_model",
    "list_architectures",
    "load_labels",
    "load_model",
    "pickle_allowed",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet images (pixel values in [0, 1])."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet images (pixel values in [0, 1])."""

DEMO_ARCH = "demo_cnn"
"""Architecture name of the project's demo CNN (:mod:`explainer.demo`)."""

ALLOW_PICKLE_ENV = "EXPLAINER_ALLOW_PICKLE"
"""Environment variable with which the server operator allows loading pickled modules."""

MAX_UPLOAD_ENV = "EXPLAINER_MAX_UPLOAD_MB"
"""Environment variable holding the largest file accepted, in MiB (default 500)."""

DEFAULT_MAX_UPLOAD_MB = 500.0

Source = str | os.PathLike | bytes | bytearray | memoryview
LabelsSource = Source | Sequence[str]
# What loading a full model yields: module, input size, static batch, classes, output shape.
_FullModel = tuple[nn.Module, tuple[int, int, int] | None, int | None, int, tuple[int, ...] | None]

# Keys under which training scripts commonly nest the weights.
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers add to every key: DataParallel / DDP, and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# Architectures built with auxiliary classifiers that only matter in training.
_AUX_ARCHS = ("googlenet", "inception_v3")
# Top-level modules holding such auxiliary classifiers (torchvision's names).
_AUX_MODULES = ("aux1", "aux2", "AuxLogits", "aux_classifier")
# Default input side of segmentation models. torchvision trained their weights on images resized
# to 520 pixels, but the models take any size and score every pixel of it; 224 keeps the dozens
# of forward passes an attribution needs affordable on a CPU.
_SEGMENTATION_SIDE = 224

_FORMAT_NAMES = {
    "state_dict": "PyTorch state_dict (weights only)",
    "safetensors": "safetensors (weights only)",
    "export": "torch.export program (.pt2)",
    "pickle": "pickled module (allowed by the server)",
    "torchvision": "torchvision architecture",
    "builtin": "built-in demo",
}

_SAVE_INSTEAD = (
    "Upload the weights instead (torch.save(model.state_dict(), 'weights.pt') or a .safetensors "
    "file) and pick the architecture, or export the model with "
    "torch.export.save(torch.export.export(model, (example_batch,)), 'model.pt2')."
)


@dataclass
class LoadedModel:
    """A model in eval mode plus what the app needs to know about it.

    Attributes
    ----------
    model : torch.nn.Module
        The model, in eval mode.
    name : str
        A human-readable name (file name or architecture).
    arch : str
        Architecture name (a torchvision model name, ``"demo_cnn"``, or ``"custom"``).
    input_size : tuple[int, int, int]
        Expected input as ``(channels, height, width)``.
    mean, std : tuple[float, ...]
        Normalisation the model was trained with (one value per channel).
    labels : list[str]
        One name per output class.
    sha256 : str
        Digest of the source bytes (or of the architecture spec for built models).
    source_format : str
        One of ``"state_dict"``, ``"safetensors"``, ``"export"``, ``"pickle"``, ``"torchvision"``,
        ``"builtin"``.
    num_params : int
        Number of parameters.
    notes : list[str]
        Things the user should know (e.g. "random weights").
    static_batch : int or None
        For ``torch.export`` programs exported with a fixed batch size, that size; ``None`` when
        the model takes any batch size.
    output_shape : tuple[int, ...] or None
        Shape of the model's scores for one image, without the batch dimension: ``(classes,)``
        for a classifier, ``(classes, *positions)`` for a model that scores every output
        position (e.g. ``(classes, H, W)`` for segmentation). ``None`` when it cannot be read
        without running the model (a pickled module, or an export with dynamic output sizes).
    """

    model: torch.nn.Module
    name: str
    arch: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: list[str]
    sha256: str
    source_format: str
    num_params: int = 0
    notes: list[str] = field(default_factory=list)
    static_batch: int | None = None
    output_shape: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# ================================================================================================
# Settings the server operator controls
# ================================================================================================


def pickle_allowed() -> bool:
    """Whether the server operator allowed pickled modules (``EXPLAINER_ALLOW_PICKLE=1``).

    Read at every call, so a change of the environment takes effect without a restart. Only the
    environment decides this, never an argument a browser could set: loading a pickle runs code
    from the file.
    """
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _max_upload_bytes() -> int:
    raw = os.environ.get(MAX_UPLOAD_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0:
        raise ModelLoadError(
            f"The server setting {MAX_UPLOAD_ENV}={raw!r} is not a positive number of megabytes; "
            "ask the operator to fix it."
        )
    return int(megabytes * 1024 * 1024)


# ================================================================================================
# Reading sources
# ================================================================================================


def _read_source(source: Source, filename: str | None, what: str) -> tuple[bytes, str]:
    """Read ``source`` fully into memory once; return the bytes and a name for messages."""
    limit = _max_upload_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        display = Path(filename).name if filename else f"the uploaded {what}"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        display = Path(filename).name if filename else path.name
        try:
            size = path.stat().st_size
            if size > limit:
                raise ModelLoadError(_too_big(display, size, limit))
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"There is no {what} at {path}; check the path.") from None
        except IsADirectoryError:
            raise ModelLoadError(
                f"{path} is a folder; give the path of the {what} itself."
            ) from None
        except PermissionError:
            raise ModelLoadError(f"{path} cannot be read (permission denied).") from None
        except OSError as exc:
            raise ModelLoadError(f"{path} could not be read: {exc}.") from exc
    else:
        raise TypeError(
            f"A {what} must be given as a path or as bytes, not {type(source).__name__}."
        )
    if len(data) > limit:
        raise ModelLoadError(_too_big(display, len(data), limit))
    return data, display


def _too_big(display: str, size: int, limit: int) -> str:
    return (
        f"{display} is {size / 2**20:,.1f} MB, more than the {limit / 2**20:,.0f} MB this server "
        f"accepts. Use a smaller model, or ask the operator to raise {MAX_UPLOAD_ENV}."
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ================================================================================================
# Architectures
# ================================================================================================


def _torchvision_architectures() -> list[str]:
    import torchvision

    return sorted(
        [
            *torchvision.models.list_models(module=torchvision.models),
            *_segmentation_architectures(),
        ]
    )


@functools.cache
def _segmentation_architectures() -> frozenset[str]:
    """torchvision's semantic segmentation models (dict output, scores for every pixel)."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models.segmentation))


def _is_segmentation(arch: str) -> bool:
    return arch in _segmentation_architectures()


def list_architectures() -> list[str]:
    """Names of the architectures a weights-only file can be loaded into.

    Returns
    -------
    list[str]
        torchvision's image classification models, torchvision's semantic segmentation models
        (``fcn_*``, ``deeplabv3_*``, ``lraspp_*``: they score every pixel and return a dict
        whose ``"out"`` entry is explained) and ``"demo_cnn"``, sorted.
    """
    return sorted([*_torchvision_architectures(), DEMO_ARCH])


def _resolve_arch(arch: str) -> str:
    if not isinstance(arch, str):
        raise TypeError(f"An architecture is named by a string, not {type(arch).__name__}.")
    known = list_architectures()
    wanted = arch.strip()
    if wanted in known:
        return wanted
    if wanted.lower() in known:
        return wanted.lower()
    close = difflib.get_close_matches(wanted.lower(), known, n=3, cutoff=0.6)
    hint = f" Did you mean {_or_list(close)}?" if close else ""
    raise ModelLoadError(
        f"There is no architecture called {arch!r}.{hint} Pick one of the {len(known)} names "
        "list_architectures() gives (torchvision's classification and segmentation models and "
        "demo_cnn)."
    )


def _or_list(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _demo_module() -> types.ModuleType:
    """:mod:`explainer.demo`, imported on first use (it imports this module)."""
    import importlib

    try:
        return importlib.import_module("explainer.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "explainer.demo":
            raise
        raise ModelLoadError(
            "The demo architecture is not available in this installation (explainer.demo is "
            "missing); pick a torchvision architecture."
        ) from exc


def _demo_available() -> bool:
    try:
        _demo_module()
    except ModelLoadError:
        return False
    return True


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ModelLoadError(f"The number of classes must be a whole number, got {num_classes!r}.")
    if num_classes < 1:
        raise ModelLoadError(
            f"The number of classes must be at least 1, got {num_classes}; leave it empty to "
            "read it from the file."
        )


def _builder_kwargs(arch: str, variant: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if arch in _AUX_ARCHS:
        # Say explicitly what torchvision would otherwise warn about choosing by default.
        kwargs["init_weights"] = True
    if _is_segmentation(arch):
        # The segmentation builders download ImageNet backbone weights unless told not to.
        kwargs["weights_backbone"] = None
    kwargs.update(variant)
    return kwargs


def _has_aux_loss_option(arch: str) -> bool:
    """Whether a segmentation builder takes ``aux_loss`` (LR-ASPP has no auxiliary head)."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(arch)
    return "aux_loss" in inspect.signature(builder).parameters


def _variants(arch: str) -> tuple[Mapping[str, Any], ...]:
    """Constructor options that change which tensors an architecture has.

    The last variant is the one :func:`build_model` uses: the network without the auxiliary
    classifiers that only take part in training.
    """
    if arch in _AUX_ARCHS:
        return ({"aux_logits": True}, {"aux_logits": False})
    if _is_segmentation(arch) and _has_aux_loss_option(arch):
        # Checkpoints trained with aux_loss=True carry aux_classifier.*; others do not.
        return ({"aux_loss": True}, {"aux_loss": False})
    return ({},)


class _MetaAllocation(TorchFunctionMode):
    """Allocate parameter-sized tensors on the meta device and skip their random init.

    ``torch.device("meta")`` would also move the small index computations some builders run
    (``torch.arange(...).tolist()`` in RegNet) to the meta device, where they fail; this mode only
    redirects the allocating factories and turns in-place initialisers on meta tensors into
    no-ops. Small tensors made by other factories stay real, which is harmless.
    """

    _FACTORIES = frozenset(
        {
            torch.empty,
            torch.empty_strided,
            torch.zeros,
            torch.ones,
            torch.full,
            torch.rand,
            torch.randn,
            torch.randint,
            torch.normal,
        }
    )
    _INITIALISERS = frozenset(
        {
            nn.init.normal_,
            nn.init.uniform_,
            nn.init.trunc_normal_,
            nn.init.kaiming_normal_,
            nn.init.kaiming_uniform_,
            nn.init.xavier_normal_,
            nn.init.xavier_uniform_,
            nn.init.constant_,
            nn.init.zeros_,
            nn.init.ones_,
            nn.init.orthogonal_,
            nn.init.eye_,
            nn.init.dirac_,
            torch.Tensor.normal_,
            torch.Tensor.uniform_,
            torch.Tensor.zero_,
            torch.Tensor.fill_,
            torch.Tensor.copy_,
            torch.Tensor.erfinv_,
            torch.Tensor.mul_,
            torch.Tensor.add_,
            torch.Tensor.clamp_,
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif (
            func in self._INITIALISERS
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            return args[0]
        return func(*args, **kwargs)


def _instantiate(
    arch: str,
    num_classes: int | None,
    variant: Mapping[str, Any] = types.MappingProxyType({}),
    *,
    meta: bool,
) -> nn.Module:
    """Build ``arch`` with random (``meta=False``) or unallocated (``meta=True``) weights."""
    if arch == DEMO_ARCH:
        demo = _demo_module()

        def build() -> nn.Module:
            if num_classes is None:
                return demo.build_demo_model()
            return demo.build_demo_model(num_classes)

    else:
        import torchvision

        kwargs = _builder_kwargs(arch, variant)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes

        def build() -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, **kwargs)

    if meta:
        with _MetaAllocation():
            return build()
    return build()


def _head_layers(model: nn.Module) -> tuple[str, list[str]]:
    """The classifier layer's name and the names of all layers with one output per class."""
    linear = [(n, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    conv = [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    candidates = linear or conv
    if not candidates:
        raise ModelLoadError(
            "The architecture has no linear or convolution layer to classify with."
        )
    # The main classifier, not an auxiliary one built after it (segmentation's aux_classifier).
    main = [c for c in candidates if c[0].split(".", 1)[0] not in _AUX_MODULES] or candidates
    head, out = main[-1]
    per_class = [n for n, o in itertools.chain(linear, conv) if o == out]
    return head, per_class


@dataclass(frozen=True)
class _Signature:
    """The tensors an architecture variant has, for comparing with a file's."""

    arch: str
    variant: Mapping[str, Any]
    shapes: Mapping[str, tuple[int, ...]]
    head: str  # key of the classifier weight: its first dimension is the number of classes
    class_keys: frozenset[str]  # keys whose first dimension is the number of classes

    @property
    def top_level(self) -> frozenset[str]:
        return frozenset(k.split(".", 1)[0] for k in self.shapes)


@functools.cache
def _signatures(arch: str) -> tuple[_Signature, ...]:
    """Tensor names and shapes of every variant of ``arch``, from a model without storage."""
    result = []
    for variant in _variants(arch):
        model = _instantiate(arch, None, variant, meta=True)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        head, per_class = _head_layers(model)
        class_keys = frozenset(
            f"{layer}.{p}" for layer in per_class for p in ("weight", "bias")
        ) & set(shapes)
        result.append(
            _Signature(
                arch=arch,
                variant=types.MappingProxyType(dict(variant)),
                shapes=types.MappingProxyType(shapes),
                head=f"{head}.weight",
                class_keys=class_keys,
            )
        )
    return tuple(result)


@functools.cache
def _families() -> tuple[tuple[str, ...], ...]:
    """Architectures grouped by the torchvision module that defines them (same layer names)."""
    import torchvision

    groups: dict[str, list[str]] = {}
    for name in _torchvision_architectures():
        module = torchvision.models.get_model_builder(name).__module__
        groups.setdefault(module, []).append(name)
    families = [tuple(names) for names in groups.values()]
    if _demo_available():
        families.append((DEMO_ARCH,))
    return tuple(families)


def _is_ignorable(key: str) -> bool:
    # BatchNorm counters: missing in old checkpoints, filled with zeros on load.
    return key.endswith("num_batches_tracked")


@dataclass(frozen=True)
class _Comparison:
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    @property
    def distance(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)


def _compare(sig: _Signature, shapes: Mapping[str, tuple[int, ...]]) -> _Comparison:
    missing = [k for k in sig.shapes if k not in shapes and not _is_ignorable(k)]
    unexpected = [k for k in shapes if k not in sig.shapes]
    wrong = []
    for key, shape in shapes.items():
        expected = sig.shapes.get(key)
        if expected is None:
            continue
        if key in sig.class_keys:
            # The number of classes may differ; the rest of the shape must not.
            same = len(shape) == len(expected) and shape[1:] == expected[1:]
        else:
            same = shape == expected
        if not same:
            wrong.append((key, shape, expected))
    return _Comparison(missing, unexpected, wrong)


def _best_signature(
    arch: str, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[_Signature, _Comparison]:
    scored = [(sig, _compare(sig, shapes)) for sig in _signatures(arch)]
    return min(scored, key=lambda pair: pair[1].distance)


def _fitting_architectures(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every architecture whose tensors match ``shapes`` (the number of classes may differ)."""
    top = frozenset(k.split(".", 1)[0] for k in shapes)
    fits = []
    for family in _families():
        # Members of a family share their top-level layer names: skip families that cannot fit
        # without building every member.
        if not any(sig.top_level == top for sig in _signatures(family[0])):
            continue
        for arch in family:
            if any(_compare(sig, shapes).fits for sig in _signatures(arch)):
                fits.append(arch)
    order = {name: i for i, name in enumerate(list_architectures())}
    return sorted(fits, key=order.__getitem__)


def _fit_hint(fits: Sequence[str]) -> str:
    if not fits:
        return (
            " No torchvision architecture or demo_cnn has these layers; if the model is your own "
            "design, export it with torch.export and upload the .pt2 file."
        )
    shown = ", ".join(fits[:8]) + (f" and {len(fits) - 8} more" if len(fits) > 8 else "")
    return f" Architectures whose layers match this file: {shown}."


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _preprocessing(
    arch: str, model: nn.Module, weights: Any = None
) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation for an architecture (from torchvision's weights metadata)."""
    if arch == DEMO_ARCH:
        demo = _demo_module()
        return tuple(demo.DEMO_INPUT_SIZE), tuple(demo.DEMO_MEAN), tuple(demo.DEMO_STD)
    image_size = getattr(model, "image_size", None)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    crop: Any = 224
    if weights is None:
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
    keywords = getattr(weights.transforms, "keywords", {})
    crop = keywords.get("crop_size", crop)
    mean = tuple(keywords.get("mean", mean))
    std = tuple(keywords.get("std", std))
    if isinstance(image_size, int):
        # Vision transformers are built for one image size, which weights=None leaves at 224.
        crop = image_size
    if _is_segmentation(arch):
        # Their weights resize (no crop) to 520; any size works, see _SEGMENTATION_SIDE.
        crop = _SEGMENTATION_SIDE
    if isinstance(crop, (list, tuple)):
        height, width = (int(crop[0]), int(crop[-1]))
    else:
        height = width = int(crop)
    return (3, height, width), mean, std


def _arch_labels(arch: str, num_classes: int) -> list[str] | None:
    """Class names an architecture's known training set gives, if the class count matches."""
    if arch == DEMO_ARCH:
        labels = list(getattr(_demo_module(), "DEMO_LABELS", []))
        return labels if len(labels) == num_classes else None
    # ImageNet's 1000 classes for classifiers, Pascal VOC's 21 for segmentation models: read from
    # the weights' metadata, which ships with torchvision (nothing is downloaded).
    import torchvision

    for weights in torchvision.models.get_model_weights(arch):
        categories = weights.meta.get("categories")
        if categories is not None and len(categories) == num_classes:
            return list(categories)
    return None


def _default_labels(num_classes: int) -> list[str]:
    return [f"class {i}" for i in range(num_classes)]


def _drop_aux_heads(arch: str, model: nn.Module) -> bool:
    """Remove training-only auxiliary classifiers; True if there were any.

    GoogLeNet and Inception v3 return only the main logits in eval mode anyway. torchvision's
    segmentation models compute their ``"aux"`` output whenever ``aux_classifier`` is set; it
    never feeds ``"out"``, so removing it saves that work and keeps its layers out of the tree.
    """
    if _is_segmentation(arch):
        if isinstance(getattr(model, "aux_classifier", None), nn.Module):
            model.aux_classifier = None
            return True
        return False
    if arch not in _AUX_ARCHS:
        return False
    dropped = False
    for attr in ("AuxLogits", "aux1", "aux2"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, None)
            dropped = True
    if dropped:
        model.aux_logits = False
    return dropped


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


# ================================================================================================
# Weights-only files -> model
# ================================================================================================


def _model_from_state_dict(
    state: dict[str, torch.Tensor],
    arch: str | None,
    num_classes: int | None,
    display: str,
) -> tuple[str, nn.Module, list[str]]:
    """Build the architecture and load ``state`` into it; return (arch, model, notes)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if arch is None:
        fits = _fitting_architectures(shapes)
        raise ModelLoadError(
            f"{display} holds only weights (a state_dict), not the network they belong to: pick "
            f"the architecture it was trained with.{_fit_hint(fits)}"
        )
    arch = _resolve_arch(arch)
    sig, comparison = _best_signature(arch, shapes)
    if not comparison.fits:
        raise ModelLoadError(_mismatch_message(display, arch, comparison, shapes))

    file_classes = shapes[sig.head][0]
    if num_classes is not None and num_classes != file_classes:
        raise ModelLoadError(
            f"The classifier in {display} ({sig.head}) has {file_classes} outputs, but "
            f"{num_classes} classes were asked for. Leave the number of classes empty to use the "
            "file's."
        )

    model = _instantiate(arch, file_classes, sig.variant, meta=True)
    notes: list[str] = []
    state = _match_dtypes(state, model.state_dict(), display, notes)
    for key in sig.shapes:
        if key not in state and _is_ignorable(key):
            state[key] = torch.zeros((), dtype=torch.long)
    try:
        model.load_state_dict(state, strict=True, assign=True)
        if _has_meta_tensors(model):
            # A buffer the file does not carry (not persistent): build for real and copy instead.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _instantiate(arch, file_classes, sig.variant, meta=False)
            model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"The weights in {display} do not fit {arch}: {exc}") from exc
    if _drop_aux_heads(arch, model):
        notes.append(_aux_note(arch))
    return arch, model, notes


def _aux_note(arch: str) -> str:
    if _is_segmentation(arch):
        return (
            "Removed the auxiliary classifier (aux_classifier), which only takes part in "
            "training: the model now returns only 'out', whose scores are unchanged, and each "
            "forward pass skips the auxiliary head."
        )
    return "Removed the auxiliary classifiers, which only take part in training."


def _segmentation_size_note(arch: str) -> str:
    side = _SEGMENTATION_SIDE
    return (
        f"Input size {side} × {side}, to keep attribution fast on a CPU: torchvision's "
        f"pretrained {arch} weights were trained on images resized to 520 pixels, and the model "
        "takes any size (its scores have the input's height and width)."
    )


def _output_shape(arch: str, classes: int, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    """Scores for one image: ``(classes,)``, or ``(classes, H, W)`` for segmentation models."""
    if _is_segmentation(arch):
        # torchvision's segmentation models upsample their scores to the input's size.
        return (classes, input_size[1], input_size[2])
    return (classes,)


def _mismatch_message(
    display: str, arch: str, comparison: _Comparison, shapes: Mapping[str, tuple[int, ...]]
) -> str:
    parts = []
    if comparison.missing:
        parts.append(
            f"{len(comparison.missing)} tensors {arch} needs are missing "
            f"({_examples(comparison.missing)})"
        )
    if comparison.unexpected:
        parts.append(
            f"{len(comparison.unexpected)} tensors in the file are not part of {arch} "
            f"({_examples(comparison.unexpected)})"
        )
    if comparison.wrong_shape:
        key, got, want = comparison.wrong_shape[0]
        parts.append(
            f"{len(comparison.wrong_shape)} tensors have other shapes (e.g. {key}: "
            f"{tuple(got)} in the file, {tuple(want)} in {arch})"
        )
    fits = [a for a in _fitting_architectures(shapes) if a != arch]
    return (
        f"The weights in {display} do not fit {arch}: " + "; ".join(parts) + "." + _fit_hint(fits)
    )


def _match_dtypes(
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


def _unwrap_state_dict(obj: Any, display: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """Find the ``{name: tensor}`` mapping in what ``torch.load`` returned."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in _STATE_DICT_WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                notes.append(f"Used the weights stored under {key!r} in the checkpoint.")
                break
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{display} holds a {type(obj).__name__}, not a model or a dictionary of weights. "
            + _SAVE_INSTEAD
        )
    if not obj:
        raise ModelLoadError(f"{display} holds an empty dictionary: there are no weights in it.")
    if not _all_tensors(obj):
        odd = [
            f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
        ]
        raise ModelLoadError(
            f"{display} is a dictionary with entries that are not tensors ({_examples(odd)}), "
            "so it is not a state_dict. Save only the weights: "
            "torch.save(model.state_dict(), 'weights.pt')."
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            notes.append(f"Removed the {prefix!r} prefix from every tensor name.")
    return state


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


# ================================================================================================
# Format detection
# ================================================================================================

_OTHER_FORMATS = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras or TensorFlow)"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"ORT", "an ONNX Runtime file"),
)

_SUPPORTED = (
    "a PyTorch state_dict (.pt/.pth/.bin), a .safetensors file, or a torch.export program (.pt2)"
)


# A legacy (non-zip) torch.save file starts with this pickled magic number (protocol 2).
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _sniff(data: bytes) -> str:
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) >= 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") >= 2:
        return "safetensors"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"  # a legacy torch.save file or a bare pickle
    return "unknown"


def _unknown_format(data: bytes, display: str) -> ModelLoadError:
    for magic, what in _OTHER_FORMATS:
        if data.startswith(magic):
            return ModelLoadError(f"{display} is {what}, not a PyTorch model. Upload {_SUPPORTED}.")
    suffix = Path(display).suffix.lower()
    if suffix == ".onnx":
        return ModelLoadError(
            f"{display} looks like an ONNX model, which cannot be explained here. "
            f"Upload {_SUPPORTED}."
        )
    return ModelLoadError(
        f"{display} is not a model file this explorer can read (its contents match no known "
        f"format). Upload {_SUPPORTED}."
    )


def _open_zip(data: bytes, display: str) -> zipfile.ZipFile:
    """Open a zip archive and verify every member's checksum (catches damaged downloads)."""
    limit = _max_upload_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        if sum(m.file_size for m in members) > 2 * limit:
            raise ModelLoadError(
                f"{display} unpacks to more than {2 * limit / 2**20:,.0f} MB; it is refused."
            )
        for member in members:
            if member.CRC == 0 and member.file_size > 0:
                continue  # saved with checksums turned off (torch.serialization.set_crc32_options)
            with archive.open(member) as stream:
                while stream.read(1 << 20):
                    pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{display} is a damaged or incomplete archive ({exc}); download or save it again and "
            "upload the complete file."
        ) from exc
    except NotImplementedError as exc:  # an unsupported compression method
        raise ModelLoadError(f"{display} is an archive this explorer cannot read ({exc}).") from exc
    return archive


def _zip_root(archive: zipfile.ZipFile, marker: str) -> str | None:
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == marker:
            return parts[0]
    return None


def _zip_kind(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    if _zip_root(archive, "archive_format") is not None:
        return "export"
    if any(
        n == "serialized_exported_program.json" or n.endswith("/serialized_exported_program.json")
        for n in names
    ):
        return "export_legacy"
    if any(
        n.endswith("/constants.pkl") or "/code/__torch__" in n or n.startswith("code/")
        for n in names
    ):
        return "torchscript"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    return "unknown"


# ================================================================================================
# torch.load (weights only) and pickles
# ================================================================================================

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load_weights(data: bytes, display: str) -> tuple[Any, str | None]:
    """``torch.load`` with ``weights_only=True``; on a pickled object return (None, its class)."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"), None
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
            f"{display} could not be read as a PyTorch file ({_short(exc)}); it may be damaged or "
            "truncated. Save it again and upload the complete file."
        ) from exc


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_pickle(display: str, global_name: str) -> ModelLoadError:
    return ModelLoadError(
        f"{display} is a pickled Python object ({global_name}), not just tensors. Loading a "
        "pickle runs code stored in the file, so this server refuses it. "
        + _SAVE_INSTEAD
        + f" (The server operator can allow trusted pickles by setting {ALLOW_PICKLE_ENV}=1.)"
    )


def _load_pickled_module(data: bytes, display: str, global_name: str) -> nn.Module:
    if not pickle_allowed():
        raise _refuse_pickle(display, global_name)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as exc:  # the operator trusts this file, but it may still be broken
        raise ModelLoadError(f"{display} could not be unpickled ({_short(exc)}).") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if isinstance(obj, torch.jit.ScriptModule):
        raise _refuse_torchscript(display)
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{display} holds a {type(obj).__name__}, not a torch.nn.Module (or a dictionary with "
            "one under 'model'). " + _SAVE_INSTEAD
        )
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module
    return obj


def _refuse_torchscript(display: str) -> ModelLoadError:
    return ModelLoadError(
        f"{display} is a TorchScript archive. Its layers run as compiled code, so the hooks this "
        "explorer attaches to look inside a layer cannot be registered on them. " + _SAVE_INSTEAD
    )


# ================================================================================================
# torch.export programs
# ================================================================================================

# torch.export.load trusts its input: it unpickles some payloads, evaluates symbolic shape
# expressions with sympy (which uses eval), and resolves node targets by attribute lookup. Before
# loading an upload, the archive is checked so that none of those can run code from the file.

_SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Float", "Rational", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
        "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
        "GreaterThan", "And", "Or", "Not", "Max", "Min", "Abs", "Mod", "floor", "ceiling",
        "Piecewise", "ExprCondPair", "ITE", "Tuple", "Add", "Mul", "oo", "zoo", "nan", "true",
        "false", "True", "False", "BooleanTrue", "BooleanFalse", "Infinity", "NegativeInfinity",
        "NaN", "Half", "One", "Zero", "NegativeOne", "precision",
        # torch.utils._sympy.functions (the growing ones, powers and shifts, are left out)
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "RShift",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
        "RoundDecimal", "ToFloat", "Identity",
        # assumptions passed to Symbol(...)
        "positive", "negative", "integer", "real", "nonnegative", "nonpositive", "nonzero",
        "zero", "finite", "infinite", "even", "odd", "rational", "commutative",
        "extended_real", "extended_positive", "extended_negative", "extended_nonnegative",
        "extended_nonpositive", "extended_nonzero",
    }
)  # fmt: skip
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+\Z")
_OPAQUE_FN = re.compile(r"(?:OpaqueUnaryFn|BitwiseFn)_[a-z_]+\Z")
_EXPR_TOKEN = re.compile(
    r"\s+|(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)|(?P<str>'[^']*')"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~])"
)
_NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?\Z")
_MAX_EXPR_CHARS = 20_000

_OPERATOR_TARGETS = frozenset(
    f"_operator.{name}"
    for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "rshift",
        "truth",
    )
) | frozenset({"math.floor", "math.ceil", "math.trunc", "math.sqrt"})  # fmt: skip
_TORCH_TARGET = re.compile(r"torch\.(?:sym_[a-z]+|_sym_sqrt)\Z")
_OP_TARGET = re.compile(r"torch\.ops\.(?P<ns>\w+)\.(?P<op>\w+)(?:\.\w+)?\Z")
_HIGHER_ORDER_OPS = frozenset(
    {
        "cond", "while_loop", "scan", "map_impl", "wrap_with_set_grad_enabled",
        "wrap_with_autocast", "invoke_subgraph", "auto_functionalized", "auto_functionalized_v2",
    }
)  # fmt: skip
_DENIED_ATEN_OPS = frozenset({"from_file"})  # reads a file named in the graph


def _unsafe_expression(expr: str) -> str | None:
    """Why a symbolic shape expression could do more than arithmetic, or None if it is plain."""
    if len(expr) > _MAX_EXPR_CHARS:
        return "an overlong shape expression"
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            return f"the character {expr[pos]!r} in a shape expression"
        name, text, op = match.group("name"), match.group("str"), match.group("op")
        if name == "Pow":
            # sympy writes x / y as Mul(x, Pow(y, Integer(-1))). Other powers are refused: sympy
            # evaluates numeric ones eagerly, and a huge exponent would never finish.
            if _second_argument(expr, match.end()) not in ("Integer(-1)", "-1"):
                return "a power in a shape expression"
        elif name is not None and not (
            name in _SYMPY_NAMES or _SYMBOL_NAME.match(name) or _OPAQUE_FN.match(name)
        ):
            return f"the name {name!r} in a shape expression"
        if text is not None and not (
            _SYMBOL_NAME.match(text[1:-1]) or _NUMBER_TEXT.match(text[1:-1])
        ):
            return f"the string {text} in a shape expression"
        if op == "**":
            return "a power in a shape expression"
        pos = match.end()
    return None


def _second_argument(expr: str, start: int) -> str | None:
    """The second argument of the call whose name ends at ``start``, or None."""
    if expr[start : start + 1] != "(":
        return None
    depth, commas, begin = 0, 0, None
    for i in range(start, len(expr)):
        char = expr[i]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return expr[begin:i].strip() if begin is not None else None
        elif char == "," and depth == 1:
            commas += 1
            if commas == 1:
                begin = i + 1
            else:
                return None
    return None


def _unsafe_target(target: str) -> str | None:
    """Why a graph node's target is not a plain tensor or shape operation, or None."""
    if target in _OPERATOR_TARGETS or _TORCH_TARGET.match(target):
        return None
    match = _OP_TARGET.match(target)
    if match is not None:
        ns, op = match.group("ns"), match.group("op")
        if ns in ("aten", "prims") and op not in _DENIED_ATEN_OPS:
            return None
        if ns == "higher_order" and op in _HIGHER_ORDER_OPS:
            return None
    return f"the operation {target!r}"


def _walk_json(node: Any) -> Iterator[tuple[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _read_json(archive: zipfile.ZipFile, name: str, display: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError, KeyError) as exc:
        raise ModelLoadError(
            f"{display} is a damaged torch.export archive ({name} is unreadable: {_short(exc)})."
        ) from exc


def _vet_export_archive(archive: zipfile.ZipFile, root: str, display: str) -> None:
    """Refuse a .pt2 archive with anything that ``torch.export.load`` would execute."""
    from torch.export.pt2_archive import constants as pt2

    names = set(archive.namelist())
    prefix = f"{root}/"

    def refuse(reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"{display} is a torch.export program, but it contains {reason}, which would run "
            "code from the file when loaded, so this server refuses it. Export the model again "
            "with torch.export.export and torch.export.save from plain PyTorch layers. (The "
            f"server operator can allow trusted files by setting {ALLOW_PICKLE_ENV}=1.)"
        )

    if any(n.startswith(prefix + pt2.AOTINDUCTOR_DIR) for n in names):
        raise refuse("compiled AOTInductor code")
    model_re = re.compile(re.escape(prefix + pt2.MODELS_DIR) + r"(\w+)\.json\Z")
    models = [m.group(1) for m in map(model_re.match, names) if m is not None]
    if not models:
        raise ModelLoadError(f"{display} is a torch.export archive without a program in it.")
    for model in models:
        if {
            f"{prefix}{pt2.WEIGHTS_DIR}{model}.pt",
            f"{prefix}{pt2.CONSTANTS_DIR}{model}.pt",
        } & names:
            raise refuse("pickled weights in an old layout")
        for config_format, tensor_prefix in (
            (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, None),
            (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.TENSOR_CONSTANT_FILENAME_PREFIX),
        ):
            config_name = prefix + config_format.format(model)
            if config_name not in names:
                continue
            config = _read_json(archive, config_name, display).get("config", {})
            for payload in config.values():
                if not isinstance(payload, dict) or payload.get("use_pickle"):
                    raise refuse("pickled tensors")
                path = str(payload.get("path_name", ""))
                if tensor_prefix is not None and not path.startswith(tensor_prefix):
                    raise refuse("pickled Python objects")
        inputs_name = prefix + pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if inputs_name in names and archive.getinfo(inputs_name).file_size > 0:
            # torch.export.load retries a failed weights-only load with full unpickling.
            try:
                torch.load(io.BytesIO(archive.read(inputs_name)), weights_only=True)
            except Exception as exc:  # anything that is not plain tensors
                raise refuse("example inputs that are not plain tensors") from exc
        program = _read_json(archive, prefix + pt2.MODELS_FILENAME_FORMAT.format(model), display)
        for key, value in _walk_json(program):
            reason = None
            if key == "expr_str" and isinstance(value, str):
                reason = _unsafe_expression(value)
            elif key in ("target", "as_operator") and isinstance(value, str):
                reason = _unsafe_target(value)
            if reason is not None:
                raise refuse(reason)


def _user_input_node(ep: Any, display: str) -> torch.fx.Node:
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelLoadError(
            f"{display} is a torch.export program with {len(user_inputs)} inputs; this explorer "
            "needs a model that takes one batch of images."
        )
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            return node
    raise ModelLoadError(f"{display} is a damaged torch.export program (its input is missing).")


def _exported_in_training(ep: Any) -> bool:
    ops = torch.ops.aten
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is ops.batch_norm.default and len(node.args) > 5 and node.args[5] is True:
            return True
        if node.target in (ops.dropout.default, ops.dropout_.default) and (
            len(node.args) > 2 and node.args[2] is True
        ):
            return True
    return False


def _load_export(
    data: bytes,
    archive: zipfile.ZipFile,
    display: str,
    num_classes: int | None,
    notes: list[str],
) -> _FullModel:
    """Load a .pt2 program; return (module, input size, static batch, classes, output shape)."""
    root = _zip_root(archive, "archive_format")
    if not pickle_allowed():
        _vet_export_archive(archive, str(root), display)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # any failure to decode user bytes; the cause is chained
        raise ModelLoadError(
            f"{display} could not be loaded as a torch.export program ({_short(exc)}). It may be "
            f"damaged, or saved by a PyTorch version incompatible with this server's "
            f"({torch.__version__})."
        ) from exc

    node = _user_input_node(ep, display)
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    if len(shape) != 4:
        raise ModelLoadError(
            f"{display} takes an input of shape {shape}; this explorer needs a model that takes "
            "images as (batch, channels, height, width)."
        )
    example = None
    if ep.example_inputs is not None:
        args, _ = ep.example_inputs
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            example = tuple(args[0].shape)
    static_batch = shape[0] if isinstance(shape[0], int) else None
    if static_batch is not None:
        notes.append(
            f"This program was exported with a fixed batch size of {static_batch}. Attribution "
            "runs many images per batch (one per integration step), so it will fail on other "
            "batch sizes. Export it again with a dynamic batch dimension: torch.export.export("
            f"model, (x,), dynamic_shapes={{{node.name!r}: {{0: torch.export.Dim('batch')}}}})."
        )
    size = []
    for i in (1, 2, 3):
        if isinstance(shape[i], int):
            size.append(shape[i])
        elif example is not None:
            size.append(int(example[i]))
        else:
            size.append(3 if i == 1 else 224)
    if not all(isinstance(d, int) for d in shape[1:]):
        notes.append(
            f"The program accepts several image sizes; {size[1]}x{size[2]} is used by default."
        )
    if _exported_in_training(ep):
        notes.append(
            "The program was exported in training mode (batch norm uses batch statistics, dropout "
            "is active). Call model.eval() before torch.export.export for stable explanations."
        )

    out_val = _export_scores(ep, display)
    out_classes = None
    output_shape = None
    if isinstance(out_val, torch.Tensor):
        _check_export_scores(out_val, display)
        out_classes = out_val.shape[1]  # dimension 1 holds the classes, also per position
        dims = tuple(out_val.shape[1:])
        if all(isinstance(d, int) for d in dims):
            output_shape = tuple(int(d) for d in dims)
    if not isinstance(out_classes, int):
        if num_classes is None:
            raise ModelLoadError(
                f"The number of classes of {display} cannot be read from the program; give it."
            )
        out_classes = num_classes
    elif num_classes is not None and num_classes != out_classes:
        raise ModelLoadError(
            f"{display} has {out_classes} outputs, but {num_classes} classes were asked for. Leave "
            "the number of classes empty to use the program's."
        )

    try:
        module = torch.export.unflatten(ep)
    except Exception as exc:  # unflatten rejects programs it cannot rebuild a module tree for
        raise ModelLoadError(
            f"The layers of {display} could not be rebuilt from the program ({_short(exc)})."
        ) from exc
    return module, (size[0], size[1], size[2]), static_batch, out_classes, output_shape


def _spec_children(spec: Any) -> list[Any]:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _export_scores(ep: Any, display: str) -> Any:
    """The example value (``meta["val"]``) of the program output holding the class scores.

    A program returning one tensor has it as its only output; for a dict output the entry
    under one of :data:`explainer.analysis.SCORE_KEYS` is used (the service reads the same one).
    Anything else is refused with what to do.
    """
    from explainer.analysis import SCORE_KEYS

    outputs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    leaves = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    spec = ep.call_spec.out_spec
    index = 0
    if spec is not None and not spec.is_leaf():
        children = _spec_children(spec)
        keys = spec.context if isinstance(spec.context, (list, tuple)) else None
        is_dict = isinstance(spec.type, type) and issubclass(spec.type, dict)
        key = None
        if is_dict and keys is not None and all(isinstance(k, str) for k in keys):
            key = next((k for k in SCORE_KEYS if k in keys), None)
        if key is None or not children[keys.index(key)].is_leaf():
            if is_dict and keys is not None:
                what = f"a dict (keys: {', '.join(repr(k) for k in keys)})"
                example = f"self.model(x)[{keys[0]!r}]" if keys else "the scores"
            else:
                kind = getattr(spec.type, "__name__", "container")
                what = f"a {kind} of {spec.num_leaves} tensors"
                example = "self.model(x)[0]"
            raise ModelLoadError(
                f"{display} returns {what}; this explorer needs one tensor of class scores "
                "(a dict is read through its 'out' or 'logits' entry). Export a small wrapper "
                f"module whose forward returns only the scores (e.g. return {example})."
            )
        position = keys.index(key)
        index = sum(child.num_leaves for child in children[:position])
    node = leaves[index] if index < len(leaves) else None
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _check_export_scores(value: torch.Tensor, display: str) -> None:
    dims = ["N" if i == 0 else str(d) if isinstance(d, int) else "?" for i, d in
            enumerate(value.shape)]  # fmt: skip
    shape_text = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if value.dim() < 2:
        raise ModelLoadError(
            f"{display} returns scores shaped {shape_text}: "
            + ("one number per image" if value.dim() == 1 else "a single number")
            + ". This explorer explains class scores shaped (N, classes), or (N, classes, ...) "
            "with a score per output position; export the model so that it returns its scores "
            "before any argmax, sum or other reduction."
        )
    if not value.is_floating_point():
        raise ModelLoadError(
            f"{display} returns {value.dtype} values shaped {shape_text} (class indices?), not "
            "class scores; export the model so that it returns its scores before the argmax."
        )


# ================================================================================================
# Full models (export, pickle): which architecture are they?
# ================================================================================================


def _identify(model: nn.Module) -> str | None:
    """The one architecture whose tensors match the model's, if there is exactly one."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not shapes:
        return None
    fits = _fitting_architectures(shapes)
    return fits[0] if len(fits) == 1 else None


def _custom_io(model: nn.Module) -> tuple[tuple[int, int, int], int | None]:
    """Guess input size and number of classes of an unknown model from its first and last layers."""
    channels = 3
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.in_channels
            break
    side = getattr(model, "image_size", 224)
    side = side if isinstance(side, int) else 224
    try:
        classes: int | None = _classes_of(model)
    except ModelLoadError:
        classes = None  # no linear or convolution layer: the caller asks for the number
    return (channels, side, side), classes


# ================================================================================================
# Labels
# ================================================================================================


def load_labels(source: LabelsSource, num_classes: int | None = None) -> list[str]:
    """Read class names from a labels file.

    Parameters
    ----------
    source : str, os.PathLike, bytes or sequence of str
        A path, the file's bytes, or the names themselves. The file holds one name per line, a
        JSON list of names, or a JSON object mapping indices (``"0"``, ``"1"``, ...) to names
        (a value may also be a ``[id, name]`` pair, as in ImageNet's class index file).
    num_classes : int, optional
        When given, the number of names must equal it.

    Returns
    -------
    list[str]
        One name per class, in output order.

    Raises
    ------
    ModelLoadError
        If the file is empty, unreadable, malformed, or names the wrong number of classes.
    """
    _check_num_classes(num_classes)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes, bytearray)):
        labels = [_label_text(item, i, "the list of labels") for i, item in enumerate(source)]
        display = "the list of labels"
    else:
        data, display = _read_source(source, None, "labels file")
        labels = _parse_labels(data, display)
    if not labels:
        raise ModelLoadError(f"{display} names no classes.")
    if num_classes is not None and len(labels) != num_classes:
        raise ModelLoadError(
            f"{display} names {len(labels)} classes, but the model has {num_classes} outputs; "
            "give one name per output."
        )
    return labels


def _label_text(item: Any, index: int, display: str) -> str:
    if isinstance(item, (list, tuple)) and item and isinstance(item[-1], str):
        item = item[-1]  # ["n01440764", "tench"]
    if isinstance(item, bool) or not isinstance(item, (str, int, float)):
        raise ModelLoadError(
            f"Label {index} in {display} is a {type(item).__name__}; every label must be a name."
        )
    text = str(item).strip()
    if not text:
        raise ModelLoadError(f"Label {index} in {display} is empty; every class needs a name.")
    return text


def _parse_labels(data: bytes, display: str) -> list[str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{display} is not UTF-8 text; save it as UTF-8.") from exc
    stripped = text.strip()
    if not stripped:
        raise ModelLoadError(f"{display} is empty; give one class name per line.")
    if stripped[0] in "[{":
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise ModelLoadError(
                f"{display} looks like JSON but is not valid JSON ({exc})."
            ) from exc
        if isinstance(parsed, list):
            return [_label_text(item, i, display) for i, item in enumerate(parsed)]
        return _labels_from_mapping(parsed, display)
    lines = stripped.splitlines()
    labels = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise ModelLoadError(
                f"Line {number} of {display} is empty; every class needs a name (one per line)."
            )
        labels.append(name)
    return labels


def _labels_from_mapping(parsed: dict[str, Any], display: str) -> list[str]:
    by_index: dict[int, str] = {}
    for key, value in parsed.items():
        try:
            index = int(key)
        except ValueError:
            raise ModelLoadError(
                f"{display} maps {key!r} to a name; the keys must be class indices 0, 1, 2, ..."
            ) from None
        if index in by_index:
            raise ModelLoadError(f"{display} names class {index} twice.")
        by_index[index] = _label_text(value, index, display)
    expected = set(range(len(by_index)))
    if set(by_index) != expected:
        missing = sorted(expected - set(by_index))
        extra = sorted(set(by_index) - expected)
        detail = (
            f"no name for class {missing[0]}" if missing else f"an index out of range ({extra[0]})"
        )
        raise ModelLoadError(
            f"{display} has {detail}; the indices must run from 0 to {len(by_index) - 1} "
            "with no gaps."
        )
    return [by_index[i] for i in range(len(by_index))]


# ================================================================================================
# Public entry points
# ================================================================================================


def load_model(
    source: Source,
    *,
    filename: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    labels: LabelsSource | None = None,
) -> LoadedModel:
    """Load a model file (path or uploaded bytes) and prepare it for explanation.

    The format is detected from the contents; ``filename`` only names the file in messages.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        The file, as a path or its bytes.
    filename : str, optional
        Original file name of an upload (used for the model's name and in messages).
    arch : str, optional
        Architecture for weights-only files (``state_dict`` or safetensors): one of
        :func:`list_architectures`. Not needed, and not used, for full models.
    num_classes : int, optional
        Number of outputs; read from the file when omitted, checked against it when given.
    labels : path, bytes or sequence of str, optional
        Class names, as accepted by :func:`load_labels`.

    Returns
    -------
    LoadedModel
        The model in eval mode with its metadata.

    Raises
    ------
    ModelLoadError
        With a sentence the user can act on, for every file or option that cannot be used.
    """
    data, display = _read_source(source, filename, "model file")
    if not data:
        raise ModelLoadError(f"{display} is empty (0 bytes); upload the complete file.")
    _check_num_classes(num_classes)
    digest = _sha256(data)
    notes: list[str] = []
    kind = _sniff(data)
    zip_kind = None

    if kind == "zip":
        archive = _open_zip(data, display)
        zip_kind = _zip_kind(archive)
        if zip_kind == "torchscript":
            raise _refuse_torchscript(display)
        if zip_kind == "export_legacy":
            raise ModelLoadError(
                f"{display} is a torch.export program in an old layout this server does not load. "
                f"Save it again with torch.export.save from PyTorch {torch.__version__}."
            )
        if zip_kind == "export":
            return _finish_full_model(
                _load_export(data, archive, display, num_classes, notes),
                "export", display, digest, arch, labels, notes,
            )  # fmt: skip
        if zip_kind == "unknown":
            raise ModelLoadError(
                f"{display} is a zip archive, but not one PyTorch wrote. Upload {_SUPPORTED}."
            )
        kind = "pickle"  # a torch.save zip: a pickle inside

    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{display} is not a valid safetensors file ({_short(exc)}); it may be damaged or "
                "truncated. Save it again and upload the complete file."
            ) from exc
        source_format = "safetensors"
    elif kind == "pickle":
        if not (zip_kind == "torch" or data.startswith(_TORCH_LEGACY_MAGIC)):
            # torch.load cannot read a bare pickle; unpickling it would only run its code.
            raise ModelLoadError(
                f"{display} is a plain Python pickle, not a file written by torch.save. Loading "
                "a pickle runs code stored in the file, so this server refuses it. " + _SAVE_INSTEAD
            )
        obj, global_name = _torch_load_weights(data, display)
        if global_name is not None:
            module = _load_pickled_module(data, display, global_name)
            module.eval()
            io_info = _pickle_io(module, num_classes, display)
            return _finish_full_model(io_info, "pickle", display, digest, arch, labels, notes)
        state = _unwrap_state_dict(obj, display, notes)
        source_format = "state_dict"
    else:
        raise _unknown_format(data, display)

    if not state:
        raise ModelLoadError(f"{display} holds no tensors.")
    arch, model, more_notes = _model_from_state_dict(state, arch, num_classes, display)
    notes.extend(more_notes)
    model.eval()
    n = _classes_of(model)
    input_size, mean, std = _preprocessing(arch, model)
    if _is_segmentation(arch):
        notes.append(_segmentation_size_note(arch))
    return LoadedModel(
        model=model,
        name=display,
        arch=arch,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=_labels_for(labels, arch, n),
        sha256=digest,
        source_format=source_format,
        num_params=_num_params(model),
        notes=notes,
        output_shape=_output_shape(arch, n, input_size),
    )


def _classes_of(model: nn.Module) -> int:
    """Outputs of the classifier layer (the last linear layer, else the last convolution)."""
    head, _ = _head_layers(model)
    layer = dict(model.named_modules())[head]
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _labels_for(labels: LabelsSource | None, arch: str, num_classes: int) -> list[str]:
    if labels is not None:
        return load_labels(labels, num_classes)
    known = _arch_labels(arch, num_classes) if arch != "custom" else None
    return known if known is not None else _default_labels(num_classes)


def _pickle_io(module: nn.Module, num_classes: int | None, display: str) -> _FullModel:
    _, classes = _custom_io(module)
    if classes is None:
        if num_classes is None:
            raise ModelLoadError(
                f"The number of classes of {display} cannot be read from its layers; give it."
            )
        classes = num_classes
    elif num_classes is not None and num_classes != classes:
        raise ModelLoadError(
            f"The last layer of {display} has {classes} outputs, but {num_classes} classes were "
            "asked for. Leave the number of classes empty to use the model's."
        )
    return module, None, None, classes, None


def _finish_full_model(
    loaded: _FullModel,
    source_format: str,
    display: str,
    digest: str,
    arch_hint: str | None,
    labels: LabelsSource | None,
    notes: list[str],
) -> LoadedModel:
    """Shared ending for files that carry their own network (export programs, pickles)."""
    module, input_size, static_batch, classes, output_shape = loaded
    module.eval()
    if arch_hint is not None:
        notes.append(
            f"{display} carries its own network, so the chosen architecture ({arch_hint}) was "
            "not needed."
        )
    arch = _identify(module) or "custom"
    if arch != "custom":
        size, mean, std = _preprocessing(arch, module)
        if input_size is None and _is_segmentation(arch):
            notes.append(_segmentation_size_note(arch))
        input_size = input_size or size
    else:
        guessed, _ = _custom_io(module)
        input_size = input_size or guessed
        channels = input_size[0]
        mean = IMAGENET_MEAN if channels == 3 else (0.5,) * channels
        std = IMAGENET_STD if channels == 3 else (0.5,) * channels
        notes.append(
            "The normalisation the model was trained with is unknown; "
            + ("ImageNet's mean and std are" if channels == 3 else "mean 0.5 and std 0.5 are")
            + " assumed. Change them under preprocessing if the model was trained otherwise."
        )
    return LoadedModel(
        model=module,
        name=display,
        arch=arch,
        input_size=input_size,
        mean=tuple(mean),
        std=tuple(std),
        labels=_labels_for(labels, arch, classes),
        sha256=digest,
        source_format=source_format,
        num_params=_num_params(module),
        notes=notes,
        static_batch=static_batch,
        output_shape=output_shape,
    )


def build_model(
    arch: str, *, num_classes: int | None = None, pretrained: bool = False
) -> LoadedModel:
    """Build an architecture by name, with random or locally cached pretrained weights.

    Random weights are drawn from a fixed seed, so the same arguments give the same model (and
    the digest of the arguments describes it).

    Parameters
    ----------
    arch : str
        One of :func:`list_architectures`.
    num_classes : int, optional
        Number of outputs (default: 1000 for torchvision's classifiers, 21 for its segmentation
        models, the demo's classes for ``demo_cnn``).
    pretrained : bool
        Load torchvision's default weights from the local torch hub cache
        (``torch.hub.get_dir()/checkpoints``); nothing is ever downloaded. For ``demo_cnn``, load
        the built-in trained demo model.

    Returns
    -------
    LoadedModel
        The model in eval mode, without training-only auxiliary classifiers.

    Raises
    ------
    ModelLoadError
        For an unknown architecture, a bad number of classes, or pretrained weights missing from
        the cache.
    """
    _check_num_classes(num_classes)
    arch = _resolve_arch(arch)
    if pretrained:
        return _build_pretrained(arch, num_classes)

    variant = _variants(arch)[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _instantiate(arch, num_classes, variant, meta=False)
    model.eval()
    classes = _classes_of(model)
    input_size, mean, std = _preprocessing(arch, model)
    notes = [
        "random weights: the model has not been trained, so its predictions and "
        "explanations show structure, not learned features."
    ]
    if _is_segmentation(arch):
        notes.append(_segmentation_size_note(arch))
    spec = json.dumps(
        {"arch": arch, "num_classes": classes, "pretrained": False, "seed": 0,
         "torch": torch.__version__},
        sort_keys=True,
    )  # fmt: skip
    return LoadedModel(
        model=model,
        name=f"{arch} (random weights)",
        arch=arch,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=_arch_labels(arch, classes) or _default_labels(classes),
        sha256=_sha256(spec.encode()),
        source_format="builtin" if arch == DEMO_ARCH else "torchvision",
        num_params=_num_params(model),
        notes=notes,
        output_shape=_output_shape(arch, classes, input_size),
    )


_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def _build_pretrained(arch: str, num_classes: int | None) -> LoadedModel:
    if arch == DEMO_ARCH:
        lm = _demo_module().load_demo_model()
        if num_classes is not None and num_classes != lm.num_classes:
            raise ModelLoadError(
                f"The trained demo model has {lm.num_classes} classes, not {num_classes}."
            )
        return lm

    from urllib.parse import urlparse

    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    categories = weights.meta.get("categories") or []
    if num_classes is not None and num_classes != len(categories):
        raise ModelLoadError(
            f"The pretrained {arch} weights have {len(categories)} classes, not {num_classes}; "
            "leave the number of classes empty."
        )
    filename = os.path.basename(urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise ModelLoadError(
            f"The pretrained weights for {arch} are not in the local cache, and this server never "
            f"downloads. On a machine with internet access, download {weights.url} and place the "
            f"file at {path}."
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"The cached weights at {path} could not be read: {exc}.") from exc
    digest = _sha256(data)
    expected = _HASH_IN_NAME.search(filename)
    if expected is not None and not digest.startswith(expected.group(1)):
        raise ModelLoadError(
            f"The cached weights at {path} are damaged or incomplete (their checksum does not "
            f"match); download {weights.url} again."
        )
    obj, global_name = _torch_load_weights(data, str(path))
    if global_name is not None:
        raise _refuse_pickle(str(path), global_name)
    notes: list[str] = []
    state = _unwrap_state_dict(obj, str(path), notes)

    kwargs: dict[str, Any] = {}
    if arch.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif arch == "maxvit_t":
        kwargs["input_size"] = weights.meta["min_size"]
    elif arch in _AUX_ARCHS:
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif _is_segmentation(arch):
        # With or without the auxiliary classifier, as the cached file holds it.
        sig, _ = _best_signature(arch, {k: tuple(v.shape) for k, v in state.items()})
        kwargs.update(_builder_kwargs(arch, sig.variant))
    with _MetaAllocation():
        model = torchvision.models.get_model(
            arch, weights=None, num_classes=len(categories), **kwargs
        )
    state = _match_dtypes(state, model.state_dict(), str(path), notes)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"The cached weights at {path} do not fit {arch} ({_short(exc)}); download "
            f"{weights.url} again."
        ) from exc
    if _has_meta_tensors(model):
        raise ModelLoadError(f"The cached weights at {path} do not hold every tensor {arch} needs.")
    # How the cached file was read is not news to the user; what the model is, is.
    about = [f"Pretrained torchvision weights {weights.name}, read from the local cache."]
    if _drop_aux_heads(arch, model) and _is_segmentation(arch):
        about.append(_aux_note(arch))
    model.eval()
    input_size, mean, std = _preprocessing(arch, model, weights)
    if _is_segmentation(arch):
        about.append(_segmentation_size_note(arch))
    return LoadedModel(
        model=model,
        name=f"{arch} ({weights.name})",
        arch=arch,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=list(categories),
        sha256=digest,
        source_format="torchvision",
        num_params=_num_params(model),
        notes=about,
        output_shape=_output_shape(arch, len(categories), input_size),
    )


def describe_model(lm: LoadedModel) -> dict[str, str]:
    """A few rows that summarise a loaded model, for display.

    Returns
    -------
    dict[str, str]
        ``Architecture``, ``Parameters``, ``Input size``, ``Classes`` and ``Format`` (plus
        ``Batch size`` for programs exported with a fixed one, and ``Output`` for models that
        score every output position).
    """
    channels, height, width = lm.input_size
    n = lm.num_params
    params = f"{n:,}" if n < 1_000_000 else f"{n:,} ({n / 1e6:.1f} M)"
    rows = {
        "Architecture": lm.arch,
        "Parameters": params,
        "Input size": f"{channels} × {height} × {width}",
        "Classes": f"{lm.num_classes:,}",
        "Format": _FORMAT_NAMES.get(lm.source_format, lm.source_format),
    }
    if lm.static_batch is not None:
        rows["Batch size"] = f"fixed at {lm.static_batch}"
    if lm.output_shape is not None and len(lm.output_shape) > 1:
        grid = " × ".join(str(d) for d in lm.output_shape[1:])
        rows["Output"] = f"{lm.output_shape[0]:,} class scores at each of {grid} positions"
    return rows
