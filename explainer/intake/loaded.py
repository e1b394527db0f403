"""What intake hands back: a model ready to explain and plain data that describes it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["FORMAT_NAMES", "LoadedModel", "ModelInfo", "describe_model"]

FORMAT_NAMES = {
    "state_dict": "PyTorch state_dict (weights only)",
    "safetensors": "safetensors (weights only)",
    "export": "torch.export program (.pt2)",
    "pickle": "pickled module (allowed by the server)",
    "torchvision": "torchvision architecture",
    "builtin": "built-in demo",
}
"""Display names of the values of ``source_format``."""


@dataclass(frozen=True)
class ModelInfo:
    """Everything known about a loaded model except the module itself, as plain data.

    Every field is a str, int, float, None or a tuple of those, so a ``ModelInfo`` can be
    pickled, compared and sent to another process. The fields mean what they mean on
    :class:`LoadedModel`; ``labels`` and ``notes`` are tuples.
    """

    name: str
    arch: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    sha256: str
    source_format: str
    num_params: int = 0
    notes: tuple[str, ...] = ()
    static_batch: int | None = None
    output_shape: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.labels)


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
        """Number of output classes."""
        return len(self.labels)

    def info(self) -> ModelInfo:
        """Everything but the module, as plain data (see :class:`ModelInfo`)."""
        return ModelInfo(
            name=str(self.name),
            arch=str(self.arch),
            input_size=tuple(int(d) for d in self.input_size),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in self.mean),
            std=tuple(float(v) for v in self.std),
            labels=tuple(str(label) for label in self.labels),
            sha256=str(self.sha256),
            source_format=str(self.source_format),
            num_params=int(self.num_params),
            notes=tuple(str(note) for note in self.notes),
            static_batch=None if self.static_batch is None else int(self.static_batch),
            output_shape=(
                None if self.output_shape is None else tuple(int(d) for d in self.output_shape)
            ),
        )


def describe_model(lm: LoadedModel | ModelInfo) -> dict[str, str]:
    """A few rows that summarise a loaded model, for display.

    Parameters
    ----------
    lm : LoadedModel or ModelInfo
        The model, or its plain description.

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
        "Format": FORMAT_NAMES.get(lm.source_format, lm.source_format),
    }
    if lm.static_batch is not None:
        rows["Batch size"] = f"fixed at {lm.static_batch}"
    if lm.output_shape is not None and len(lm.output_shape) > 1:
        grid = " × ".join(str(d) for d in lm.output_shape[1:])
        rows["Output"] = f"{lm.output_shape[0]:,} class scores at each of {grid} positions"
    return rows
