#include "metadata.h"

#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <regex>
#include <set>
#include <stdexcept>
#include <vector>

#ifdef IMAGEPIECE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace imagepiece::detail {
namespace {

using nlohmann::json;

constexpr int kFormatVersion = 2;
constexpr size_t kMaxMetadataBytes = size_t{1} << 20;
constexpr int kMaxDepth = 32;
constexpr int64_t kMaxBatch = int64_t{1} << 20, kMaxImageSide = int64_t{1} << 16, kMaxClasses = int64_t{1} << 24, kMaxBlocks = 1024;
constexpr size_t kMaxCpuFeatures = 64;
constexpr const char* kDigestKey = "artifact_sha256";
// ATen's x86 capabilities, lowest first (python/imagepiece/cpu_target.py: X86_CAPABILITIES).
const std::vector<std::string> kX86Capabilities = {"DEFAULT", "AVX2", "AVX512"};

// Why this CPU cannot run code built for `capability` + `features` ("" when it can); the rules and
// words of python/imagepiece/cpu_target.py `unsupported`.
std::string unsupported_cpu(const std::string& capability, const std::vector<std::string>& features) {
  const std::string running = at::get_cpu_capability();  // lowered by ATEN_CPU_CAPABILITY, as ATen's kernels are
  if (capability != running && capability != "DEFAULT") {
    const auto rank = [](const std::string& name) { return std::find(kX86Capabilities.begin(), kX86Capabilities.end(), name); };
    const bool incomparable = rank(capability) == kX86Capabilities.end() || rank(running) == kX86Capabilities.end();
    if (incomparable || rank(running) < rank(capability)) {
      const char* lowered = std::getenv("ATEN_CPU_CAPABILITY");
      const std::string because = lowered && *lowered ? std::string(" (ATEN_CPU_CAPABILITY=") + lowered + ")" : "";
      return "artifact was compiled for " + capability + " CPUs, this CPU supports " + running + because +
             ": recompile it on (or for) this machine";
    }
  }
  const auto available = at::cpu::get_cpu_capabilities();
  std::string missing;
  for (const auto& feature : features) {
    auto found = available.find(feature);
    if (found == available.end() || !found->second.isBool() || !found->second.toBool()) missing += (missing.empty() ? "" : ", ") + feature;
  }
  if (!missing.empty()) {
    return "artifact was compiled for CPUs with " + missing + ", which this CPU lacks: recompile it on this machine "
           "(or with ATEN_CPU_CAPABILITY set to what every target CPU has)";
  }
  return "";
}

// Nesting depth and finite numbers (nlohmann parses an integer beyond 64 bits as a double; one beyond a
// double is an error already, as in Python).
void check_tree(const json& value, int depth) {
  if (depth > kMaxDepth) throw std::invalid_argument("nested deeper than " + std::to_string(kMaxDepth) + " levels");
  if (value.is_number_float() && !std::isfinite(value.get<double>())) throw std::invalid_argument("a number overflows a double");
  if (value.is_structured()) {
    for (const auto& item : value) check_tree(item, depth + 1);
  }
}

bool is_int(const json& value) { return value.is_number_integer(); }

std::string shown(const json* value) {
  if (value == nullptr) return "missing";
  const std::string text = value->dump();
  return text.substr(0, 80);
}

// Typed access to one JSON object, naming the full field path in every complaint.
class Fields {
 public:
  Fields(const json& document, std::string where, std::string prefix = "")
      : document_(document), where_(std::move(where)), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& wanted, const json* value) const {
    throw Error(ErrorCode::kNotAnArtifact, where_ + " has invalid metadata: " + prefix_ + key + " must be " + wanted + ", got " + shown(value));
  }

  const json* get(const std::string& key) const {
    auto found = document_.find(key);
    return found == document_.end() ? nullptr : &*found;
  }

  int64_t integer(const std::string& key, int64_t low, int64_t high) const {
    const json* value = get(key);
    if (!(value && in_range(*value, low, high))) fail(key, "an integer in " + std::to_string(low) + ".." + std::to_string(high), value);
    return value->get<int64_t>();
  }

  // A JSON integer (never 2.0 or true) in [low, high]; nlohmann keeps non-negative ones unsigned.
  static bool in_range(const json& value, int64_t low, int64_t high) {
    if (value.is_number_unsigned()) {
      const uint64_t number = value.get<uint64_t>();
      return number <= static_cast<uint64_t>(high) && static_cast<int64_t>(number) >= low;
    }
    return is_int(value) && low <= value.get<int64_t>() && value.get<int64_t>() <= high;
  }

  double positive_number(const std::string& key) const {
    const json* value = get(key);
    if (!(value && value->is_number() && value->get<double>() > 0.0)) fail(key, "a number > 0", value);
    return value->get<double>();
  }

  std::string string(const std::string& key, const std::vector<std::string>& allowed = {}, const std::regex* pattern = nullptr) const {
    const json* value = get(key);
    bool ok = value && value->is_string() && !value->get_ref<const std::string&>().empty();
    if (ok && !allowed.empty()) ok = std::find(allowed.begin(), allowed.end(), value->get<std::string>()) != allowed.end();
    if (ok && pattern) ok = std::regex_match(value->get<std::string>(), *pattern);
    if (!ok) {
      std::string wanted = "a non-empty string";
      if (!allowed.empty()) {
        wanted = "one of [";
        for (size_t i = 0; i < allowed.size(); ++i) wanted += (i ? ", '" : "'") + allowed[i] + "'";
        wanted += "]";
      } else if (pattern) {
        wanted = "a string of the expected form";
      }
      fail(key, wanted, value);
    }
    return value->get<std::string>();
  }

  std::string any_string(const std::string& key) const {
    const json* value = get(key);
    if (!(value && value->is_string())) fail(key, "a string", value);
    return value->get<std::string>();
  }

  bool boolean(const std::string& key) const {
    const json* value = get(key);
    if (!(value && value->is_boolean())) fail(key, "true or false", value);
    return value->get<bool>();
  }

  Fields object(const std::string& key) const {
    const json* value = get(key);
    if (!(value && value->is_object())) fail(key, "an object", value);
    return Fields(*value, where_, prefix_ + key + ".");
  }

  const json& array(const std::string& key, size_t low, size_t high) const {
    const json* value = get(key);
    if (!(value && value->is_array() && low <= value->size() && value->size() <= high)) {
      fail(key, "an array of " + std::to_string(low) + ".." + std::to_string(high) + " items", value);
    }
    return *value;
  }

 private:
  const json& document_;
  std::string where_, prefix_;
};

}  // namespace

json decode_metadata(std::string_view text) {
  if (text.size() > kMaxMetadataBytes) {
    throw std::invalid_argument("metadata is " + std::to_string(text.size()) + " bytes, more than the " + std::to_string(kMaxMetadataBytes) + " allowed");
  }
  // nlohmann stops at a NUL and skips a byte-order mark; the rules (and Python) refuse both.
  if (text.find('\0') != std::string_view::npos) throw std::invalid_argument("metadata contains a NUL byte");
  if (text.substr(0, 3) == "\xEF\xBB\xBF") throw std::invalid_argument("metadata starts with a byte-order mark");
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto track_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == json::parse_event_t::object_end) open_objects.pop_back();
    if (event == json::parse_event_t::key && !open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json document;
  try {
    document = json::parse(text.begin(), text.end(), track_keys);
  } catch (const json::exception& error) {
    throw std::invalid_argument(std::string("metadata is not valid JSON (") + error.what() + ")");
  }
  if (!duplicate.empty()) throw std::invalid_argument("metadata is not valid JSON (duplicate key '" + duplicate + "')");
  check_tree(document, 1);
  if (!document.is_object()) throw std::invalid_argument("metadata is not a JSON object");
  return document;
}

void check_format_version(const json& document, const std::string& where) {
  auto found = document.find("format_version");
  if (found == document.end() || !is_int(*found)) return;  // not an integer: validated_model_info says so
  if (!found->is_number_unsigned() || found->get<uint64_t>() != kFormatVersion) {
    throw Error(ErrorCode::kIncompatible, where + ": artifact format version " + found->dump() + " is not the supported " +
                                              std::to_string(kFormatVersion) + "; recompile it");
  }
}

ModelInfo validated_model_info(const json& document, std::string_view text, const std::string& where) {
  static const std::regex hex_digest("[0-9a-f]{64}"), capability("[0-9]+\\.[0-9]+");
  const Fields fields(document, where);
  ModelInfo info;
  fields.integer("format_version", kFormatVersion, kFormatVersion);
  info.artifact_sha256 = fields.string(kDigestKey, {}, &hex_digest);
  info.model_name = fields.string("model_name");
  info.arch = fields.string("arch");
  info.method = fields.string("method");
  info.torch_version = fields.string("torch_version");
  info.created = fields.any_string("created");
  fields.object("config");
  info.input_format = fields.string("input_format", {"float_nchw", "uint8_nhwc"});
  info.precision = fields.string("precision", {"fp32", "fp16", "bf16", "int8"});
  info.dtype = fields.string("dtype", {info.input_format == "uint8_nhwc" ? "uint8" : compute_dtype(info.precision)});
  info.device_type = fields.string("device_type", {"cpu", "cuda"});
  if (info.device_type == "cuda") {
    info.cuda_capability = fields.string("cuda_capability", {}, &capability);
  } else if (const json* value = fields.get("cuda_capability"); !(value && value->is_null())) {
    fields.fail("cuda_capability", "null for a cpu artifact", value);
  }
  if (info.device_type == "cpu") {
    info.cpu_capability = fields.string("cpu_capability");
    const json& features = fields.array("cpu_features", 0, kMaxCpuFeatures);
    for (size_t i = 0; i < features.size(); ++i) {
      if (!(features[i].is_string() && !features[i].get_ref<const std::string&>().empty())) {
        fields.fail("cpu_features[" + std::to_string(i) + "]", "a non-empty string", &features[i]);
      }
      info.cpu_features.push_back(features[i].get<std::string>());
    }
  } else {
    for (const char* key : {"cpu_capability", "cpu_features"}) {
      if (const json* value = fields.get(key); !(value && value->is_null())) fields.fail(key, "null for a cuda artifact", value);
    }
  }
  info.checkpoint_sha256 = fields.object("checkpoint").any_string("sha256");
  const json& shape = fields.array("input_shape", 3, 3);
  for (size_t i = 0; i < shape.size(); ++i) {
    if (!Fields::in_range(shape[i], 1, kMaxImageSide)) fields.fail("input_shape[" + std::to_string(i) + "]", "an integer in 1.." + std::to_string(kMaxImageSide), &shape[i]);
    info.input_shape.push_back(shape[i].get<int64_t>());
  }
  info.num_classes = fields.integer("num_classes", 1, kMaxClasses);
  // Optional: a fine-tune's class folders, in label order. Not kept in ModelInfo, yet checked: Python callers
  // index it by class (predict, serve), so a list of another length must be refused here as the Python reader does.
  if (const json* names = fields.get("class_names"); names && !names->is_null()) {
    const auto classes = static_cast<size_t>(info.num_classes);
    const json& class_names = fields.array("class_names", classes, classes);
    for (size_t i = 0; i < class_names.size(); ++i) {
      if (!class_names[i].is_string()) fields.fail("class_names[" + std::to_string(i) + "]", "a string", &class_names[i]);
    }
  }
  const Fields batch = fields.object("batch");
  info.batch_min = batch.integer("min", 1, kMaxBatch);
  info.batch_max = batch.integer("max", info.batch_min, kMaxBatch);
  info.dynamic_batch = batch.boolean("dynamic");
  if (info.dynamic_batch != (info.batch_min != info.batch_max)) batch.fail("dynamic", "true exactly when min != max", batch.get("dynamic"));
  const json& schedule = fields.array("token_schedule", 1, kMaxBlocks);
  for (size_t i = 0; i < schedule.size(); ++i) {
    const std::string name = "token_schedule[" + std::to_string(i) + "]";
    if (!schedule[i].is_object()) fields.fail(name, "an object", &schedule[i]);
    info.tokens_per_block.push_back(Fields(schedule[i], where, name + ".").integer("tokens_in", 1, kMaxBatch));
  }
  const Fields preprocessing = fields.object("preprocessing");
  const auto channels = static_cast<size_t>(info.input_shape[0]);
  for (const bool is_mean : {true, false}) {
    const std::string key = is_mean ? "mean" : "std";
    const json& values = preprocessing.array(key, channels, channels);
    for (size_t i = 0; i < values.size(); ++i) {
      if (!(values[i].is_number() && (is_mean || values[i].get<double>() > 0.0))) {
        preprocessing.fail(key + "[" + std::to_string(i) + "]", is_mean ? "a number" : "a number > 0", &values[i]);
      }
      (is_mean ? info.mean : info.std).push_back(values[i].get<double>());
    }
  }
  info.interpolation = preprocessing.string("interpolation");
  info.crop_pct = preprocessing.positive_number("crop_pct");
  info.metadata_json = std::string(text);
  return info;
}

std::string compute_dtype(const std::string& precision) { return precision == "int8" ? "fp32" : precision; }

std::vector<int64_t> image_dims(const ModelInfo& info) {
  const auto& shape = info.input_shape;
  if (info.input_format == "uint8_nhwc") return {shape[1], shape[2], shape[0]};
  return shape;
}

void check_compatible(const ModelInfo& info, const c10::Device& device) {
  // Builds of one release (CPU, CUDA, local tags after '+') share the AOTI ABI: compare the release.
  const std::string release = info.torch_version.substr(0, info.torch_version.find('+'));
  if (release != TORCH_VERSION) {
    throw Error(ErrorCode::kIncompatible, "artifact was compiled with torch " + info.torch_version + " but this runtime uses torch " +
                                              TORCH_VERSION + "; AOTInductor artifacts run only with the torch release that built them: recompile it");
  }
  const std::string wanted = device.is_cuda() ? "cuda" : device.is_cpu() ? "cpu" : c10::DeviceTypeName(device.type(), true);
  if (info.device_type != wanted) {
    throw Error(ErrorCode::kIncompatible, "artifact was compiled for " + info.device_type + " and cannot run on " + wanted);
  }
  if (device.is_cpu()) {
    if (const std::string why = unsupported_cpu(info.cpu_capability, info.cpu_features); !why.empty()) throw Error(ErrorCode::kIncompatible, why);
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
