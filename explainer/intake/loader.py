"""``load_model``: a user's file, whatever its format, to a model ready to explain.

What a file holds is read from its bytes, never from its name:

- a ``state_dict`` (``torch.save`` zip or legacy file, also wrapped under ``state_dict`` /
  ``model`` / ``model_state_dict`` / ``net`` and with DataParallel's ``module.`` prefix), loaded
  with ``torch.load(..., weights_only=True)`` only, plus an architecture
  (:mod:`~explainer.intake.state_dict`);
- a ``.safetensors`` file plus an architecture (:mod:`~explainer.intake.safetensors_file`);
- a ``torch.export`` program (``.pt2``), vetted and rebuilt without unpickling anything
  (:mod:`~explainer.intake.export`);
- a TorchScript archive: refused (hooks cannot be attached to its layers);
- a pickled module: refused unless the server operator set ``EXPLAINER_ALLOW_PICKLE=1``
  (:mod:`~explainer.intake.pickled`).
"""

from __future__ import annotations

import torch
from torch import nn

from explainer.errors import ModelLoadError
from explainer.intake import registry
from explainer.intake.export import FullModel, load_export
from explainer.intake.formats import (
    SAVE_INSTEAD,
    SUPPORTED,
    TORCH_LEGACY_MAGIC,
    open_zip,
    sniff,
    unknown_format,
    zip_kind,
)
from explainer.intake.labels import LabelsSource, check_class_count, check_num_classes, load_labels
from explainer.intake.loaded import LoadedModel
from explainer.intake.pickled import load_pickled_module, refuse_torchscript
from explainer.intake.safetensors_file import load_safetensors_state
from explainer.intake.sources import Source, read_source, sha256
from explainer.intake.state_dict import torch_load_weights, unwrap_state_dict

__all__ = ["load_model"]


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
        :func:`~explainer.intake.list_architectures`. Not needed, and not used, for full models.
    num_classes : int, optional
        Number of outputs; read from the file when omitted, checked against it when given.
    labels : path, bytes or sequence of str, optional
        Class names, as accepted by :func:`~explainer.intake.load_labels`.

    Returns
    -------
    LoadedModel
        The model in eval mode with its metadata.

    Raises
    ------
    ModelLoadError
        With a sentence the user can act on, for every file or option that cannot be used,
        and for files beyond the operator's limits (``EXPLAINER_MAX_UPLOAD_MB``,
        ``EXPLAINER_MAX_CLASSES``, ``EXPLAINER_MAX_INPUT_PIXELS``).
    """
    data, display = read_source(source, filename, "model file")
    if not data:
        raise ModelLoadError(f"{display} is empty (0 bytes); upload the complete file.")
    check_num_classes(num_classes)
    digest = sha256(data)
    notes: list[str] = []
    kind = sniff(data)
    archive_kind = None

    if kind == "zip":
        archive = open_zip(data, display)
        archive_kind = zip_kind(archive)
        if archive_kind == "torchscript":
            raise refuse_torchscript(display)
        if archive_kind == "export_legacy":
            raise ModelLoadError(
                f"{display} is a torch.export program in an old layout this server does not load. "
                f"Save it again with torch.export.save from PyTorch {torch.__version__}."
            )
        if archive_kind == "export":
            return _finish_full_model(
                load_export(archive, display, num_classes, notes),
                "export", display, digest, arch, labels, notes,
            )  # fmt: skip
        if archive_kind == "unknown":
            raise ModelLoadError(
                f"{display} is a zip archive, but not one PyTorch wrote. Upload {SUPPORTED}."
            )
        kind = "pickle"  # a torch.save zip: a pickle inside

    if kind == "safetensors":
        state = load_safetensors_state(data, display)
        source_format = "safetensors"
    elif kind == "pickle":
        if not (archive_kind == "torch" or data.startswith(TORCH_LEGACY_MAGIC)):
            # torch.load cannot read a bare pickle; unpickling it would only run its code.
            raise ModelLoadError(
                f"{display} is a plain Python pickle, not a file written by torch.save. Loading "
                "a pickle runs code stored in the file, so this server refuses it. " + SAVE_INSTEAD
            )
        obj, global_name = torch_load_weights(data, display)
        if global_name is not None:
            module = load_pickled_module(data, display, global_name)
            module.eval()
            io_info = _pickle_io(module, num_classes, display)
            return _finish_full_model(io_info, "pickle", display, digest, arch, labels, notes)
        state = unwrap_state_dict(obj, display, notes)
        source_format = "state_dict"
    else:
        raise unknown_format(data, display)

    if not state:
        raise ModelLoadError(f"{display} holds no tensors.")
    arch, model, more_notes = registry.model_from_state_dict(state, arch, num_classes, display)
    notes.extend(more_notes)
    model.eval()
    n = registry.classes_of(model)
    input_size, mean, std = registry.preprocessing(arch, model)
    if registry.is_segmentation(arch):
        notes.append(registry.segmentation_size_note(arch))
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
        num_params=registry.num_params(model),
        notes=notes,
        output_shape=registry.output_shape(arch, n, input_size),
    )


def _labels_for(labels: LabelsSource | None, arch: str, num_classes: int) -> list[str]:
    if labels is not None:
        return load_labels(labels, num_classes)
    known = registry.architecture(arch).labels(num_classes) if arch != "custom" else None
    return known if known is not None else registry.default_labels(num_classes)


def _pickle_io(module: nn.Module, num_classes: int | None, display: str) -> FullModel:
    _, classes = registry.custom_io(module)
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
    check_class_count(classes, f"The last layer of {display}")
    return module, None, None, classes, None


def _finish_full_model(
    loaded: FullModel,
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
    arch = registry.identify(module) or "custom"
    if arch != "custom":
        size, mean, std = registry.preprocessing(arch, module)
        if input_size is None and registry.is_segmentation(arch):
            notes.append(registry.segmentation_size_note(arch))
        input_size = input_size or size
    else:
        guessed, _ = registry.custom_io(module)
        input_size = input_size or guessed
        channels = input_size[0]
        mean = registry.IMAGENET_MEAN if channels == 3 else (0.5,) * channels
        std = registry.IMAGENET_STD if channels == 3 else (0.5,) * channels
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
        num_params=registry.num_params(module),
        notes=notes,
        static_batch=static_batch,
        output_shape=output_shape,
    )
