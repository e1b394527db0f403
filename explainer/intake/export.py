"""``torch.export`` programs (``.pt2``): vetted part by part, then rebuilt without pickles.

``torch.export.load`` trusts its input: it loads every program in the archive, unpickles
weights flagged as pickles, retries a failed weights-only load of the example inputs with full
unpickling, falls back to an older reader that unpickles when torch's zip reader fails, evaluates
symbolic shape expressions with sympy (which uses ``eval``) and resolves node targets by
attribute lookup. So it is never called here. Instead the archive must have a strict layout
(one root folder, one program, every entry on an allowlist), every JSON file must match torch's
schema, weights and constants must be raw tensor files whose layouts fit their bytes, node
targets and shape expressions must be plain tensor and shape arithmetic, and the input must fit
the server's limits; then the one program is rebuilt with torch's deserializer from the parts
read here. Example inputs are never read.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import sys
import types
import typing
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from explainer.errors import ModelLoadError
from explainer.intake.labels import check_class_count
from explainer.intake.registry import check_input_size
from explainer.intake.sources import short
from explainer.intake.state_dict import layout_problem
from explainer.tree import ORIGINAL_TYPE

__all__ = ["load_export"]

# What loading a full model yields: module, input size, static batch, classes, output shape.
FullModel = tuple[nn.Module, tuple[int, int, int] | None, int | None, int, tuple[int, ...] | None]

_NAME = r"[A-Za-z0-9_]{1,100}"
# Entries every archive written by torch.export.save holds besides the program's own.
_FIXED_ENTRIES = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)
_MAX_JSON_BYTES = 256 * 2**20

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


# ================================================================================================
# Layout of the archive
# ================================================================================================


def _refuse(display: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"{display} is a torch.export program, but it contains {reason}, which would run code "
        "from the file when loaded, so this server refuses it. Export the model again with "
        "torch.export.export and torch.export.save from plain PyTorch layers."
    )


def _damaged(display: str, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"{display} is not a torch.export archive this server can read: {detail}. Save the "
        f"program again with torch.export.save from PyTorch {torch.__version__} and upload the "
        "file as it was written."
    )


def _check_layout(archive: zipfile.ZipFile, display: str) -> tuple[str, str]:
    """The archive's root folder and program name; refuse anything off the allowlist."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise _damaged(display, "some of its entries appear twice")
    roots = set()
    for name in names:
        parts = name.split("/")
        if (
            name.startswith("/")
            or "\\" in name
            or len(parts) < 2
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise _damaged(display, f"the entry {name[:200]!r} lies outside the archive's folder")
        roots.add(parts[0])
    if len(roots) != 1:
        raise _damaged(display, "its entries are spread over several top-level folders")
    root = roots.pop()
    relative = [name[len(root) + 1 :] for name in names]
    models = [
        m.group(1) for m in (re.fullmatch(rf"models/({_NAME})\.json", r) for r in relative) if m
    ]
    if len(models) != 1:
        raise _damaged(
            display,
            "it holds no program" if not models else f"it holds {len(models)} programs, not one",
        )
    model = models[0]
    allowed = re.compile(
        rf"models/{model}\.json|data/weights/{model}_weights_config\.json|data/weights/weight_\d+"
        rf"|data/constants/{model}_constants_config\.json|data/constants/tensor_\d+"
        rf"|data/sample_inputs/{model}\.pt"
    )
    for name in relative:
        if name in _FIXED_ENTRIES or allowed.fullmatch(name):
            continue
        if name.startswith("data/aotinductor/"):
            raise _refuse(display, "compiled AOTInductor code")
        if name.startswith("data/constants/") and ("custom_obj_" in name or "opaque_obj_" in name):
            raise _refuse(display, "pickled Python objects")
        if name.endswith((".pt", ".pkl")) or name.startswith("data/"):
            raise _refuse(display, f"an unexpected data file ({name[:200]!r})")
        raise _damaged(display, f"it holds an unexpected entry ({name[:200]!r})")
    if _read(archive, root, "archive_format", display) != b"pt2":
        raise _damaged(display, "its archive_format entry does not say pt2")
    if _read(archive, root, "archive_version", display) != b"0":
        raise _damaged(display, "it was written in an archive version this server does not read")
    if f"{root}/byteorder" in archive.NameToInfo and (
        _read(archive, root, "byteorder", display).decode("ascii", "replace") != sys.byteorder
    ):
        raise _damaged(display, f"its tensors are not stored in {sys.byteorder}-endian order")
    return root, model


def _read(archive: zipfile.ZipFile, root: str, relative: str, display: str) -> bytes:
    try:
        return archive.read(f"{root}/{relative}")
    except KeyError:
        raise _damaged(display, f"the entry {relative} is missing") from None


def _read_json(archive: zipfile.ZipFile, root: str, relative: str, display: str) -> Any:
    info = archive.NameToInfo.get(f"{root}/{relative}")
    if info is None:
        raise _damaged(display, f"the entry {relative} is missing")
    if info.file_size > _MAX_JSON_BYTES:
        raise _damaged(display, f"{relative} is larger than any program this server reads")
    try:
        return json.loads(archive.read(info).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _damaged(display, f"{relative} is not valid UTF-8 JSON ({short(exc)})") from exc


# ================================================================================================
# JSON schema
# ================================================================================================


def _schema_problem(cls: Any, data: Any, where: str) -> str | None:
    """Where and how ``data`` departs from torch's schema type ``cls``, or None."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _resolve_schema_cls
    from torch._export.serde.union import _Union

    cls = _resolve_schema_cls(cls)
    origin = typing.get_origin(cls)
    if origin is typing.Annotated:
        return _schema_problem(typing.get_args(cls)[0], data, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(cls) if a is not type(None)]
        if data is None and len(options) < len(typing.get_args(cls)):
            return None
        if len(options) != 1:
            return f"{where} has a type this server does not read"
        return _schema_problem(options[0], data, where)
    if isinstance(cls, type) and issubclass(cls, _Union):
        if not isinstance(data, dict) or len(data) != 1:
            return f"{where} should be an object with one entry"
        ((key, value),) = data.items()
        hints = typing.get_type_hints(cls, globalns=vars(schema))
        if key not in hints or key.startswith("_"):
            return f"{where} names an unknown kind {str(key)[:60]!r}"
        return _schema_problem(hints[key], value, f"{where}.{key}")
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            return f"{where} should be an object, not {_kind(data)}"
        hints = typing.get_type_hints(cls, globalns=vars(schema))
        for f in dataclasses.fields(cls):
            if f.name not in data:
                required = (
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                )
                if required:
                    return f"{where} lacks the key {f.name!r}"
                continue
            problem = _schema_problem(hints[f.name], data[f.name], f"{where}.{f.name}")
            if problem is not None:
                return problem
        return None
    if origin is list:
        if not isinstance(data, list):
            return f"{where} should be a list, not {_kind(data)}"
        (item,) = typing.get_args(cls)
        for i, value in enumerate(data):
            problem = _schema_problem(item, value, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if origin is dict:
        if not isinstance(data, dict):
            return f"{where} should be an object, not {_kind(data)}"
        _, value_type = typing.get_args(cls)
        for key, value in data.items():
            problem = _schema_problem(value_type, value, f"{where}[{str(key)[:60]!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        if isinstance(data, bool) or data not in {m.value for m in cls}:
            return f"{where} should be one of the values of {cls.__name__}"
        return None
    if cls is bool:
        return None if isinstance(data, bool) else f"{where} should be true or false"
    if cls is int:
        ok = isinstance(data, int) and not isinstance(data, bool)
        return None if ok else f"{where} should be a whole number, not {_kind(data)}"
    if cls is float:
        ok = (isinstance(data, (int, float)) and not isinstance(data, bool)) or data in (
            "Infinity",
            "-Infinity",
            "NaN",
        )
        return None if ok else f"{where} should be a number, not {_kind(data)}"
    if cls is str:
        return None if isinstance(data, str) else f"{where} should be a string, not {_kind(data)}"
    return f"{where} has a type this server does not read"


def _kind(data: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false"}.get(
        type(data), "null" if data is None else "a number"
    )


def _check_schema(cls: Any, data: Any, relative: str, display: str) -> None:
    try:
        problem = _schema_problem(cls, data, relative)
    except RecursionError:
        problem = f"{relative} is nested too deeply"
    if problem is not None:
        raise _damaged(display, problem)


# ================================================================================================
# What the program does
# ================================================================================================


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


def _vet_program(program: Any, display: str) -> None:
    """Refuse node targets and shape expressions that could do more than tensor arithmetic."""
    for key, value in _walk_json(program):
        reason = None
        if key == "expr_str" and isinstance(value, str):
            reason = _unsafe_expression(value)
        elif key in ("target", "as_operator") and isinstance(value, str):
            reason = _unsafe_target(value)
        if reason is not None:
            raise _refuse(display, reason)


def _input_hints(program: dict[str, Any]) -> list[int | None] | None:
    """The sizes of the program's one user input, from its JSON (a hint for dynamic sizes)."""
    graph_module = program["graph_module"]
    names = []
    for spec in graph_module["signature"]["input_specs"]:
        user = spec.get("user_input")
        if isinstance(user, dict):
            arg = user.get("arg", {})
            tensor = arg.get("as_tensor") if isinstance(arg, dict) else None
            if isinstance(tensor, dict):
                names.append(tensor.get("name"))
    if len(names) != 1:
        return None
    meta = graph_module["graph"]["tensor_values"].get(names[0])
    if meta is None:
        return None
    sizes: list[int | None] = []
    for size in meta["sizes"]:
        if "as_int" in size:
            sizes.append(size["as_int"])
        else:
            hint = size.get("as_expr", {}).get("hint") or {}
            sizes.append(hint.get("as_int") if isinstance(hint, dict) else None)
    return sizes


# ================================================================================================
# Weights and constants
# ================================================================================================


def _payload_tensors(
    archive: zipfile.ZipFile,
    root: str,
    directory: str,
    prefix: str,
    config: dict[str, Any],
    display: str,
) -> dict[str, torch.Tensor]:
    """Raw tensors described by a payload config, views of one buffer per file as saved."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    files: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for fqn, payload in config["config"].items():
        path = payload["path_name"]
        if payload["use_pickle"]:
            raise _refuse(display, "pickled tensors")
        if not re.fullmatch(re.escape(prefix) + r"\d+", path):
            if path.startswith(("custom_obj_", "opaque_obj_")):
                raise _refuse(display, "pickled Python objects")
            raise _damaged(display, f"the tensor {fqn[:100]!r} names an unexpected file")
        meta = payload["tensor_meta"]
        if meta is None:
            raise _damaged(display, f"the tensor {fqn[:100]!r} has no description")
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta["dtype"])
        if dtype is None or meta["layout"] != 7:  # schema.Layout.Strided
            raise _damaged(display, f"the tensor {fqn[:100]!r} is not a plain dense tensor")
        if meta["device"]["type"] != "cpu":
            raise ModelLoadError(
                f"{display} holds weights saved on the {meta['device']['type']} device; this "
                "server runs on the CPU. Move the model to the CPU before torch.export.export."
            )
        numbers = [*meta["sizes"], *meta["strides"], meta["storage_offset"]]
        if any(set(n) != {"as_int"} for n in numbers):
            raise _damaged(display, f"the tensor {fqn[:100]!r} has a symbolic shape")
        sizes = tuple(n["as_int"] for n in meta["sizes"])
        strides = tuple(n["as_int"] for n in meta["strides"])
        offset = meta["storage_offset"]["as_int"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        base = files.get(path)
        if base is None:
            member = f"{root}/{directory}{path}"
            info = archive.NameToInfo.get(member)
            if info is None:
                raise _damaged(display, f"the data of tensor {fqn[:100]!r} is missing")
            if info.file_size % itemsize:
                raise _damaged(display, f"the data of tensor {fqn[:100]!r} is cut short")
            raw = bytearray(archive.read(info))
            base = (
                torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
                if raw
                else torch.empty(0, dtype=dtype)
            )
            files[path] = base
        if base.dtype != dtype:
            raise _damaged(display, f"the tensor {fqn[:100]!r} reads a file as two dtypes")
        problem = layout_problem(
            sizes, strides, offset, base.numel() * itemsize, itemsize, dense=False
        )
        if problem is not None:
            raise ModelLoadError(
                f"Tensor {fqn[:100]} in {display} {problem}. The file is malformed or was "
                "crafted, so it is refused; export the model again with torch.export.save."
            )
        tensor = torch.as_strided(base, sizes, strides, offset)
        if payload["is_param"]:
            tensor = nn.Parameter(tensor, requires_grad=bool(meta["requires_grad"]))
        tensors[fqn] = tensor
    return tensors


# ================================================================================================
# Loading
# ================================================================================================


def _deserialize(archive: zipfile.ZipFile, display: str) -> Any:
    """The one program in ``archive`` as an ``ExportedProgram``, without unpickling anything."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import constants as pt2

    root, model = _check_layout(archive, display)
    program_name = pt2.MODELS_FILENAME_FORMAT.format(model)
    program = _read_json(archive, root, program_name, display)
    _check_schema(schema.ExportedProgram, program, program_name, display)
    configs = {}
    for config_name in (
        pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model),
        pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model),
    ):
        configs[config_name] = _read_json(archive, root, config_name, display)
        _check_schema(schema.PayloadConfig, configs[config_name], config_name, display)
    _vet_program(program, display)

    hints = _input_hints(program)
    if hints is not None and len(hints) == 4 and all(isinstance(d, int) for d in hints[2:]):
        check_input_size(int(hints[2]), int(hints[3]), display)

    weights_config, constants_config = configs.values()
    state_dict = _payload_tensors(
        archive, root, pt2.WEIGHTS_DIR, pt2.WEIGHT_FILENAME_PREFIX, weights_config, display
    )
    constants = _payload_tensors(
        archive, root, pt2.CONSTANTS_DIR, pt2.TENSOR_CONSTANT_FILENAME_PREFIX, constants_config,
        display,
    )  # fmt: skip
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:  # any failure to rebuild user bytes; the cause is chained
        raise ModelLoadError(
            f"{display} could not be loaded as a torch.export program ({short(exc)}). It may be "
            f"damaged, or saved by a PyTorch version incompatible with this server's "
            f"({torch.__version__})."
        ) from exc
    return ep, hints


def load_export(
    archive: zipfile.ZipFile,
    display: str,
    num_classes: int | None,
    notes: list[str],
) -> FullModel:
    """Load a .pt2 program; return (module, input size, static batch, classes, output shape)."""
    ep, hints = _deserialize(archive, display)

    node = _user_input_node(ep, display)
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    if len(shape) != 4:
        raise ModelLoadError(
            f"{display} takes an input of shape {shape}; this explorer needs a model that takes "
            "images as (batch, channels, height, width)."
        )
    example = hints if hints is not None and len(hints) == 4 else None
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
        elif example is not None and isinstance(example[i], int):
            size.append(int(example[i]))
        else:
            size.append(3 if i == 1 else 224)
    check_input_size(size[1], size[2], display)
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
    check_class_count(out_classes, f"The output of {display}")

    try:
        module = torch.export.unflatten(ep)
    except Exception as exc:  # unflatten rejects programs it cannot rebuild a module tree for
        raise ModelLoadError(
            f"The layers of {display} could not be rebuilt from the program ({short(exc)})."
        ) from exc
    _name_module_types(module, _original_types(ep))
    return module, (size[0], size[1], size[2]), static_batch, out_classes, output_shape


# A class name as the metadata writes it: the last part of a dotted path, an identifier.
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,79}")


def _original_types(ep: Any) -> dict[str, str]:
    """Module path -> class name of the original module, read from the program's metadata.

    ``torch.export`` keeps, on every graph node, the stack of modules it ran in
    (``nn_module_stack``: key -> (path, type)). Unflattening rebuilds those modules as
    ``InterpreterModule``; the names read here tell what they were (``Conv2d``,
    ``Bottleneck``...). Entries that are not a plain path and class name are ignored: the
    metadata comes from the uploaded file and is only ever shown as text.
    """
    types_by_path: dict[str, str] = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not isinstance(stack, dict):
            continue
        for entry in stack.values():
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                continue
            path, kind = entry
            if not isinstance(path, str) or len(path) > 1000:
                continue
            text = kind if isinstance(kind, str) else getattr(kind, "__qualname__", "")
            if not isinstance(text, str):
                continue
            last = text.strip().strip("<>'\"").removeprefix("class ").strip("'").split(".")[-1]
            if _TYPE_NAME.fullmatch(last):
                types_by_path.setdefault(path, last)
    return types_by_path


def _name_module_types(module: nn.Module, types_by_path: dict[str, str]) -> None:
    """Record the original class name on each rebuilt module (see :data:`ORIGINAL_TYPE`)."""
    for name, sub in module.named_modules():
        # A module called several times is rebuilt once per call, as ``name@1``, ``name@2``...
        kind = types_by_path.get(name) or types_by_path.get(name.split("@", 1)[0])
        if kind is None and name == "":
            kind = types_by_path.get("")
        if kind is not None:
            sub.__dict__[ORIGINAL_TYPE] = kind


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
