"""What a file is, read from its bytes: format sniffing and zip archives."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from explainer.errors import ModelLoadError
from explainer.intake.sources import upload_limit

__all__ = [
    "SAVE_INSTEAD",
    "SUPPORTED",
    "TORCH_LEGACY_MAGIC",
    "open_zip",
    "sniff",
    "unknown_format",
    "zip_kind",
    "zip_root",
]

_OTHER_FORMATS = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras or TensorFlow)"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"ORT", "an ONNX Runtime file"),
)

SUPPORTED = (
    "a PyTorch state_dict (.pt/.pth/.bin), a .safetensors file, or a torch.export program (.pt2)"
)

SAVE_INSTEAD = (
    "Upload the weights instead (torch.save(model.state_dict(), 'weights.pt') or a .safetensors "
    "file) and pick the architecture, or export the model with "
    "torch.export.save(torch.export.export(model, (example_batch,)), 'model.pt2')."
)

# A legacy (non-zip) torch.save file starts with this pickled magic number (protocol 2).
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def sniff(data: bytes) -> str:
    """``"zip"``, ``"safetensors"``, ``"pickle"`` or ``"unknown"``, from the first bytes."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) >= 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") >= 2:
        return "safetensors"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"  # a legacy torch.save file or a bare pickle
    return "unknown"


def unknown_format(data: bytes, display: str) -> ModelLoadError:
    """The error for a file of no format this explorer reads, naming it where it can."""
    for magic, what in _OTHER_FORMATS:
        if data.startswith(magic):
            return ModelLoadError(f"{display} is {what}, not a PyTorch model. Upload {SUPPORTED}.")
    suffix = Path(display).suffix.lower()
    if suffix == ".onnx":
        return ModelLoadError(
            f"{display} looks like an ONNX model, which cannot be explained here. "
            f"Upload {SUPPORTED}."
        )
    return ModelLoadError(
        f"{display} is not a model file this explorer can read (its contents match no known "
        f"format). Upload {SUPPORTED}."
    )


def open_zip(data: bytes, display: str) -> zipfile.ZipFile:
    """Open a zip archive and verify every member's checksum (catches damaged downloads).

    An archive whose members unpack to more than twice the upload limit is refused from its
    directory alone, before anything is unpacked.
    """
    limit = upload_limit()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        if sum(m.file_size for m in members) > 2 * limit:
            raise ModelLoadError(
                f"{display} unpacks to more than {2 * limit / 2**20:,.0f} MB; it is refused."
            )
        for member in members:
            if member.CRC == 0 and member.file_size > 0:
                continue  # saved with checksums turned off (torch.serialization.set_crc32_options)
            with archive.open(member) as stream:
                while stream.read(1 << 20):
                    pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{display} is a damaged or incomplete archive ({exc}); download or save it again and "
            "upload the complete file."
        ) from exc
    except NotImplementedError as exc:  # an unsupported compression method
        raise ModelLoadError(f"{display} is an archive this explorer cannot read ({exc}).") from exc
    return archive


def zip_root(archive: zipfile.ZipFile, marker: str) -> str | None:
    """The folder holding ``marker`` directly (``root/marker``), if any."""
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == marker:
            return parts[0]
    return None


def zip_kind(archive: zipfile.ZipFile) -> str:
    """``"export"``, ``"export_legacy"``, ``"torchscript"``, ``"torch"`` or ``"unknown"``."""
    names = archive.namelist()
    if zip_root(archive, "archive_format") is not None:
        return "export"
    if any(
        n == "serialized_exported_program.json" or n.endswith("/serialized_exported_program.json")
        for n in names
    ):
        return "export_legacy"
    if any(
        n.endswith("/constants.pkl") or "/code/__torch__" in n or n.startswith("code/")
        for n in names
    ):
        return "torchscript"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    return "unknown"
