"""The artifact file: where its metadata lives, how a digest binds metadata and payload, how it is read.

Format version 2 (FORMAT_VERSION). The metadata is one JSON object (rules: `imagepiece.artifact_metadata`).

* `.so`: one shared library; the metadata is a non-loaded ELF section `.imagepiece_metadata` (added
  with objcopy after AOTInductor links the library), so the file can never lose its description.
* `.pt2`: AOTInductor's package, a zip whose members are all stored uncompressed, plus one member
  `<package>/imagepiece/metadata.json`. It must hold exactly one compiled library
  (`.../data/aotinductor/model/*.so`, weights inside), which is what gets loaded.

Digest. The metadata's `artifact_sha256` is a sha256 over the payload *and* the metadata, taken with
the digest's own 64 hex digits read as "0". Its place is fixed by the metadata text: exactly one
`"artifact_sha256": "` followed by 64 lowercase hex digits and `"`.
  * `.so`: the whole file;
  * `.pt2`: every member in byte order of its name, each as u64le(len(name)) name u64le(len(data)) data.
Loading reads the file once into a sealed private copy, checks the digest on that copy and loads
exactly those bytes (`imagepiece.private_copy`). The digest catches corruption, truncation, edited
metadata and mix-ups; it does not stop a forger, who can recompute it: an artifact is native code,
trust it as you would a pickle.

The C++ runtime (cpp/src/artifact_file.cpp, cpp/src/metadata.cpp) applies the same rules with the
same error codes: a file one accepts, the other accepts.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from .artifact_metadata import (  # noqa: F401  (re-exported: the artifact's public vocabulary)
    DIGEST_KEY,
    DTYPES,
    FORMAT_VERSION,
    INPUT_DTYPES,
    INPUT_FORMATS,
    MAX_METADATA_BYTES,
    PRECISIONS,
    ArtifactError,
    check_compatible,
    check_format_version,
    check_images,
    current_cuda_capability,
    decode,
    image_dims,
    input_dtype_name,
    model_dtype,
    validated,
)
from .artifact_containers import ContainerError, elf_section, one_member, stored_zip_members
from .private_copy import SealedFile

SECTION_NAME = ".imagepiece_metadata"
PACKAGE_METADATA = "imagepiece/metadata.json"
PACKAGE_LIBRARY_FOLDER = "data/aotinductor/model/"
SUFFIXES = (".so", ".pt2")
DIGEST_MARKER = b'"' + DIGEST_KEY.encode() + b'": "'
DIGEST_PLACEHOLDER = "0" * 64
NO_METADATA = "has no ImagePiece metadata: it was not made by scripts/aot_compile.py (or by one older than format 2: recompile it)"


def _fail(path: Path, why: str, code: str = "not_an_artifact") -> None:
    raise ArtifactError(code, f"{str(path)!r} {why}")


def _metadata_section(data: SealedFile, path: Path) -> Optional[Tuple[int, int]]:
    try:
        return elf_section(data, SECTION_NAME)
    except ContainerError as error:
        _fail(path, str(error))


def _package_members(data: SealedFile, path: Path) -> Tuple[Dict[bytes, Tuple[int, int]], Optional[bytes], Optional[bytes]]:
    """The package's members, and the names of its metadata member and of its library (None if absent)."""
    try:
        members = stored_zip_members(data)
        metadata = one_member(members, _is_metadata_member, "ImagePiece metadata member")
        library = one_member(members, _is_library_member, "compiled library")
    except ContainerError as error:
        _fail(path, f"is not a .pt2 package made by scripts/aot_compile.py ({error})")
    return members, metadata, library


def _is_metadata_member(name: bytes) -> bool:
    return name == PACKAGE_METADATA.encode() or name.endswith(b"/" + PACKAGE_METADATA.encode())


def _is_library_member(name: bytes) -> bool:
    folder = PACKAGE_LIBRARY_FOLDER.encode()
    return name.endswith(b".so") and (name.startswith(folder) or b"/" + folder in name)


def _digest_position(text: bytes, path: Path) -> Optional[int]:
    """Where the digest's 64 hex digits start in the metadata text (None when there is no digest)."""
    count = text.count(DIGEST_MARKER)
    if count == 0:
        return None
    start = text.find(DIGEST_MARKER) + len(DIGEST_MARKER)
    digits = text[start : start + 64]
    if count > 1 or len(digits) != 64 or text[start + 64 : start + 65] != b'"' or digits.strip(b"0123456789abcdef"):
        _fail(path, f"is corrupt (its metadata does not hold exactly one well-formed {DIGEST_KEY})")
    return start


def _hash_with_placeholder(hasher, data: SealedFile, start: int, end: int, digest_at: Optional[int]) -> None:
    """Feed data[start:end) to `hasher`, with the 64 bytes at `digest_at` (if inside) read as "0"."""
    if digest_at is None or not start <= digest_at < end:
        for piece in data.chunks(start, end):
            hasher.update(piece)
        return
    _hash_with_placeholder(hasher, data, start, digest_at, None)
    hasher.update(DIGEST_PLACEHOLDER.encode())
    _hash_with_placeholder(hasher, data, digest_at + 64, end, None)


def _library_digest(data: SealedFile, digest_at: int) -> str:
    hasher = hashlib.sha256()
    _hash_with_placeholder(hasher, data, 0, data.size, digest_at)
    return hasher.hexdigest()


def _package_digest(members: Dict[bytes, Tuple[int, int]], sources: Dict[bytes, Tuple[SealedFile, int]],
                    metadata_name: bytes, digest_at: int) -> str:
    """`sources[name]` = (file, offset) holding each member's data (the library's is its private copy)."""
    hasher = hashlib.sha256()
    for name in sorted(members):
        size = members[name][1]
        source, offset = sources[name]
        hasher.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", size))
        _hash_with_placeholder(hasher, source, offset, offset + size, offset + digest_at if name == metadata_name else None)
    return hasher.hexdigest()


def _checked_metadata(text: bytes, digest_at: Optional[int], actual: Callable[[], str], path: Path) -> dict:
    """The validated metadata, once the recorded digest equals `actual()` (the contents' digest)."""
    try:
        document, decode_error = decode(text), None
    except ValueError as error:
        document, decode_error = None, error
    if document is not None:
        check_format_version(document, repr(str(path)))  # an older or newer format says so first
    if digest_at is None:
        _fail(path, f"has no {DIGEST_KEY} in its metadata: it was not made by scripts/aot_compile.py")
    recorded, computed = text[digest_at : digest_at + 64].decode(), actual()
    if recorded != computed:
        _fail(path, f"was modified or is corrupt: its contents do not match the sha256 digest recorded when it was "
                    f"compiled (recorded {recorded[:16]}..., contents {computed[:16]}...); recompile or copy it again")
    if decode_error is not None:
        _fail(path, f"has corrupt metadata ({decode_error})")
    return validated(document, repr(str(path)))


@dataclass
class VerifiedArtifact:
    """An artifact whose digest matched: its metadata and a sealed private copy of the library to load."""

    path: Path
    metadata: dict
    library: SealedFile

    @property
    def digest(self) -> str:
        return self.metadata[DIGEST_KEY]

    def close(self) -> None:
        self.library.close()


def _checked_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    if not path.is_file():
        _fail(path, "does not exist or is not a file", "file_not_found")
    if path.suffix not in SUFFIXES:
        _fail(path, "is not an artifact: an artifact is a .so or .pt2 file")
    _check_leading_bytes(path)
    return path


def _check_leading_bytes(path: Path) -> None:
    """Refuses, from its first bytes, a file that cannot be an artifact before the whole of it is copied into memory:
    a data file of many GB given an artifact's name must not cost its size in RAM. Every check runs again on the copy."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:  # unreadable: copying it says why
        return
    if path.suffix == ".so" and head != b"\x7fELF":
        _fail(path, "is not a shared library (no ELF header)")
    if path.suffix == ".pt2" and head != b"PK\x03\x04":
        _fail(path, "is not a .pt2 package made by scripts/aot_compile.py (not a zip file)")


def _open_library(path: Path, data: SealedFile) -> VerifiedArtifact:
    span = _metadata_section(data, path)
    if span is None:
        _fail(path, NO_METADATA)
    offset, size = span
    text = _metadata_text(data, offset, size, path)
    digest_at = _digest_position(text, path)
    metadata = _checked_metadata(text, digest_at, lambda: _library_digest(data, offset + digest_at), path)
    return VerifiedArtifact(path, metadata, data)


def _metadata_text(data: SealedFile, offset: int, size: int, path: Path) -> bytes:
    if size > MAX_METADATA_BYTES:
        _fail(path, f"has corrupt metadata (metadata is {size} bytes, more than the {MAX_METADATA_BYTES} allowed)")
    return data.read(offset, size)


def _open_package(path: Path, data: SealedFile) -> VerifiedArtifact:
    members, metadata_name, library_name = _package_members(data, path)
    if metadata_name is None:
        _fail(path, NO_METADATA)
    text = _metadata_text(data, *members[metadata_name], path)
    digest_at = _digest_position(text, path)
    if library_name is None:
        _fail(path, "holds no compiled library (data/aotinductor/model/*.so): it was not made by scripts/aot_compile.py")
    library = SealedFile.slice_of(data, *members[library_name], name=f"imagepiece:{path.name}:library")
    try:
        sources = {name: (data, offset) for name, (offset, _) in members.items()}
        sources[library_name] = (library, 0)  # hash the very copy that gets loaded
        metadata = _checked_metadata(text, digest_at, lambda: _package_digest(members, sources, metadata_name, digest_at), path)
    except BaseException:
        library.close()
        raise
    return VerifiedArtifact(path, metadata, library)


def open_artifact(path: Union[str, Path]) -> VerifiedArtifact:
    """Read an artifact once into a private copy and verify it; ArtifactError if it is not one of ours
    or its digest does not match. The caller closes the result (or hands its library to a loader)."""
    path = _checked_path(path)
    try:
        data = SealedFile.copy_of(path)
    except OSError as error:
        raise ArtifactError("load_failed", f"could not read {str(path)!r}: {error.strerror or error}") from None
    try:
        if path.suffix == ".so":
            return _open_library(path, data)
        verified = _open_package(path, data)
        data.close()  # the package's library now has its own copy
        return verified
    except BaseException:
        data.close()
        raise


def read_metadata(path: Union[str, Path]) -> dict:
    """The verified metadata of an artifact (`.so` or `.pt2`); ArtifactError if it is not one of ours."""
    verified = open_artifact(path)
    verified.close()
    return verified.metadata


def _metadata_bytes(metadata: Union[dict, bytes]) -> bytes:
    try:  # NaN and Infinity are not JSON: both readers would refuse the artifact after its whole compile
        text = metadata if isinstance(metadata, bytes) else json.dumps({**metadata, DIGEST_KEY: DIGEST_PLACEHOLDER}, sort_keys=True,
                                                                      allow_nan=False).encode()
    except ValueError as error:
        if "Out of range float" not in str(error):  # json's words for NaN and Infinity; any other fault as it is
            raise
        raise ValueError(f"metadata cannot hold a NaN or infinite number ({error})") from None
    if text.count(DIGEST_MARKER) != 1:  # json.dumps escapes every quote inside values: only raw text can fail
        raise ValueError(f"metadata text must hold {DIGEST_MARKER.decode()}{DIGEST_PLACEHOLDER}\" exactly once")
    return text


def _seal_library(path: Path, metadata: Union[dict, bytes]) -> None:
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise RuntimeError("objcopy (binutils) is needed to put metadata into the .so; install binutils")
    blob = path.with_name(path.name + ".metadata.json")
    blob.write_bytes(_metadata_bytes(metadata))
    try:
        done = subprocess.run([objcopy, "--remove-section", SECTION_NAME, "--add-section", f"{SECTION_NAME}={blob}",
                               "--set-section-flags", f"{SECTION_NAME}=noload,readonly", str(path)], capture_output=True, text=True)
    finally:
        blob.unlink()
    if done.returncode != 0:  # its reason (a full disk: "No space left on device") is in what it printed
        raise OSError(f"objcopy could not write the metadata into {path.name}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    data = SealedFile.copy_of(path)
    try:
        offset, size = _metadata_section(data, path)
        digest_at = offset + _digest_position(data.read(offset, size), path)
        digest = _library_digest(data, digest_at)
    finally:
        data.close()
    with open(path, "r+b") as handle:
        handle.seek(digest_at)
        handle.write(digest.encode())


def _seal_package(path: Path, metadata: Union[dict, bytes]) -> None:
    text = _metadata_bytes(metadata)
    digest_at = _digest_position(text, path)
    data = SealedFile.copy_of(path)
    staged = SealedFile.holding(text, f"imagepiece:{path.name}:metadata")
    try:
        members, old, _ = _package_members(data, path)
        folder = min(members).split(b"/")[0] + b"/" if all(b"/" in member for member in members) else b""
        name = old or folder + PACKAGE_METADATA.encode()
        sources = {member: (data, offset) for member, (offset, _) in members.items()}
        members[name], sources[name] = (0, len(text)), (staged, 0)
        digest = _package_digest(members, sources, name, digest_at)
    finally:
        data.close()
        staged.close()
    text = text[:digest_at] + digest.encode() + text[digest_at + 64 :]
    if old is None:
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as package:
            package.writestr(name.decode(), text)
        return
    rewritten = path.with_name(path.name + ".rewrite")  # a zip member cannot be replaced in place
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rewritten, "w", compression=zipfile.ZIP_STORED) as target:
        for member in members:
            target.writestr(member.decode(), text if member == name else source.read(member.decode()))
    rewritten.replace(path)


def write_metadata(path: Union[str, Path], metadata: Union[dict, bytes]) -> None:
    """Put `metadata` into the artifact at `path` (replacing any) and seal it with a fresh digest.

    `compile_artifact` uses it on a freshly built library or package. Anyone can do the same to an
    edited file, which is why the digest is an integrity check, not a signature. `metadata` may also
    be the exact text to store (tools and tests that need exact bytes), holding the digest placeholder
    `"artifact_sha256": "000...0"` (64 zeros) once.
    """
    path = Path(path)
    (_seal_library if path.suffix == ".so" else _seal_package)(path, metadata)
