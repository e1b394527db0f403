"""The wire format between the web server and its compute workers: plain data, never pickles.

A worker runs code from uploaded models, so everything it sends back is untrusted. Messages are
MessagePack documents holding only ``None``, booleans, numbers, strings, bytes, lists, dicts with
string keys, and three extension types:

- tuples (so shapes, targets and neuron indices keep their type);
- numpy arrays of plain numeric dtypes, as dtype name, shape and raw bytes (the length is checked
  against the shape before an array is built);
- records: instances of the few result dataclasses in :data:`RECORD_TYPES`, rebuilt through their
  own constructors from exactly their declared fields.

Nothing else decodes: no class is looked up by a name the sender chose outside that table, no
code runs while decoding, and a message holds at most :data:`MAX_CONTAINERS` containers. Each
message travels as one frame: an 8-byte big-endian length, then the document; replies above
:data:`MAX_FRAME_BYTES` are refused before they are read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import Any

import msgpack
import numpy as np

from explainer.errors import ExplainerError

__all__ = [
    "MAX_CONTAINERS",
    "MAX_FRAME_BYTES",
    "WireError",
    "decode",
    "encode",
    "frame",
    "read_frame",
    "write_frame",
]

MAX_FRAME_BYTES = 256 * 2**20
"""Largest message a server accepts from a worker (a results message of a few maps is a few MiB;
a segmentation model's scores for one image a few tens). Requests to a worker carry the model
file and are bounded by the upload limit instead."""

MAX_CONTAINERS = 200_000
"""Most lists, maps, tuples and records one message may hold: MessagePack spends one byte on an
empty list, Python about 60, so a frame of empty lists would otherwise cost 60 times its size."""

_HEADER = struct.Struct(">Q")
_TUPLE, _ARRAY, _RECORD = 1, 2, 3
_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"}
)  # fmt: skip
_MAX_DIMS = 8


class WireError(ExplainerError):
    """A message between the server and a worker is malformed (or the other side is gone)."""


@functools.cache
def _record_types() -> dict[str, type]:
    """The dataclasses that may cross the boundary, by name (imported on first use)."""
    from explainer.analysis import ConductanceResult, ConvergencePoint, NeuronGradientResult
    from explainer.intake.loaded import ModelInfo
    from explainer.tree import ModuleNode, ModuleTree

    types = (ConductanceResult, ConvergencePoint, NeuronGradientResult, ModelInfo, ModuleNode,
             ModuleTree)  # fmt: skip
    from explainer.overview import LayerOverview, LayerSummary

    types += (LayerOverview, LayerSummary)
    from explainer import checks

    types += (checks.NeuronConductanceResult, checks.AblationResult, checks.FlipResult,
              checks.RandomisationResult)  # fmt: skip
    return {cls.__name__: cls for cls in types}


# --------------------------------------------------------------------------- encoding


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, encode(list(value)))
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name not in _DTYPES:
            raise WireError(f"An array of dtype {name} cannot be sent to or from a worker.")
        data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False)
        return msgpack.ExtType(_ARRAY, encode([name, list(value.shape), data.tobytes()]))
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _record_types().get(name) is not type(value):
            raise WireError(f"A {name} cannot be sent to or from a worker.")
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return msgpack.ExtType(_RECORD, encode([name, fields]))
    raise WireError(f"A {type(value).__name__} cannot be sent to or from a worker.")


def encode(value: Any) -> bytes:
    """Serialise plain data (see the module docstring) to bytes."""
    try:
        return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"A message could not be encoded ({exc}).") from exc


# --------------------------------------------------------------------------- decoding


def _array(payload: Any) -> np.ndarray:
    if not (isinstance(payload, list) and len(payload) == 3):
        raise WireError("Malformed array in a worker message.")
    name, shape, data = payload
    if name not in _DTYPES or not isinstance(data, bytes):
        raise WireError("Malformed array in a worker message.")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise WireError("Malformed array shape in a worker message.")
    dtype = np.dtype(name).newbyteorder("<")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data):
        raise WireError("An array in a worker message does not match its shape.")
    return np.frombuffer(data, dtype=dtype).astype(np.dtype(name), copy=True).reshape(shape)


def _record(payload: Any) -> Any:
    if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[1], dict)):
        raise WireError("Malformed record in a worker message.")
    name, fields = payload
    cls = _record_types().get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"A worker message holds an unknown record type {name!r}.")
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != expected:
        raise WireError(f"A {name} in a worker message has the wrong fields.")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise WireError(f"A {name} in a worker message is malformed ({exc}).") from exc


class _Decoder:
    """One message's decoding, with its budget of containers (nested extensions share it)."""

    def __init__(self, max_containers: int) -> None:
        self.left = max_containers

    def _count(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise WireError("A worker message holds too many lists, maps or records.")
        return value

    def _ext(self, code: int, data: bytes) -> Any:
        self._count(None)
        if code == _TUPLE:
            items = self.decode(data)
            if not isinstance(items, list):
                raise WireError("Malformed tuple in a worker message.")
            return tuple(items)
        if code == _ARRAY:
            return _array(self.decode(data))
        if code == _RECORD:
            return _record(self.decode(data))
        raise WireError(f"A worker message holds an unknown extension type {code}.")

    def decode(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(
                data,
                ext_hook=self._ext,
                list_hook=self._count,
                object_hook=self._count,
                raw=False,
                strict_map_key=True,
            )
        except WireError:
            raise
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError, RecursionError) as exc:  # fmt: skip
            raise WireError(f"A worker message could not be decoded ({exc}).") from exc


def decode(data: bytes, max_containers: int = MAX_CONTAINERS) -> Any:
    """Rebuild plain data from :func:`encode`'s bytes; anything else raises :class:`WireError`.

    At most ``max_containers`` lists, maps, tuples and records are built, so a small message
    cannot take much more memory than its size.
    """
    return _Decoder(max_containers).decode(data)


# --------------------------------------------------------------------------- frames


def frame(value: Any) -> bytes:
    """``value`` encoded as one frame: its length, then the document."""
    payload = encode(value)
    return _HEADER.pack(len(payload)) + payload


def write_frame(fd: int, value: Any) -> None:
    """Encode ``value`` and write it to the blocking file descriptor ``fd`` as one frame."""
    view = memoryview(frame(value))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, limit: int | None = MAX_FRAME_BYTES) -> Any:
    """Read one frame from ``fd`` and decode it; ``EOFError`` when the other side closed it.

    A frame announcing more than ``limit`` bytes is refused before it is read (None: no limit,
    for a worker reading its trusted server's requests).
    """
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        raise EOFError("the other side closed the channel")
    (size,) = _HEADER.unpack(header)
    if limit is not None and size > limit:
        raise WireError(f"A message announced {size:,} bytes, more than the limit; it is refused.")
    payload = _read_exactly(fd, size)
    if payload is None:
        raise EOFError("the other side closed the channel mid-message")
    return decode(payload, max_containers=MAX_CONTAINERS if limit is not None else 2**62)
