// Where things are inside the two artifact containers: an ELF section of a .so, the members of a .pt2
// zip. Read strictly and bounds-checked, with the rules of python/imagepiece/artifact_containers.py;
// problems throw ContainerError saying what is wrong.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace imagepiece::detail {

struct ContainerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Span {
  uint64_t offset = 0, size = 0;
};

// The one PROGBITS section named `section` of a 64-bit little-endian ELF file (nullopt if none).
std::optional<Span> elf_section(std::string_view file, const std::string& section);

// name -> data of every member of a zip whose members are all stored uncompressed, as torch's package
// writer stores them: no comment, no duplicate names, zip64 end records only where they repeat the
// 32-bit values (archives over 4 GiB are not supported).
std::map<std::string, Span> stored_zip_members(std::string_view file);

}  // namespace imagepiece::detail
