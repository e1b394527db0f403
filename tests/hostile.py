"""Hostile files shared by the library, worker and app tests, all built here (nothing is fetched).

- :class:`RunsCode`: a pickle payload that writes a file when unpickled (the proof that code ran);
- :func:`two_program_archive` and :func:`outside_folder_archive`: the two ``.pt2`` archives that
  made ``torch.export.load`` unpickle a payload; :func:`rewrite_zip` and :func:`json_edit` to
  tamper with any archive, :func:`with_input_size` for a program declaring a huge input;
- :class:`Spin` and :class:`Bomb`: models that load fine, then loop forever or allocate GiBs in
  their forward pass (exported with :func:`export_bytes`).
"""

from __future__ import annotations

import io
import json
import pathlib
import zipfile
from collections.abc import Callable

import torch
from torch import nn
from torch._higher_order_ops.while_loop import while_loop


class RunsCode:
    """A pickle payload: unpickling it writes ``target``."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return pathlib.Path.write_text, (self.target, "pwned")


def torch_save_bytes(obj: object) -> bytes:
    """``torch.save(obj)`` as bytes (a zip archive with a pickle inside)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite_zip(
    data: bytes,
    mutate: Callable[[str, bytes], bytes | None] = lambda name, content: content,
    extra: dict[str, bytes] | None = None,
    first: dict[str, bytes] | None = None,
) -> bytes:
    """Copy an archive through ``mutate`` (None drops an entry), with entries added before
    (``first``) and after (``extra``) the original ones."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, content in (first or {}).items():
            dst.writestr(name, content)
        for name in src.namelist():
            content = mutate(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
        for name, content in (extra or {}).items():
            dst.writestr(name, content)
    return out.getvalue()


def json_edit(suffix: str, edit: Callable[[object], object]) -> Callable[[str, bytes], bytes]:
    """A :func:`rewrite_zip` mutation: ``edit`` the JSON of the entries ending in ``suffix``."""

    def mutate(name: str, content: bytes) -> bytes:
        if not name.endswith(suffix):
            return content
        return json.dumps(edit(json.loads(content))).encode()

    return mutate


def with_input_size(pt2: bytes, height: int, width: int) -> bytes:
    """``pt2`` (a program whose input is named ``x``) declaring a ``height x width`` input."""

    def edit(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        values["x"]["sizes"][2:] = [{"as_int": height}, {"as_int": width}]
        return program

    return rewrite_zip(pt2, json_edit("models/model.json", edit))


def two_program_archive(pt2: bytes, target: pathlib.Path) -> bytes:
    """``pt2`` plus a second program under ``models/`` whose weights are a pickled payload."""
    src = zipfile.ZipFile(io.BytesIO(pt2))
    config = json.loads(src.read("archive/data/weights/model_weights_config.json"))
    for payload in config["config"].values():
        payload.update(use_pickle=True, path_name="weight_99")
    return rewrite_zip(
        pt2,
        extra={
            "archive/models/evil.json": src.read("archive/models/model.json"),
            "archive/data/weights/evil_weights_config.json": json.dumps(config).encode(),
            "archive/data/weights/weight_99": torch_save_bytes(RunsCode(target)),
            "archive/data/constants/evil_constants_config.json": src.read(
                "archive/data/constants/model_constants_config.json"
            ),
            "archive/data/sample_inputs/evil.pt": b"",
        },
    )


def outside_folder_archive(pt2: bytes, target: pathlib.Path) -> bytes:
    """``pt2`` with first entries outside its folder: the layout of torch's legacy reader,
    which unpickles them in full."""
    from torch._export.serde.schema import SCHEMA_VERSION

    evil = torch_save_bytes(RunsCode(target))
    program = zipfile.ZipFile(io.BytesIO(pt2)).read("archive/models/model.json")
    return rewrite_zip(
        pt2,
        first={
            "version": ".".join(map(str, SCHEMA_VERSION)).encode(),
            "serialized_exported_program.json": program,
            "serialized_state_dict.pt": evil,
            "serialized_constants.pt": evil,
            "serialized_example_inputs.pt": evil,
        },
    )


class Spin(nn.Module):
    """A classifier of 3 x 8 x 8 images whose forward pass loops (practically) forever."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def cond(i, acc):
            return i < 10**12

        def body(i, acc):
            return i + 1, acc + 1.0

        _, acc = while_loop(cond, body, (torch.zeros((), dtype=torch.int64), x.sum()))
        return self.fc(x.flatten(1)) + 0.0 * acc


class Bomb(nn.Module):
    """A classifier of 3 x 8 x 8 images whose forward pass builds a 4 GiB temporary per image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x.new_ones(x.shape[0], 256, 2048, 2048) * x.mean()
        return self.fc(x.flatten(1)) + big.mean(dim=(1, 2, 3)).unsqueeze(1)


def export_bytes(module: nn.Module, size: int = 8) -> bytes:
    """``module`` exported with ``torch.export`` (dynamic batch) for ``(3, size, size)`` images."""
    program = torch.export.export(
        module.eval(),
        (torch.rand(2, 3, size, size),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
