"""Reading an upload: a path or bytes, read once, within the operator's size limit."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from explainer import limits
from explainer.errors import ExplainerError, ModelLoadError

__all__ = ["MAX_UPLOAD_ENV", "Source", "read_source", "setting", "sha256", "short", "upload_limit"]

MAX_UPLOAD_ENV = "EXPLAINER_MAX_UPLOAD_MB"
"""Environment variable holding the largest model file accepted, in MiB (default 500)."""

Source = str | os.PathLike | bytes | bytearray | memoryview


def setting(read: Callable[[], int]) -> int:
    """An operator limit from :mod:`explainer.limits`, a broken setting as a ModelLoadError."""
    try:
        return read()
    except ModelLoadError:
        raise
    except ExplainerError as exc:
        raise ModelLoadError(str(exc)) from None


def upload_limit() -> int:
    """The largest model file accepted, in bytes (``EXPLAINER_MAX_UPLOAD_MB``)."""
    return setting(limits.max_upload_bytes)


def read_source(
    source: Source,
    filename: str | None,
    what: str,
    *,
    limit: int | None = None,
    env: str = MAX_UPLOAD_ENV,
) -> tuple[bytes, str]:
    """Read ``source`` fully into memory once; return the bytes and a name for messages.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        A path or the file's bytes.
    filename : str, optional
        The name of an upload, used in messages.
    what : str
        What the file is ("model file", "labels file"), for messages.
    limit : int, optional
        The most bytes accepted; the model upload limit by default.
    env : str
        The environment variable with which the operator raises ``limit``.
    """
    limit = upload_limit() if limit is None else limit
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        display = Path(filename).name if filename else f"the uploaded {what}"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        display = Path(filename).name if filename else path.name
        try:
            size = path.stat().st_size
            if size > limit:
                raise ModelLoadError(too_big(display, size, limit, env, what))
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
        raise ModelLoadError(too_big(display, len(data), limit, env, what))
    return data, display


def too_big(
    display: str, size: int, limit: int, env: str = MAX_UPLOAD_ENV, what: str = "model"
) -> str:
    """The message for a file over its size limit."""
    noun = "model" if what.startswith("model") else what
    return (
        f"{display} is {size / 2**20:,.1f} MB, more than the {limit / 2**20:,.0f} MB this server "
        f"accepts. Use a smaller {noun}, or ask the operator to raise {env}."
    )


def sha256(data: bytes) -> str:
    """Hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def short(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
