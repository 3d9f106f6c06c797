// What an artifact's metadata may say: the strict reader and the checks made against it, with exactly
// the rules of python/imagepiece/artifact_metadata.py (a text one accepts, the other accepts).
#pragma once

#include <c10/core/Device.h>

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "imagepiece/runtime.h"

namespace imagepiece::detail {

// The metadata text as a JSON object; std::invalid_argument saying why when it is not at most 1 MiB of
// UTF-8 (no byte-order mark, no NUL) holding plain JSON (no duplicate keys, no number that overflows a
// double, nesting at most 32 deep).
nlohmann::json decode_metadata(std::string_view text);

// kIncompatible, with the advice to recompile, when the metadata declares another format version.
void check_format_version(const nlohmann::json& document, const std::string& where);

// The ModelInfo of a document whose fields all have their types and ranges, else kNotAnArtifact.
ModelInfo validated_model_info(const nlohmann::json& document, std::string_view text, const std::string& where);

// What an artifact of this precision computes in and returns its logits in: int8 Linear layers sit
// between fp32 activations, so "int8" -> "fp32"; the others are themselves.
std::string compute_dtype(const std::string& precision);

// One image as the artifact takes it: [C, H, W] ("float_nchw") or [H, W, C] ("uint8_nhwc").
std::vector<int64_t> image_dims(const ModelInfo& info);

// Throws kIncompatible naming what differs when this process cannot run `info` on `device` (torch
// release, device type, GPU compute capability, or a CPU without what the kernels were compiled for).
void check_compatible(const ModelInfo& info, const c10::Device& device);

}  // namespace imagepiece::detail
