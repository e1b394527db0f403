"""The built-in demo model, read from ``assets/demo`` (written by ``scripts/train_demo.py``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from explainer import demo
from explainer.errors import ModelLoadError
from explainer.intake.loaded import LoadedModel

__all__ = ["load_demo_model"]


def load_demo_model(directory: Path | None = None) -> LoadedModel:
    """Load the built-in demo model, in eval mode, with its labels and normalisation.

    Parameters
    ----------
    directory : Path, optional
        A folder written by ``scripts/train_demo.py``; defaults to the shipped ``assets/demo``.

    Returns
    -------
    LoadedModel
        ``source_format="builtin"``, ``arch="demo_cnn"``, ``sha256`` of the weights file bytes, and
        the held-out accuracy from the model card in ``notes``.

    Raises
    ------
    ModelLoadError
        If the weights or labels are missing, unreadable, or do not fit the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    base = demo.ASSETS_DIR / "demo" if directory is None else Path(directory)
    weights_path = demo.demo_weights_path(base)
    labels_path = base / demo.LABELS_FILENAME
    regenerate = "Run `python scripts/train_demo.py` to regenerate the demo assets."
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(
            f"The demo weights are missing ({weights_path}). {regenerate}"
        ) from None
    except OSError as exc:
        raise ModelLoadError(
            f"The demo weights at {weights_path} could not be read ({exc}). {regenerate}"
        ) from exc
    try:
        text = labels_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"The demo labels are missing ({labels_path}). {regenerate}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"The demo labels at {labels_path} could not be read ({exc}). {regenerate}"
        ) from exc
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ModelLoadError(f"The demo labels file {labels_path} is empty. {regenerate}")

    # Hash and load the same bytes, so the digest always describes the weights in use.
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(
            f"The demo weights at {weights_path} are not a valid safetensors file ({exc}). "
            f"{regenerate}"
        ) from exc
    model = demo.DemoNet(len(labels))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"The demo weights at {weights_path} do not fit the demo architecture with "
            f"{len(labels)} classes ({exc}). {regenerate}"
        ) from exc
    model.eval()

    notes = ["Built-in demo: a small CNN trained on generated shape images (class = shape)."]
    card_path = base / demo.CARD_FILENAME
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(
                f"The demo model card {card_path} could not be read ({exc}). {regenerate}"
            ) from exc
        if not isinstance(card, dict):
            raise ModelLoadError(
                f"The demo model card {card_path} is not a JSON object. {regenerate}"
            )
        accuracy = card.get("heldout_accuracy")
        if isinstance(accuracy, (int, float)):
            notes.append(
                f"Held-out accuracy {accuracy:.1%} on {card.get('val_size', '?')} generated images "
                f"the model never saw during training."
            )
    else:
        notes.append(f"No model card found at {card_path}; accuracy unknown.")

    return LoadedModel(
        model=model,
        name="Demo CNN (shapes)",
        arch=demo.ARCH_NAME,
        input_size=demo.DEMO_INPUT_SIZE,
        mean=demo.DEMO_MEAN,
        std=demo.DEMO_STD,
        labels=labels,
        sha256=sha256,
        source_format="builtin",
        num_params=sum(p.numel() for p in model.parameters()),
        notes=notes,
    )
