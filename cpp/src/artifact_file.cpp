#include "artifact_file.h"

#include <openssl/evp.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>

#include "artifact_containers.h"
#include "metadata.h"

namespace imagepiece::detail {
namespace {

constexpr const char* kSectionName = ".imagepiece_metadata";
constexpr std::string_view kPackageMetadata = "imagepiece/metadata.json";
constexpr std::string_view kPackageLibraryFolder = "data/aotinductor/model/";
constexpr std::string_view kDigestMarker = "\"artifact_sha256\": \"";
constexpr std::string_view kPlaceholder = "0000000000000000000000000000000000000000000000000000000000000000";
constexpr uint64_t kMaxMetadataBytes = uint64_t{1} << 20;
constexpr const char* kNoMetadata =
    "has no ImagePiece metadata: it was not made by scripts/aot_compile.py (or by one older than format 2: recompile it)";

[[noreturn]] void fail(const std::string& path, const std::string& why, ErrorCode code = ErrorCode::kNotAnArtifact) {
  throw Error(code, "'" + path + "' " + why);
}

class Sha256 {
 public:
  Sha256() : context_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
    if (!context_ || EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr) != 1) throw std::runtime_error("sha256 unavailable");
  }
  void update(std::string_view bytes) { EVP_DigestUpdate(context_.get(), bytes.data(), bytes.size()); }
  // `bytes` with the 64 bytes at `digest_at` (when inside) read as "0".
  void update(std::string_view bytes, std::optional<uint64_t> digest_at) {
    if (!digest_at || *digest_at >= bytes.size()) return update(bytes);
    update(bytes.substr(0, *digest_at));
    update(kPlaceholder);
    update(bytes.substr(*digest_at + kPlaceholder.size()));
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    EVP_DigestFinal_ex(context_.get(), digest, &size);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < size; ++i) out += {digits[digest[i] >> 4], digits[digest[i] & 15]};
    return out;
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context_;
};

std::string little_endian_u64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}

// Where the digest's 64 hex digits start in the metadata text (nullopt when there is no digest).
std::optional<uint64_t> digest_position(std::string_view text, const std::string& path) {
  const size_t first = text.find(kDigestMarker);
  if (first == std::string_view::npos) return std::nullopt;
  const size_t start = first + kDigestMarker.size();
  const std::string_view digits = text.substr(start, 64);
  const bool well_formed = text.find(kDigestMarker, first + 1) == std::string_view::npos && digits.size() == 64 &&
                           digits.find_first_not_of("0123456789abcdef") == std::string_view::npos && text.substr(start + 64, 1) == "\"";
  if (!well_formed) fail(path, "is corrupt (its metadata does not hold exactly one well-formed artifact_sha256)");
  return start;
}

std::string_view metadata_text(std::string_view file, Span span, const std::string& path) {
  if (span.size > kMaxMetadataBytes) {
    fail(path, "has corrupt metadata (metadata is " + std::to_string(span.size) + " bytes, more than the " + std::to_string(kMaxMetadataBytes) + " allowed)");
  }
  return file.substr(span.offset, span.size);
}

// The validated metadata, once the recorded digest equals `actual()` (the contents' digest).
ModelInfo checked_model_info(std::string_view text, std::optional<uint64_t> digest_at, const std::function<std::string()>& actual,
                             const std::string& path) {
  const std::string where = "'" + path + "'";
  std::optional<nlohmann::json> document;
  std::string decode_error;
  try {
    document = decode_metadata(text);
  } catch (const std::invalid_argument& error) {
    decode_error = error.what();
  }
  if (document) check_format_version(*document, where);  // an older or newer format says so first
  if (!digest_at) fail(path, "has no artifact_sha256 in its metadata: it was not made by scripts/aot_compile.py");
  const std::string recorded(text.substr(*digest_at, 64)), computed = actual();
  if (recorded != computed) {
    fail(path, "was modified or is corrupt: its contents do not match the sha256 digest recorded when it was compiled (recorded " +
                   recorded.substr(0, 16) + "..., contents " + computed.substr(0, 16) + "...); recompile or copy it again");
  }
  if (!document) fail(path, "has corrupt metadata (" + decode_error + ")");
  return validated_model_info(*document, text, where);
}

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

bool is_metadata_member(const std::string& name) {
  return name == kPackageMetadata || ends_with(name, "/" + std::string(kPackageMetadata));
}

bool is_library_member(const std::string& name) {
  return ends_with(name, ".so") && (name.rfind(kPackageLibraryFolder, 0) == 0 || name.find("/" + std::string(kPackageLibraryFolder)) != std::string::npos);
}

// The one member that `matches` (nullopt if none; ContainerError if several).
std::optional<std::string> one_member(const std::map<std::string, Span>& members, bool (*matches)(const std::string&), const std::string& what) {
  std::optional<std::string> found;
  for (const auto& [name, span] : members) {
    if (!matches(name)) continue;
    if (found) throw ContainerError("more than one " + what);
    found = name;
  }
  return found;
}

VerifiedArtifact open_library(const std::string& path, SealedFile data) {
  std::optional<Span> span;
  try {
    span = elf_section(data.bytes(), kSectionName);
  } catch (const ContainerError& error) {
    fail(path, error.what());
  }
  if (!span) fail(path, kNoMetadata);
  const std::string_view text = metadata_text(data.bytes(), *span, path);
  const auto digest_at = digest_position(text, path);
  auto actual = [&] {
    Sha256 hash;
    hash.update(data.bytes(), span->offset + *digest_at);
    return hash.hex();
  };
  ModelInfo info = checked_model_info(text, digest_at, actual, path);
  return VerifiedArtifact{std::move(info), std::move(data)};
}

VerifiedArtifact open_package(const std::string& path, const SealedFile& data) {
  std::map<std::string, Span> members;
  std::optional<std::string> metadata_name, library_name;
  try {
    members = stored_zip_members(data.bytes());
    metadata_name = one_member(members, is_metadata_member, "ImagePiece metadata member");
    library_name = one_member(members, is_library_member, "compiled library");
  } catch (const ContainerError& error) {
    fail(path, std::string("is not a .pt2 package made by scripts/aot_compile.py (") + error.what() + ")");
  }
  if (!metadata_name) fail(path, kNoMetadata);
  const std::string_view text = metadata_text(data.bytes(), members[*metadata_name], path);
  const auto digest_at = digest_position(text, path);
  if (!library_name) fail(path, "holds no compiled library (data/aotinductor/model/*.so): it was not made by scripts/aot_compile.py");
  const Span library_span = members[*library_name];
  const auto name = std::filesystem::path(path).filename().string();
  SealedFile library = SealedFile::slice_of(data, library_span.offset, library_span.size, "imagepiece:" + name + ":library");
  auto actual = [&] {
    Sha256 hash;
    for (const auto& [member, span] : members) {  // std::map: byte order of the names
      hash.update(little_endian_u64(member.size()) + member + little_endian_u64(span.size));
      // The library is hashed from the very copy that gets loaded.
      const std::string_view bytes = member == *library_name ? library.bytes() : data.bytes().substr(span.offset, span.size);
      hash.update(bytes, member == *metadata_name ? digest_at : std::nullopt);
    }
    return hash.hex();
  };
  ModelInfo info = checked_model_info(text, digest_at, actual, path);
  return VerifiedArtifact{std::move(info), std::move(library)};
}

// Refuses, from its first bytes, a file that cannot be an artifact before the whole of it is copied into memory: a
// data file of many GB given an artifact's name must not cost its size in RAM. Every check runs again on the copy.
void check_leading_bytes(const std::string& path, const std::string& suffix) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return;  // unreadable: copying it says why
  char head[4] = {};
  file.read(head, sizeof head);
  const std::string_view got(head, static_cast<size_t>(file.gcount()));
  if (suffix == ".so" && got != std::string_view("\x7f" "ELF", 4)) fail(path, "is not a shared library (no ELF header)");
  if (suffix == ".pt2" && got != std::string_view("PK\x03\x04", 4)) {
    fail(path, "is not a .pt2 package made by scripts/aot_compile.py (not a zip file)");
  }
}

}  // namespace

VerifiedArtifact open_artifact(const std::string& path) {
  std::error_code ignored;
  if (!std::filesystem::is_regular_file(path, ignored)) fail(path, "does not exist or is not a file", ErrorCode::kFileNotFound);
  const std::string suffix = std::filesystem::path(path).extension().string();
  if (suffix != ".so" && suffix != ".pt2") fail(path, "is not an artifact: an artifact is a .so or .pt2 file");
  check_leading_bytes(path, suffix);
  SealedFile data = SealedFile::copy_of(path);
  if (suffix == ".so") return open_library(path, std::move(data));
  return open_package(path, data);  // `data` is released here: the package's library has its own copy
}

}  // namespace imagepiece::detail
