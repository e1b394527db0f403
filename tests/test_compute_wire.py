"""The wire format between server and workers: plain data round-trips, nothing else decodes."""

from __future__ import annotations

import os
import pickle

import msgpack
import numpy as np
import pytest

from explainer.analysis import ConductanceResult, ConvergencePoint, NeuronGradientResult
from explainer.compute import wire
from explainer.tree import ModuleNode, ModuleTree


def _node(name: str) -> ModuleNode:
    return ModuleNode(
        name=name, type="Conv2d", depth=1, parent="", children=[], output_shapes=[(1, 4, 8, 8)],
        num_params=10, num_calls=1, usable=True, reason="", is_leaf=True,
    )  # fmt: skip


def test_plain_values_round_trip_with_their_types():
    value = {
        "none": None,
        "flags": [True, False],
        "numbers": [0, -3, 2**62, 1.5, float("inf")],
        "text": "ünïcode ✓",
        "bytes": b"\x00\xff",
        "tuples": (1, (2, 3), ()),
        "nested": {"list": [(1, 2), [3, (4,)]]},
    }
    assert wire.decode(wire.encode(value)) == value
    back = wire.decode(wire.encode(value))
    assert isinstance(back["tuples"], tuple) and isinstance(back["tuples"][1], tuple)
    assert isinstance(back["nested"]["list"][1], list)


@pytest.mark.parametrize(
    "dtype",
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"],
)  # fmt: skip
def test_arrays_round_trip_exactly(dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    back = wire.decode(wire.encode(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = back[0, 0, 0]  # writable: pages may work on the arrays in place


def test_non_contiguous_and_empty_arrays():
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    np.testing.assert_array_equal(wire.decode(wire.encode(array)), array)
    empty = np.zeros((0, 3), np.float32)
    assert wire.decode(wire.encode(empty)).shape == (0, 3)


def test_result_records_round_trip():
    result = ConductanceResult(
        layer="block2", target=(1, 2, 3), attributions=np.ones((2, 3, 3), np.float32),
        channel_totals=np.ones(2, np.float32), spatial=np.ones((3, 3), np.float32), delta=0.1,
        output_diff=1.0, relative_delta=0.1, method="gausslegendre", n_steps=4, is_spatial=True,
    )  # fmt: skip
    back = wire.decode(wire.encode([result, ConvergencePoint("riemann_left", 8, 0.5, 0.25)]))
    assert isinstance(back[0], ConductanceResult) and back[0].target == (1, 2, 3)
    np.testing.assert_array_equal(back[0].attributions, result.attributions)
    assert back[1] == ConvergencePoint("riemann_left", 8, 0.5, 0.25)
    gradient = NeuronGradientResult("conv", (0, 1, 1), np.zeros((3, 4, 4), np.float32), 0.5, 0.0)
    assert wire.decode(wire.encode(gradient)).neuron == (0, 1, 1)
    tree = ModuleTree(nodes={"": _node(""), "a": _node("a")}, suggested=["a"])
    back_tree = wire.decode(wire.encode(tree))
    assert back_tree.nodes["a"].output_shapes == [(1, 4, 8, 8)]
    assert back_tree.suggested == ["a"]


class _Other:
    pass


@pytest.mark.parametrize("value", [_Other(), {1, 2}, object(), np.array(["a"]), 1j])
def test_values_outside_the_format_are_refused_when_sending(value):
    with pytest.raises(wire.WireError):
        wire.encode(value)


def _ext(code: int, payload) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True)))


@pytest.mark.parametrize(
    "data",
    [
        _ext(9, [1]),  # an unknown extension type
        _ext(3, ["Popen", {}]),  # a record type outside the table
        _ext(3, ["ConvergencePoint", {"method": "x"}]),  # missing fields
        _ext(3, ["ConvergencePoint", {"method": "x", "n_steps": 1, "delta": 0.0,
                                      "relative_delta": 0.0, "extra": 1}]),  # fmt: skip
        _ext(2, ["float32", [10], b"\x00" * 8]),  # the bytes do not match the shape
        _ext(2, ["object", [1], b"\x00" * 8]),  # a dtype outside the list
        _ext(2, ["float32", [-1], b""]),  # a negative dimension
        _ext(2, ["float32", [1] * 20, b"\x00" * 4]),  # too many dimensions
        _ext(1, {"not": "a list"}),
        b"\xc1",  # a byte msgpack never writes
        msgpack.packb({1: "integer key"}),
        pickle.dumps(os.getcwd),  # a pickle is not a message
    ],
)
def test_malformed_or_hostile_messages_are_refused(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)


def test_frames_over_a_pipe_and_the_size_limit():
    read_fd, write_fd = os.pipe()
    try:
        wire.write_frame(write_fd, {"kind": "result", "value": (1, 2)})
        assert wire.read_frame(read_fd) == {"kind": "result", "value": (1, 2)}
        # A header announcing more than the limit is refused before anything is read.
        os.write(write_fd, (wire.MAX_FRAME_BYTES + 1).to_bytes(8, "big"))
        with pytest.raises(wire.WireError, match="limit"):
            wire.read_frame(read_fd)
    finally:
        os.close(write_fd)
    with pytest.raises(EOFError):
        wire.read_frame(read_fd)
    os.close(read_fd)


def test_a_message_of_many_empty_lists_is_refused_before_it_costs_memory():
    flood = msgpack.packb([[] for _ in range(wire.MAX_CONTAINERS + 1)])
    assert len(flood) < 1_000_000
    with pytest.raises(wire.WireError, match="too many"):
        wire.decode(flood)
    nested = wire.encode(tuple((i,) for i in range(1000)))  # well within the budget
    assert len(wire.decode(nested)) == 1000
