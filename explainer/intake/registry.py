"""The architecture registry: one table of what each architecture is, and matching files to it.

Architectures are torchvision's classification and semantic segmentation models plus the
project's ``demo_cnn``. Each has one :class:`Architecture` row: its family (members share layer
names), task, the constructor variants that change which tensors it has, the options always
passed to its builder, its training-only heads, its preprocessing and the class names of its
known training sets. Nothing here downloads anything: torchvision's builders are always called
with ``weights=None`` (and ``weights_backbone=None`` for segmentation models, whose builders would
otherwise fetch pretrained backbone weights).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import itertools
import json
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from explainer import demo, limits
from explainer.errors import ModelLoadError
from explainer.intake.labels import check_class_count, check_num_classes
from explainer.intake.loaded import LoadedModel
from explainer.intake.pickled import refuse_pickle
from explainer.intake.sources import setting, sha256, short
from explainer.intake.state_dict import match_dtypes, torch_load_weights, unwrap_state_dict

__all__ = [
    "DEMO_ARCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_INPUT_PIXELS_ENV",
    "Architecture",
    "architecture",
    "build_model",
    "check_input_size",
    "classes_of",
    "custom_io",
    "default_labels",
    "identify",
    "list_architectures",
    "model_from_state_dict",
    "offered_architectures",
    "preprocessing",
    "segmentation_size_note",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet images (pixel values in [0, 1])."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet images (pixel values in [0, 1])."""

DEMO_ARCH = demo.ARCH_NAME
"""Architecture name of the project's demo CNN (:mod:`explainer.demo`)."""

MAX_INPUT_PIXELS_ENV = "EXPLAINER_MAX_INPUT_PIXELS"
"""Environment variable holding the largest height x width of a model's input."""

# Default input side of segmentation models. torchvision trained their weights on images resized
# to 520 pixels, but the models take any size and score every pixel of it; 224 keeps the dozens
# of forward passes an attribution needs affordable on a CPU.
_SEGMENTATION_SIDE = 224
# Classifiers built with auxiliary classifiers that only matter in training.
_AUX_CLASSIFIERS = ("googlenet", "inception_v3")
# Top-level modules holding auxiliary classifiers (torchvision's names), wherever they occur.
_AUX_MODULES = ("aux1", "aux2", "AuxLogits", "aux_classifier")


@dataclass(frozen=True)
class Architecture:
    """One row of the registry.

    Attributes
    ----------
    name : str
        The name :func:`list_architectures` gives.
    family : str
        The module that defines it; members of a family share their layer names.
    task : str
        ``"classification"``, ``"segmentation"`` or ``"demo"``.
    variants : tuple of mappings
        Constructor options that change which tensors the network has; the last one is what
        :func:`build_model` uses (without training-only heads).
    build_kwargs : mapping
        Options always passed to the builder.
    aux_heads : tuple[str, ...]
        Attributes holding training-only auxiliary classifiers.
    input_size : tuple[int, int, int]
        Default input as ``(channels, height, width)``.
    mean, std : tuple[float, ...]
        Normalisation of its training images.
    label_sets : tuple of tuples of str
        Class names of its known training sets (ImageNet, Pascal VOC, the demo's shapes).
    """

    name: str
    family: str
    task: str
    variants: tuple[Mapping[str, Any], ...]
    build_kwargs: Mapping[str, Any]
    aux_heads: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_sets: tuple[tuple[str, ...], ...]

    @property
    def is_segmentation(self) -> bool:
        """Whether it scores every pixel (torchvision's segmentation models)."""
        return self.task == "segmentation"

    def labels(self, num_classes: int) -> list[str] | None:
        """The names of a known training set with ``num_classes`` classes, if there is one."""
        for names in self.label_sets:
            if len(names) == num_classes:
                return list(names)
        return None


_FROZEN = types.MappingProxyType


@functools.cache
def _torchvision_names() -> tuple[frozenset[str], frozenset[str]]:
    """torchvision's (classification, segmentation) model names."""
    import torchvision

    segmentation = frozenset(torchvision.models.list_models(module=torchvision.models.segmentation))
    classification = frozenset(torchvision.models.list_models(module=torchvision.models))
    return classification, segmentation


@functools.cache
def _demo_row() -> Architecture:
    return Architecture(
        name=DEMO_ARCH,
        family="explainer.demo",
        task="demo",
        variants=(_FROZEN({}),),
        build_kwargs=_FROZEN({}),
        aux_heads=(),
        input_size=tuple(demo.DEMO_INPUT_SIZE),  # type: ignore[arg-type]
        mean=tuple(demo.DEMO_MEAN),
        std=tuple(demo.DEMO_STD),
        label_sets=(tuple(demo.DEMO_LABELS),),
    )


@functools.cache
def _torchvision_row(name: str) -> Architecture:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    segmentation = name in _torchvision_names()[1]
    build_kwargs: dict[str, Any] = {}
    variants: tuple[Mapping[str, Any], ...] = (_FROZEN({}),)
    aux_heads: tuple[str, ...] = ()
    if name in _AUX_CLASSIFIERS:
        # Say explicitly what torchvision would otherwise warn about choosing by default.
        build_kwargs["init_weights"] = True
        variants = (_FROZEN({"aux_logits": True}), _FROZEN({"aux_logits": False}))
        aux_heads = ("AuxLogits", "aux1", "aux2")
    if segmentation:
        # The segmentation builders download ImageNet backbone weights unless told not to.
        build_kwargs["weights_backbone"] = None
        aux_heads = ("aux_classifier",)
        if "aux_loss" in inspect.signature(builder).parameters:  # LR-ASPP has no aux head
            # Checkpoints trained with aux_loss=True carry aux_classifier.*; others do not.
            variants = (_FROZEN({"aux_loss": True}), _FROZEN({"aux_loss": False}))
    weights = list(torchvision.models.get_model_weights(name))
    default = torchvision.models.get_model_weights(name).DEFAULT
    keywords = getattr(default.transforms, "keywords", {})
    crop = keywords.get("crop_size", 224)
    if segmentation:
        crop = _SEGMENTATION_SIDE  # their weights resize (no crop) to 520; see above
    height, width = (crop[0], crop[-1]) if isinstance(crop, (list, tuple)) else (crop, crop)
    return Architecture(
        name=name,
        family=builder.__module__,
        task="segmentation" if segmentation else "classification",
        variants=variants,
        build_kwargs=_FROZEN(build_kwargs),
        aux_heads=aux_heads,
        input_size=(3, int(height), int(width)),
        mean=tuple(keywords.get("mean", IMAGENET_MEAN)),
        std=tuple(keywords.get("std", IMAGENET_STD)),
        label_sets=tuple(
            tuple(w.meta["categories"]) for w in weights if w.meta.get("categories") is not None
        ),
    )


def list_architectures() -> list[str]:
    """Names of the architectures a weights-only file can be loaded into.

    Returns
    -------
    list[str]
        torchvision's image classification models, torchvision's semantic segmentation models
        (``fcn_*``, ``deeplabv3_*``, ``lraspp_*``: they score every pixel and return a dict
        whose ``"out"`` entry is explained) and ``"demo_cnn"``, sorted.
    """
    classification, segmentation = _torchvision_names()
    return sorted([*classification, *segmentation, DEMO_ARCH])


def architecture(name: str) -> Architecture:
    """The registry row of ``name``, one of :func:`list_architectures` (spelled exactly)."""
    if name == DEMO_ARCH:
        return _demo_row()
    return _torchvision_row(name)


def is_segmentation(name: str) -> bool:
    """Whether ``name`` is one of torchvision's segmentation models."""
    return name in _torchvision_names()[1]


def resolve_arch(arch: str) -> str:
    """The registered spelling of ``arch``, or an error suggesting close names."""
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


def check_input_size(height: int, width: int, display: str) -> None:
    """Refuse an input of more than :func:`explainer.limits.max_input_pixels` pixels."""
    most = setting(limits.max_input_pixels)
    if height * width > most:
        raise ModelLoadError(
            f"{display} takes {height}x{width} images ({height * width:,} pixels), more than the "
            f"{most:,} pixels this server accepts for a model's input. Export the model for "
            f"smaller images, or ask the operator to raise {MAX_INPUT_PIXELS_ENV}."
        )


# ================================================================================================
# Building networks
# ================================================================================================


class _MetaAllocation(TorchFunctionMode):
    """Allocate parameter-sized tensors on the meta device and skip their random init.

    ``torch.device("meta")`` would also move the small index computations some builders run
    (``torch.arange(...).tolist()`` in RegNet) to the meta device, where they fail; this mode only
    redirects the allocating factories and turns in-place initialisers on meta tensors into
    no-ops. Small tensors made by other factories stay real, which is harmless.
    """

    _FACTORIES = frozenset(
        {
            torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
            torch.randn, torch.randint, torch.normal,
        }
    )  # fmt: skip
    _INITIALISERS = frozenset(
        {
            nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_normal_,
            nn.init.kaiming_uniform_, nn.init.xavier_normal_, nn.init.xavier_uniform_,
            nn.init.constant_, nn.init.zeros_, nn.init.ones_, nn.init.orthogonal_, nn.init.eye_,
            nn.init.dirac_, torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_,
            torch.Tensor.fill_, torch.Tensor.copy_, torch.Tensor.erfinv_, torch.Tensor.mul_,
            torch.Tensor.add_, torch.Tensor.clamp_,
        }
    )  # fmt: skip

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
    variant: Mapping[str, Any] = _FROZEN({}),
    *,
    meta: bool,
) -> nn.Module:
    """Build ``arch`` with random (``meta=False``) or unallocated (``meta=True``) weights."""
    if arch == DEMO_ARCH:

        def build() -> nn.Module:
            if num_classes is None:
                return demo.build_demo_model()
            return demo.build_demo_model(num_classes)

    else:
        import torchvision

        kwargs = {**architecture(arch).build_kwargs, **variant}
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


def classes_of(model: nn.Module) -> int:
    """Outputs of the classifier layer (the last linear layer, else the last convolution)."""
    head, _ = _head_layers(model)
    layer = dict(model.named_modules())[head]
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _drop_aux_heads(arch: str, model: nn.Module) -> bool:
    """Remove training-only auxiliary classifiers; True if there were any.

    GoogLeNet and Inception v3 return only the main logits in eval mode anyway. torchvision's
    segmentation models compute their ``"aux"`` output whenever ``aux_classifier`` is set; it
    never feeds ``"out"``, so removing it saves that work and keeps its layers out of the tree.
    """
    dropped = False
    for attr in architecture(arch).aux_heads:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, None)
            dropped = True
    if dropped and not is_segmentation(arch):
        model.aux_logits = False
    return dropped


def _aux_note(arch: str) -> str:
    if is_segmentation(arch):
        return (
            "Removed the auxiliary classifier (aux_classifier), which only takes part in "
            "training: the model now returns only 'out', whose scores are unchanged, and each "
            "forward pass skips the auxiliary head."
        )
    return "Removed the auxiliary classifiers, which only take part in training."


def segmentation_size_note(arch: str) -> str:
    """Why a segmentation model's default input is smaller than its weights were trained on."""
    side = _SEGMENTATION_SIDE
    return (
        f"Input size {side} × {side}, to keep attribution fast on a CPU: torchvision's "
        f"pretrained {arch} weights were trained on images resized to 520 pixels, and the model "
        "takes any size (its scores have the input's height and width)."
    )


def output_shape(arch: str, classes: int, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    """Scores for one image: ``(classes,)``, or ``(classes, H, W)`` for segmentation models."""
    if is_segmentation(arch):
        # torchvision's segmentation models upsample their scores to the input's size.
        return (classes, input_size[1], input_size[2])
    return (classes,)


def preprocessing(
    arch: str, model: nn.Module, weights: Any = None
) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation for an architecture (from the registry and the model)."""
    row = architecture(arch)
    size, mean, std = row.input_size, row.mean, row.std
    if weights is not None and not row.is_segmentation:
        keywords = getattr(weights.transforms, "keywords", {})
        crop = keywords.get("crop_size", size[1])
        height, width = (crop[0], crop[-1]) if isinstance(crop, (list, tuple)) else (crop, crop)
        size = (3, int(height), int(width))
        mean, std = tuple(keywords.get("mean", mean)), tuple(keywords.get("std", std))
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int) and row.task == "classification":
        # Vision transformers are built for one image size, which weights=None leaves at 224.
        size = (3, image_size, image_size)
    return size, mean, std


def default_labels(num_classes: int) -> list[str]:
    """``["class 0", "class 1", ...]``."""
    return [f"class {i}" for i in range(num_classes)]


def num_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


# ================================================================================================
# Matching a file's tensors to an architecture
# ================================================================================================


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
    for variant in architecture(arch).variants:
        model = _instantiate(arch, None, variant, meta=True)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        head, per_class = _head_layers(model)
        class_keys = frozenset(
            f"{layer}.{p}" for layer in per_class for p in ("weight", "bias")
        ) & set(shapes)
        result.append(
            _Signature(
                arch=arch,
                variant=_FROZEN(dict(variant)),
                shapes=_FROZEN(shapes),
                head=f"{head}.weight",
                class_keys=class_keys,
            )
        )
    return tuple(result)


@functools.cache
def _families() -> tuple[tuple[str, ...], ...]:
    """Architectures grouped by family (same layer names)."""
    groups: dict[str, list[str]] = {}
    for name in list_architectures():
        groups.setdefault(architecture(name).family, []).append(name)
    return tuple(tuple(names) for names in groups.values())


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


# Opens the list of fitting architectures at the end of a load failure's message.
_FIT_HINT = " Architectures whose layers match this file: "


def _fit_hint(fits: Sequence[str]) -> str:
    if not fits:
        return (
            " No torchvision architecture or demo_cnn has these layers; if the model is your own "
            "design, export it with torch.export and upload the .pt2 file."
        )
    shown = ", ".join(fits[:8]) + (f" and {len(fits) - 8} more" if len(fits) > 8 else "")
    return f"{_FIT_HINT}{shown}."


def offered_architectures(message: str) -> list[str]:
    """The architectures a load failure's message names as fitting the file, in its order.

    The message may come from a worker process: only names of :func:`list_architectures` count,
    and only those of the hint at its end (a file name earlier in the text cannot add any).
    """
    _, found, tail = message.rpartition(_FIT_HINT.strip())
    if not found:
        return []
    known = set(list_architectures())
    names = [n.strip() for n in tail.split(" and ", 1)[0].rstrip(". ").split(",")]
    return list(dict.fromkeys(n for n in names if n in known))


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


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


def model_from_state_dict(
    state: dict[str, torch.Tensor],
    arch: str | None,
    num_classes: int | None,
    display: str,
) -> tuple[str, nn.Module, list[str]]:
    """Build the architecture and load ``state`` into it; return (arch, model, notes).

    The tensors' layouts must have been vetted (:func:`~explainer.intake.state_dict.vet_tensors`)
    before: here their data is cast and copied.
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    detected: list[str] = []
    if arch is None:
        fits = _fitting_architectures(shapes)
        if len(fits) != 1:
            raise ModelLoadError(
                f"{display} holds only weights (a state_dict), not the network they belong to: "
                f"pick the architecture it was trained with.{_fit_hint(fits)}"
            )
        arch = fits[0]
        detected.append(
            f"Architecture detected from the file: {arch}, the only one whose layers match its "
            "weights."
        )
    arch = resolve_arch(arch)
    sig, comparison = _best_signature(arch, shapes)
    if not comparison.fits:
        raise ModelLoadError(_mismatch_message(display, arch, comparison, shapes))

    file_classes = shapes[sig.head][0]
    check_class_count(file_classes, f"The classifier in {display} ({sig.head})")
    if num_classes is not None and num_classes != file_classes:
        raise ModelLoadError(
            f"The classifier in {display} ({sig.head}) has {file_classes} outputs, but "
            f"{num_classes} classes were asked for. Leave the number of classes empty to use the "
            "file's."
        )

    model = _instantiate(arch, file_classes, sig.variant, meta=True)
    notes: list[str] = detected
    state = match_dtypes(state, model.state_dict(), display, notes)
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


def identify(model: nn.Module) -> str | None:
    """The one architecture whose tensors match the model's, if there is exactly one."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not shapes:
        return None
    fits = _fitting_architectures(shapes)
    return fits[0] if len(fits) == 1 else None


def custom_io(model: nn.Module) -> tuple[tuple[int, int, int], int | None]:
    """Guess input size and number of classes of an unknown model from its first and last layers."""
    channels = 3
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.in_channels
            break
    side = getattr(model, "image_size", 224)
    side = side if isinstance(side, int) else 224
    try:
        classes: int | None = classes_of(model)
    except ModelLoadError:
        classes = None  # no linear or convolution layer: the caller asks for the number
    return (channels, side, side), classes


# ================================================================================================
# build_model
# ================================================================================================


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
    check_num_classes(num_classes)
    arch = resolve_arch(arch)
    if pretrained:
        return _build_pretrained(arch, num_classes)

    variant = architecture(arch).variants[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _instantiate(arch, num_classes, variant, meta=False)
    model.eval()
    classes = classes_of(model)
    input_size, mean, std = preprocessing(arch, model)
    notes = [
        "random weights: the model has not been trained, so its predictions and "
        "explanations show structure, not learned features."
    ]
    if is_segmentation(arch):
        notes.append(segmentation_size_note(arch))
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
        labels=architecture(arch).labels(classes) or default_labels(classes),
        sha256=sha256(spec.encode()),
        source_format="builtin" if arch == DEMO_ARCH else "torchvision",
        num_params=num_params(model),
        notes=notes,
        output_shape=output_shape(arch, classes, input_size),
    )


_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def _build_pretrained(arch: str, num_classes: int | None) -> LoadedModel:
    if arch == DEMO_ARCH:
        from explainer.intake.builtin import load_demo_model

        lm = load_demo_model()
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
    digest = sha256(data)
    expected = _HASH_IN_NAME.search(filename)
    if expected is not None and not digest.startswith(expected.group(1)):
        raise ModelLoadError(
            f"The cached weights at {path} are damaged or incomplete (their checksum does not "
            f"match); download {weights.url} again."
        )
    obj, global_name = torch_load_weights(data, str(path))
    if global_name is not None:
        raise refuse_pickle(str(path), global_name)
    notes: list[str] = []
    state = unwrap_state_dict(obj, str(path), notes)

    kwargs: dict[str, Any] = {}
    if arch.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif arch == "maxvit_t":
        kwargs["input_size"] = weights.meta["min_size"]
    elif architecture(arch).aux_heads and not is_segmentation(arch):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif is_segmentation(arch):
        # With or without the auxiliary classifier, as the cached file holds it.
        sig, _ = _best_signature(arch, {k: tuple(v.shape) for k, v in state.items()})
        kwargs.update({**architecture(arch).build_kwargs, **sig.variant})
    with _MetaAllocation():
        model = torchvision.models.get_model(
            arch, weights=None, num_classes=len(categories), **kwargs
        )
    state = match_dtypes(state, model.state_dict(), str(path), notes)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"The cached weights at {path} do not fit {arch} ({short(exc)}); download "
            f"{weights.url} again."
        ) from exc
    if _has_meta_tensors(model):
        raise ModelLoadError(f"The cached weights at {path} do not hold every tensor {arch} needs.")
    # How the cached file was read is not news to the user; what the model is, is.
    about = [f"Pretrained torchvision weights {weights.name}, read from the local cache."]
    if _drop_aux_heads(arch, model) and is_segmentation(arch):
        about.append(_aux_note(arch))
    model.eval()
    input_size, mean, std = preprocessing(arch, model, weights)
    if is_segmentation(arch):
        about.append(segmentation_size_note(arch))
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
        num_params=num_params(model),
        notes=about,
        output_shape=output_shape(arch, len(categories), input_size),
    )
