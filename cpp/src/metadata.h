// Reading and checking artifact metadata (the format is written by python/imagepiece/export.py and
// described in python/imagepiece/artifact.py: an ELF section in a .so, a package key in a .pt2).
#pragma once

#include <c10/core/Device.h>

#include <string>

#include "imagepiece/runtime.h"

namespace imagepiece::detail {

// Reads and parses the artifact's metadata; throws kFileNotFound or kNotAnArtifact.
ModelInfo read_model_info(const std::string& artifact);

// Throws kIncompatible naming what differs when this process cannot run `info` on `device`.
void check_compatible(const ModelInfo& info, const c10::Device& device);

}  // namespace imagepiece::detail
