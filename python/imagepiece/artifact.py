"""The compiled artifact's metadata: where it lives, how it is read, and what it allows.

A `.so` carries its metadata inside itself, as a non-loaded ELF section named `.imagepiece_metadata`
holding one JSON object (added with objcopy after AOTInductor links the library), so one file is
the whole product and can never be separated from its description. A `.pt2` package carries the
same JSON under the key "imagepiece" in AOTInductor's own package metadata (which C++ reads with
`AOTIModelPackageLoader::get_metadata`). The C++ runtime reads both the same way; the checks here
are the ones it applies too, with the same error codes.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch

FORMAT_VERSION = 1
SECTION_NAME = ".imagepiece_metadata"
PACKAGE_METADATA_KEY = "imagepiece"
SUFFIXES = (".so", ".pt2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REQUIRED_KEYS = ("format_version", "arch", "method", "config", "token_schedule", "input_shape", "dtype", "batch",
                 "preprocessing", "device_type", "cuda_capability", "torch_version", "num_classes")


class ArtifactError(ValueError):
    """A bad artifact or a bad input to one; `code` says which kind (same names as the C++ runtime)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _elf_section(path: Path, name: str) -> Optional[bytes]:
    """The bytes of section `name` of a 64-bit little-endian ELF file, or None if it has none."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF":
            raise ArtifactError("not_an_artifact", f"{str(path)!r} is not a shared library (no ELF header)")
        if header[4] != 2 or header[5] != 1:
            raise ArtifactError("not_an_artifact", f"{str(path)!r} is not a 64-bit little-endian ELF file")
        section_offset, = struct.unpack_from("<Q", header, 0x28)
        entry_size, count, names_index = struct.unpack_from("<HHH", header, 0x3A)
        handle.seek(0, 2)
        file_size = handle.tell()
        if entry_size != 64 or section_offset + count * 64 > file_size or names_index >= count:
            raise ArtifactError("not_an_artifact", f"{str(path)!r} is truncated or corrupt (section table out of range)")
        handle.seek(section_offset)
        table = handle.read(count * 64)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * 64) for i in range(count)]
        names_offset, names_size = sections[names_index][4], sections[names_index][5]
        handle.seek(names_offset)
        names = handle.read(names_size)
        for name_at, _, _, _, offset, size, *_ in sections:
            if names[name_at : names.find(b"\0", name_at)].decode(errors="replace") == name:
                if offset + size > file_size:
                    raise ArtifactError("not_an_artifact", f"{str(path)!r} is truncated (metadata section out of range)")
                handle.seek(offset)
                return handle.read(size)
    return None


def embed_metadata(so_path: Path, metadata: dict) -> None:
    """Add the metadata section to a freshly linked `.so` (in place)."""
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise RuntimeError("objcopy (binutils) is needed to put metadata into the .so; install binutils")
    blob = so_path.with_suffix(".metadata.json")
    blob.write_text(json.dumps(metadata, sort_keys=True))
    subprocess.run(
        [objcopy, "--add-section", f"{SECTION_NAME}={blob}", "--set-section-flags", f"{SECTION_NAME}=noload,readonly",
         str(so_path)],
        check=True, capture_output=True,
    )
    blob.unlink()


def _package_metadata(path: Path) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as package:
            for member in package.namelist():
                if member.endswith("_metadata.json") and "/aotinductor/" in member:
                    found = json.loads(package.read(member)).get(PACKAGE_METADATA_KEY)
                    if found is not None:
                        return found
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, EOFError) as error:
        raise ArtifactError("not_an_artifact", f"{str(path)!r} is not a readable .pt2 package ({error})") from None
    return None


def read_metadata(path: Union[str, Path]) -> dict:
    """The metadata of an artifact (`.so` or `.pt2`); ArtifactError if it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError("file_not_found", f"artifact {str(path)!r} does not exist or is not a file")
    if path.suffix not in SUFFIXES:
        raise ArtifactError("not_an_artifact", f"{str(path)!r}: an artifact is a .so or .pt2 file")
    raw = _elf_section(path, SECTION_NAME) if path.suffix == ".so" else _package_metadata(path)
    if raw is None:
        raise ArtifactError("not_an_artifact", f"{str(path)!r} has no ImagePiece metadata: it was not made by scripts/aot_compile.py")
    try:
        metadata = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError("not_an_artifact", f"{str(path)!r} has corrupt metadata ({error})") from None
    missing = [key for key in REQUIRED_KEYS if key not in metadata] if isinstance(metadata, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ArtifactError("not_an_artifact", f"{str(path)!r} metadata lacks {missing}")
    return metadata


def current_cuda_capability(device_index: int = 0) -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


def check_compatible(metadata: dict, device: torch.device) -> None:
    """Refuse an artifact this process cannot run on `device`, saying what does not match."""
    if metadata["format_version"] != FORMAT_VERSION:
        raise ArtifactError("incompatible", f"artifact format version {metadata['format_version']} is not the supported {FORMAT_VERSION}; recompile it")
    if metadata["torch_version"] != torch.__version__:
        raise ArtifactError(
            "incompatible",
            f"artifact was compiled with torch {metadata['torch_version']} but this is torch {torch.__version__}; "
            "AOTInductor artifacts run only with the torch that built them: recompile it",
        )
    if device.type != metadata["device_type"]:
        raise ArtifactError("incompatible", f"artifact was compiled for {metadata['device_type']} and cannot run on {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError("incompatible", "artifact was compiled for cuda but no CUDA device is available")
        here = current_cuda_capability(device.index or 0)
        if metadata["cuda_capability"] != here:
            raise ArtifactError(
                "incompatible",
                f"artifact was compiled for CUDA compute capability {metadata['cuda_capability']}, this GPU is {here}",
            )


def check_images(metadata: dict, images, device: torch.device) -> None:
    """Validate a batch against the artifact before the compiled model sees it (no copies made)."""
    expected = list(metadata["input_shape"])
    if not isinstance(images, torch.Tensor):
        raise ArtifactError("invalid_type", f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ArtifactError("invalid_shape", f"images must be 4-D [B, {', '.join(map(str, expected))}], got {images.dim()}-D {list(images.shape)}")
    if list(images.shape[1:]) != expected:
        raise ArtifactError("invalid_shape", f"images must be [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
    low, high = metadata["batch"]["min"], metadata["batch"]["max"]
    if not low <= images.shape[0] <= high:
        allowed = f"exactly {low}" if low == high else f"{low}..{high}"
        raise ArtifactError("invalid_batch", f"batch {images.shape[0]} is outside the artifact's batch range ({allowed})")
    if images.dtype != DTYPES[metadata["dtype"]]:
        raise ArtifactError("invalid_dtype", f"images must be {DTYPES[metadata['dtype']]} ({metadata['dtype']}), got {images.dtype}")
    if images.device.type != device.type or (device.index is not None and images.device.index != device.index):
        raise ArtifactError("invalid_device", f"images are on {images.device}, the artifact runs on {device}")
    if not images.is_contiguous():
        raise ArtifactError("not_contiguous", "images must be contiguous (NCHW); call .contiguous() first")
