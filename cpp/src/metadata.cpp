#include "metadata.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "json.h"

#ifdef IMAGEPIECE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace imagepiece::detail {
namespace {

constexpr int kFormatVersion = 1;
constexpr const char* kSectionName = ".imagepiece_metadata";
constexpr const char* kPackageKey = "imagepiece";

[[noreturn]] void not_an_artifact(const std::string& path, const std::string& why) {
  throw Error(ErrorCode::kNotAnArtifact, "'" + path + "' " + why);
}

template <typename T>
T read_at(const std::string& bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

// The contents of section `name` of a 64-bit little-endian ELF file (std::nullopt if absent).
// Only the ELF header, the section table and the names are read, not the (large) library.
std::optional<std::string> elf_section(const std::string& path, const std::string& name) {
  std::ifstream file(path, std::ios::binary);
  auto read = [&](uint64_t offset, uint64_t size) {
    std::string bytes(size, '\0');
    file.seekg(static_cast<std::streamoff>(offset));
    if (!file.read(bytes.data(), static_cast<std::streamsize>(size))) not_an_artifact(path, "is truncated or corrupt (ELF data out of range)");
    return bytes;
  };
  file.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(file.tellg());
  if (file_size < 64) not_an_artifact(path, "is not a shared library (no ELF header)");
  const std::string header = read(0, 64);
  if (header.compare(0, 4, "\x7f" "ELF") != 0) not_an_artifact(path, "is not a shared library (no ELF header)");
  if (header[4] != 2 || header[5] != 1) not_an_artifact(path, "is not a 64-bit little-endian ELF file");
  const auto table_offset = read_at<uint64_t>(header, 0x28);
  const auto entry_size = read_at<uint16_t>(header, 0x3A);
  const auto count = read_at<uint16_t>(header, 0x3C);
  const auto names_index = read_at<uint16_t>(header, 0x3E);
  if (entry_size != 64 || table_offset + uint64_t{count} * 64 > file_size || names_index >= count) {
    not_an_artifact(path, "is truncated or corrupt (section table out of range)");
  }
  const std::string table = read(table_offset, uint64_t{count} * 64);
  auto field = [&](size_t index, size_t offset) { return read_at<uint64_t>(table, index * 64 + offset); };
  const uint64_t names_offset = field(names_index, 0x18), names_size = field(names_index, 0x20);
  if (names_offset + names_size > file_size) not_an_artifact(path, "is truncated or corrupt (section names out of range)");
  const std::string names = read(names_offset, names_size);
  for (size_t i = 0; i < count; ++i) {
    const auto name_at = read_at<uint32_t>(table, i * 64);
    if (name_at >= names.size() || std::strcmp(names.c_str() + name_at, name.c_str()) != 0) continue;
    const uint64_t offset = field(i, 0x18), size = field(i, 0x20);
    if (offset + size > file_size) not_an_artifact(path, "is truncated (metadata section out of range)");
    return read(offset, size);
  }
  return std::nullopt;
}

std::optional<std::string> package_metadata(const std::string& path) {
  std::unordered_map<std::string, std::string> metadata;
  try {
    metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception& error) {
    not_an_artifact(path, std::string("is not a readable .pt2 package (") + error.what() + ")");
  }
  auto found = metadata.find(kPackageKey);
  if (found == metadata.end()) return std::nullopt;
  return found->second;
}

std::vector<int64_t> int_list(const json::Value& value, const char* what) {
  std::vector<int64_t> out;
  for (const auto& item : value.array(what)) out.push_back(static_cast<int64_t>(item.number(what)));
  return out;
}

std::vector<double> number_list(const json::Value& value, const char* what) {
  std::vector<double> out;
  for (const auto& item : value.array(what)) out.push_back(item.number(what));
  return out;
}

std::string optional_string(const json::Value& value, const char* what) {
  return value.is_null() ? std::string() : value.string(what);
}

ModelInfo parse_model_info(const std::string& text) {
  const json::Value root = json::parse(text);
  ModelInfo info;
  info.metadata_json = text;
  const auto format = static_cast<int>(root.at("format_version").number("format_version"));
  if (format != kFormatVersion) {
    throw Error(ErrorCode::kIncompatible, "artifact format version " + std::to_string(format) + " is not the supported " +
                                              std::to_string(kFormatVersion) + "; recompile it");
  }
  info.model_name = root.at("model_name").string("model_name");
  info.arch = root.at("arch").string("arch");
  info.method = root.at("method").string("method");
  info.dtype = root.at("dtype").string("dtype");
  info.device_type = root.at("device_type").string("device_type");
  info.cuda_capability = optional_string(root.at("cuda_capability"), "cuda_capability");
  info.torch_version = root.at("torch_version").string("torch_version");
  info.created = root.at("created").string("created");
  info.checkpoint_sha256 = root.at("checkpoint").at("sha256").string("checkpoint.sha256");
  info.input_shape = int_list(root.at("input_shape"), "input_shape");
  info.num_classes = static_cast<int64_t>(root.at("num_classes").number("num_classes"));
  const json::Value& batch = root.at("batch");
  info.batch_min = static_cast<int64_t>(batch.at("min").number("batch.min"));
  info.batch_max = static_cast<int64_t>(batch.at("max").number("batch.max"));
  info.dynamic_batch = batch.at("dynamic").boolean("batch.dynamic");
  for (const auto& row : root.at("token_schedule").array("token_schedule")) {
    info.tokens_per_block.push_back(static_cast<int64_t>(row.at("tokens_in").number("token_schedule.tokens_in")));
  }
  const json::Value& preprocessing = root.at("preprocessing");
  info.mean = number_list(preprocessing.at("mean"), "preprocessing.mean");
  info.std = number_list(preprocessing.at("std"), "preprocessing.std");
  info.interpolation = preprocessing.at("interpolation").string("preprocessing.interpolation");
  info.crop_pct = preprocessing.at("crop_pct").number("preprocessing.crop_pct");
  if (info.input_shape.size() != 3 || info.batch_min < 1 || info.batch_max < info.batch_min || info.num_classes < 1) {
    throw std::runtime_error("inconsistent input_shape / batch / num_classes");
  }
  return info;
}

// "2.14.1+cu130" -> "2.14.1": the C++ side knows only the release number.
std::string release_of(const std::string& version) { return version.substr(0, version.find('+')); }

}  // namespace

ModelInfo read_model_info(const std::string& artifact) {
  std::error_code ignored;
  if (!std::filesystem::is_regular_file(artifact, ignored)) {
    throw Error(ErrorCode::kFileNotFound, "artifact '" + artifact + "' does not exist or is not a file");
  }
  const std::string suffix = std::filesystem::path(artifact).extension().string();
  if (suffix != ".so" && suffix != ".pt2") not_an_artifact(artifact, "is not an artifact: an artifact is a .so or .pt2 file");
  const auto text = suffix == ".so" ? elf_section(artifact, kSectionName) : package_metadata(artifact);
  if (!text) not_an_artifact(artifact, "has no ImagePiece metadata: it was not made by scripts/aot_compile.py");
  try {
    return parse_model_info(*text);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& error) {
    not_an_artifact(artifact, std::string("has corrupt metadata (") + error.what() + ")");
  }
}

void check_compatible(const ModelInfo& info, const c10::Device& device) {
  const std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                           std::to_string(TORCH_VERSION_PATCH);
  if (release_of(info.torch_version) != here) {
    throw Error(ErrorCode::kIncompatible, "artifact was compiled with torch " + info.torch_version + " but this runtime uses torch " +
                                              here + "; AOTInductor artifacts run only with the torch that built them: recompile it");
  }
  const std::string wanted = device.is_cuda() ? "cuda" : device.is_cpu() ? "cpu" : c10::DeviceTypeName(device.type(), true);
  if (info.device_type != wanted) {
    throw Error(ErrorCode::kIncompatible, "artifact was compiled for " + info.device_type + " and cannot run on " + wanted);
  }
  if (device.is_cuda()) {
#ifdef IMAGEPIECE_WITH_CUDA
    if (!at::cuda::is_available()) throw Error(ErrorCode::kIncompatible, "artifact was compiled for cuda but no CUDA device is available");
    const auto* properties = at::cuda::getDeviceProperties(device.index());
    const std::string capability = std::to_string(properties->major) + "." + std::to_string(properties->minor);
    if (capability != info.cuda_capability) {
      throw Error(ErrorCode::kIncompatible, "artifact was compiled for CUDA compute capability " + info.cuda_capability +
                                                ", this GPU (" + properties->name + ") is " + capability);
    }
#else
    throw Error(ErrorCode::kIncompatible, "this runtime was built without CUDA support");
#endif
  }
}

}  // namespace imagepiece::detail
