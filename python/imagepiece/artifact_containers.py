"""Where things are inside the two artifact containers: an ELF section of a `.so`, the members of a `.pt2` zip.

Only what `imagepiece.artifact` needs, read strictly and bounds-checked against the file size, with the
same rules as cpp/src/artifact_file.cpp. Problems raise ContainerError (a ValueError) saying why.
"""
from __future__ import annotations

import struct
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .private_copy import SealedFile

_SHT_PROGBITS = 1
_SHT_DYNAMIC = 6
_DT_NULL, _DT_NEEDED = 0, 1
_END = struct.Struct("<4sHHHHIIH")  # zip end of central directory
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # zip central directory entry
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # zip local file header
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory record (no extensible data)
_ZIP64_LOCATOR = struct.Struct("<4sIQI")


class ContainerError(ValueError):
    """The file is not the container its suffix promises (the message says what is wrong)."""


def _elf_sections(data: SealedFile) -> Tuple[list, bytes]:
    """The section table of a 64-bit little-endian ELF file (one tuple of Elf64_Shdr fields per
    section) and its section-name string table."""
    if data.size < 64:
        raise ContainerError("is not a shared library (no ELF header)")
    header = data.read(0, 64)
    if header[:4] != b"\x7fELF":
        raise ContainerError("is not a shared library (no ELF header)")
    if header[4] != 2 or header[5] != 1:
        raise ContainerError("is not a 64-bit little-endian ELF file")
    table_offset, = struct.unpack_from("<Q", header, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", header, 0x3A)
    if entry_size != 64 or names_index >= count or table_offset > data.size or count * 64 > data.size - table_offset:
        raise ContainerError("is truncated or corrupt (section table out of range)")
    table = data.read(table_offset, count * 64)
    sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * 64) for i in range(count)]
    return sections, data.read(*_section_range(data, sections[names_index], "section names"))


def _section_range(data: SealedFile, entry: tuple, what: str) -> Tuple[int, int]:
    """(offset, size) of a section table entry, checked to lie inside the file."""
    offset, size = entry[4], entry[5]
    if offset > data.size or size > data.size - offset:
        raise ContainerError(f"is truncated or corrupt ({what} out of range)")
    return offset, size


def elf_section(data: SealedFile, section: str) -> Optional[Tuple[int, int]]:
    """(offset, size) of the one PROGBITS section named `section` of a 64-bit little-endian ELF file,
    None if it has no such section."""
    sections, names = _elf_sections(data)
    wanted = section.encode() + b"\0"
    found = [entry for entry in sections if names[entry[0] : entry[0] + len(wanted)] == wanted]
    if not found:
        return None
    if len(found) > 1:
        raise ContainerError(f"is corrupt (more than one {section} section)")
    if found[0][1] != _SHT_PROGBITS:
        raise ContainerError(f"is truncated or corrupt ({section} section out of range)")
    return _section_range(data, found[0], f"{section} section")


def needed_libraries(data: SealedFile) -> List[str]:
    """The DT_NEEDED entries (the shared libraries it links) of a 64-bit little-endian ELF file."""
    sections, _ = _elf_sections(data)
    dynamic = [entry for entry in sections if entry[1] == _SHT_DYNAMIC]
    if not dynamic:
        return []
    if len(dynamic) > 1 or dynamic[0][6] >= len(sections):
        raise ContainerError("is corrupt (dynamic section)")
    entries = data.read(*_section_range(data, dynamic[0], "dynamic section"))
    strings = data.read(*_section_range(data, sections[dynamic[0][6]], "dynamic string table"))
    needed = []
    for tag, value in struct.iter_unpack("<qQ", entries[: len(entries) // 16 * 16]):
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            end = strings.find(b"\0", value)
            if value >= len(strings) or end < 0:
                raise ContainerError("is corrupt (library name out of range)")
            needed.append(strings[value:end].decode(errors="replace"))
    return needed


def stored_zip_members(data: SealedFile) -> Dict[bytes, Tuple[int, int]]:
    """name -> (offset, size) of the data of every member of a zip whose members are all stored
    uncompressed (as torch's package writer stores them): no comment, no duplicate names, and zip64
    end records only where they repeat the 32-bit values (archives over 4 GiB are not supported)."""
    if data.size < _END.size:
        raise ContainerError("no zip directory")
    end_at = data.size - _END.size
    signature, disk, directory_disk, on_disk, entries, directory_size, directory_at, comment = _END.unpack(data.read(end_at, _END.size))
    if signature != b"PK\x05\x06" or comment:
        raise ContainerError("no zip directory at the end of the file")
    if 0xFFFF in (disk, directory_disk, on_disk, entries) or 0xFFFFFFFF in (directory_size, directory_at):
        raise ContainerError("zip64 archives are not supported")
    if disk or directory_disk or on_disk != entries or directory_at + directory_size != _directory_end(data, end_at, entries, directory_size, directory_at):
        raise ContainerError("inconsistent zip directory")
    directory = data.read(directory_at, directory_size)
    members: Dict[bytes, Tuple[int, int]] = {}
    cursor = 0
    for _ in range(entries):
        if _CENTRAL.size > len(directory) - cursor:
            raise ContainerError("zip directory out of range")
        (signature, _, _, flags, method, _, _, _, stored_size, size, name_size, extra_size, comment_size,
         _, _, _, local_at) = _CENTRAL.unpack_from(directory, cursor)
        name = directory[cursor + _CENTRAL.size : cursor + _CENTRAL.size + name_size]
        cursor += _CENTRAL.size + name_size + extra_size + comment_size
        if signature != b"PK\x01\x02" or cursor > len(directory):
            raise ContainerError("zip directory out of range")
        shown = name.decode(errors="replace")
        if method != 0 or stored_size != size or flags & 1:
            raise ContainerError(f"member {shown!r} is compressed or encrypted")
        if name in members:
            raise ContainerError(f"member {shown!r} appears twice")
        if local_at > directory_at or _LOCAL.size + name_size > directory_at - local_at:
            raise ContainerError(f"member {shown!r} out of range")
        local = _LOCAL.unpack(data.read(local_at, _LOCAL.size))
        local_name_size, local_extra_size = local[9], local[10]
        if local[0] != b"PK\x03\x04" or local_name_size != name_size or data.read(local_at + _LOCAL.size, name_size) != name:
            raise ContainerError(f"member {shown!r} has a bad local header")
        start = local_at + _LOCAL.size + name_size + local_extra_size
        if start > directory_at or size > directory_at - start:
            raise ContainerError(f"member {shown!r} out of range")
        members[name] = (start, size)
    if cursor != len(directory):
        raise ContainerError("inconsistent zip directory")
    return members


def _directory_end(data: SealedFile, end_at: int, entries: int, directory_size: int, directory_at: int) -> int:
    """Where the central directory must end: before the zip64 end records torch's writer always adds
    (they must repeat the 32-bit values exactly), else right before the end record."""
    locator_at = end_at - _ZIP64_LOCATOR.size
    if locator_at < 0 or data.read(locator_at, 4) != b"PK\x06\x07":
        return end_at
    _, record_disk, record_at, disks = _ZIP64_LOCATOR.unpack(data.read(locator_at, _ZIP64_LOCATOR.size))
    if record_disk != 0 or disks != 1 or record_at != locator_at - _ZIP64_END.size:
        raise ContainerError("inconsistent zip64 end records")
    signature, record_size, _, _, disk, directory_disk, on_disk, total, size, offset = _ZIP64_END.unpack(
        data.read(record_at, _ZIP64_END.size))
    if (signature != b"PK\x06\x06" or record_size != _ZIP64_END.size - 12 or disk or directory_disk
            or (on_disk, total, size, offset) != (entries, entries, directory_size, directory_at)):
        raise ContainerError("inconsistent zip64 end records")
    return record_at


def one_member(members: Iterable[bytes], matches: Callable[[bytes], bool], what: str) -> Optional[bytes]:
    """The one member name that `matches` (None if none; ContainerError if several)."""
    found = [name for name in members if matches(name)]
    if len(found) > 1:
        raise ContainerError(f"more than one {what}")
    return found[0] if found else None
