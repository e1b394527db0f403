"""Class names from a labels file, bounded in bytes, count and length, and free of control
characters (a name is shown in the page and in figures, never interpreted)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from explainer import limits
from explainer.errors import ModelLoadError
from explainer.intake.sources import Source, read_source, setting

__all__ = ["MAX_CLASSES_ENV", "MAX_LABELS_ENV", "LabelsSource", "check_num_classes", "load_labels"]

MAX_LABELS_ENV = "EXPLAINER_MAX_LABELS_MB"
"""Environment variable holding the largest labels file accepted, in MiB."""

MAX_CLASSES_ENV = "EXPLAINER_MAX_CLASSES"
"""Environment variable holding the most classes a model or labels file may declare."""

LabelsSource = Source | Sequence[str]

# C0 and C1 controls (newline, tab, NUL, ...), and the bidirectional overrides and isolates that
# can make a name display as another.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def check_num_classes(num_classes: int | None) -> None:
    """Refuse a number of classes that is not a whole number between 1 and the server's limit."""
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ModelLoadError(f"The number of classes must be a whole number, got {num_classes!r}.")
    if num_classes < 1:
        raise ModelLoadError(
            f"The number of classes must be at least 1, got {num_classes}; leave it empty to "
            "read it from the file."
        )
    check_class_count(num_classes, "The number of classes asked for")


def check_class_count(count: int, what: str) -> None:
    """Refuse ``count`` classes above :func:`explainer.limits.max_classes`."""
    most = setting(limits.max_classes)
    if count > most:
        raise ModelLoadError(
            f"{what} is {count:,} classes, more than the {most:,} this server accepts. Use a "
            f"model with fewer classes, or ask the operator to raise {MAX_CLASSES_ENV}."
        )


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
        If the file is empty, unreadable, malformed, names the wrong number of classes, is
        larger than ``EXPLAINER_MAX_LABELS_MB``, names more classes than
        ``EXPLAINER_MAX_CLASSES``, or holds a name that is too long or has control characters.
    """
    check_num_classes(num_classes)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes, bytearray)):
        display = "the list of labels"
        check_class_count(len(source), f"{display} names {len(source):,} classes; that")
        labels = [_label_text(item, i, display) for i, item in enumerate(source)]
    else:
        limit = setting(limits.max_label_bytes)
        data, display = read_source(source, None, "labels file", limit=limit, env=MAX_LABELS_ENV)
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
    if len(text) > limits.MAX_LABEL_CHARS:
        raise ModelLoadError(
            f"Label {index} in {display} is {len(text):,} characters long, more than the "
            f"{limits.MAX_LABEL_CHARS} a class name may have; shorten it."
        )
    bad = _CONTROL.search(text)
    if bad is not None:
        raise ModelLoadError(
            f"Label {index} in {display} contains the control character "
            f"U+{ord(bad.group()):04X}; class names must be plain text on one line. Remove it."
        )
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
            check_class_count(len(parsed), f"{display} names {len(parsed):,} classes; that")
            return [_label_text(item, i, display) for i, item in enumerate(parsed)]
        if not isinstance(parsed, dict):
            raise ModelLoadError(f"{display} holds JSON that is neither a list nor an object.")
        check_class_count(len(parsed), f"{display} names {len(parsed):,} classes; that")
        return _labels_from_mapping(parsed, display)
    lines = stripped.splitlines()
    check_class_count(len(lines), f"{display} names {len(lines):,} classes; that")
    labels = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise ModelLoadError(
                f"Line {number} of {display} is empty; every class needs a name (one per line)."
            )
        labels.append(_label_text(name, number - 1, display))
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
