#include "artifact_containers.h"

#include <cstring>

namespace imagepiece::detail {
namespace {

template <typename T>
T read_at(std::string_view bytes, uint64_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

// Whether [offset, offset + size) lies inside [0, limit), without overflow.
bool inside(uint64_t offset, uint64_t size, uint64_t limit) { return offset <= limit && size <= limit - offset; }

constexpr uint32_t kShtProgbits = 1;
constexpr uint64_t kEndSize = 22, kCentralSize = 46, kLocalSize = 30, kZip64EndSize = 56, kZip64LocatorSize = 20;

// Where the central directory must end: before the zip64 end records torch's writer always adds (they
// must repeat the 32-bit values exactly), else right before the end record.
uint64_t directory_end(std::string_view file, uint64_t end_at, uint64_t entries, uint64_t directory_size, uint64_t directory_at) {
  if (end_at < kZip64LocatorSize) return end_at;
  const uint64_t locator_at = end_at - kZip64LocatorSize;
  if (file.substr(locator_at, 4) != std::string_view("PK\x06\x07", 4)) return end_at;
  const auto record_disk = read_at<uint32_t>(file, locator_at + 4);
  const auto record_at = read_at<uint64_t>(file, locator_at + 8);
  const auto disks = read_at<uint32_t>(file, locator_at + 16);
  if (record_disk != 0 || disks != 1 || locator_at < kZip64EndSize || record_at != locator_at - kZip64EndSize) {
    throw ContainerError("inconsistent zip64 end records");
  }
  const bool consistent = file.substr(record_at, 4) == std::string_view("PK\x06\x06", 4) &&
                          read_at<uint64_t>(file, record_at + 4) == kZip64EndSize - 12 && read_at<uint32_t>(file, record_at + 16) == 0 &&
                          read_at<uint32_t>(file, record_at + 20) == 0 && read_at<uint64_t>(file, record_at + 24) == entries &&
                          read_at<uint64_t>(file, record_at + 32) == entries && read_at<uint64_t>(file, record_at + 40) == directory_size &&
                          read_at<uint64_t>(file, record_at + 48) == directory_at;
  if (!consistent) throw ContainerError("inconsistent zip64 end records");
  return record_at;
}

}  // namespace

std::optional<Span> elf_section(std::string_view file, const std::string& section) {
  const uint64_t size = file.size();
  if (size < 64 || file.substr(0, 4) != "\x7f" "ELF") throw ContainerError("is not a shared library (no ELF header)");
  if (file[4] != 2 || file[5] != 1) throw ContainerError("is not a 64-bit little-endian ELF file");
  const auto table_offset = read_at<uint64_t>(file, 0x28);
  const auto entry_size = read_at<uint16_t>(file, 0x3A);
  const auto count = read_at<uint16_t>(file, 0x3C);
  const auto names_index = read_at<uint16_t>(file, 0x3E);
  if (entry_size != 64 || names_index >= count || !inside(table_offset, uint64_t{count} * 64, size)) {
    throw ContainerError("is truncated or corrupt (section table out of range)");
  }
  auto field = [&](uint64_t index, uint64_t offset) { return read_at<uint64_t>(file, table_offset + index * 64 + offset); };
  const uint64_t names_offset = field(names_index, 0x18), names_size = field(names_index, 0x20);
  if (!inside(names_offset, names_size, size)) throw ContainerError("is truncated or corrupt (section names out of range)");
  const std::string_view names = file.substr(names_offset, names_size);
  const std::string wanted = section + '\0';
  std::optional<uint64_t> found;
  for (uint64_t i = 0; i < count; ++i) {
    const auto name_at = read_at<uint32_t>(file, table_offset + i * 64);
    if (name_at > names.size() || names.substr(name_at, wanted.size()) != wanted) continue;
    if (found) throw ContainerError("is corrupt (more than one " + section + " section)");
    found = i;
  }
  if (!found) return std::nullopt;
  const auto kind = read_at<uint32_t>(file, table_offset + *found * 64 + 4);
  const Span span{field(*found, 0x18), field(*found, 0x20)};
  if (kind != kShtProgbits || !inside(span.offset, span.size, size)) {
    throw ContainerError("is truncated or corrupt (" + section + " section out of range)");
  }
  return span;
}

std::map<std::string, Span> stored_zip_members(std::string_view file) {
  if (file.size() < kEndSize) throw ContainerError("no zip directory");
  const uint64_t end_at = file.size() - kEndSize;
  const auto disk = read_at<uint16_t>(file, end_at + 4), directory_disk = read_at<uint16_t>(file, end_at + 6);
  const auto on_disk = read_at<uint16_t>(file, end_at + 8), entries = read_at<uint16_t>(file, end_at + 10);
  const auto directory_size = read_at<uint32_t>(file, end_at + 12), directory_at = read_at<uint32_t>(file, end_at + 16);
  const auto comment = read_at<uint16_t>(file, end_at + 20);
  if (file.substr(end_at, 4) != std::string_view("PK\x05\x06", 4) || comment != 0) throw ContainerError("no zip directory at the end of the file");
  if (disk == 0xFFFF || directory_disk == 0xFFFF || on_disk == 0xFFFF || entries == 0xFFFF || directory_size == 0xFFFFFFFF ||
      directory_at == 0xFFFFFFFF) {
    throw ContainerError("zip64 archives are not supported");
  }
  if (disk != 0 || directory_disk != 0 || on_disk != entries ||
      uint64_t{directory_at} + directory_size != directory_end(file, end_at, entries, directory_size, directory_at)) {
    throw ContainerError("inconsistent zip directory");
  }
  const std::string_view directory = file.substr(directory_at, directory_size);
  std::map<std::string, Span> members;
  uint64_t cursor = 0;
  for (uint64_t entry = 0; entry < entries; ++entry) {
    if (kCentralSize > directory.size() - cursor) throw ContainerError("zip directory out of range");
    const auto flags = read_at<uint16_t>(directory, cursor + 8), method = read_at<uint16_t>(directory, cursor + 10);
    const auto stored_size = read_at<uint32_t>(directory, cursor + 20), size = read_at<uint32_t>(directory, cursor + 24);
    const auto name_size = read_at<uint16_t>(directory, cursor + 28), extra_size = read_at<uint16_t>(directory, cursor + 30);
    const auto comment_size = read_at<uint16_t>(directory, cursor + 32);
    const auto local_at = read_at<uint32_t>(directory, cursor + 42);
    const bool signed_entry = directory.substr(cursor, 4) == std::string_view("PK\x01\x02", 4);
    const std::string name(directory.substr(cursor + kCentralSize, name_size));
    cursor += kCentralSize + name_size + extra_size + comment_size;
    if (!signed_entry || cursor > directory.size()) throw ContainerError("zip directory out of range");
    const std::string shown = "'" + name + "'";
    if (method != 0 || stored_size != size || (flags & 1) != 0) throw ContainerError("member " + shown + " is compressed or encrypted");
    if (members.count(name) != 0) throw ContainerError("member " + shown + " appears twice");
    if (!inside(local_at, kLocalSize + name_size, directory_at)) throw ContainerError("member " + shown + " out of range");
    const auto local_name_size = read_at<uint16_t>(file, local_at + 26), local_extra_size = read_at<uint16_t>(file, local_at + 28);
    if (file.substr(local_at, 4) != std::string_view("PK\x03\x04", 4) || local_name_size != name_size ||
        file.substr(local_at + kLocalSize, name_size) != name) {
      throw ContainerError("member " + shown + " has a bad local header");
    }
    const uint64_t start = uint64_t{local_at} + kLocalSize + name_size + local_extra_size;
    if (!inside(start, size, directory_at)) throw ContainerError("member " + shown + " out of range");
    members[name] = Span{start, size};
  }
  if (cursor != directory.size()) throw ContainerError("inconsistent zip directory");
  return members;
}

}  // namespace imagepiece::detail
