// Reading an artifact: once, into a sealed private copy, verified against the sha256 digest its
// metadata records (the format is described in python/imagepiece/artifact.py, which applies the same
// rules with the same error codes).
#pragma once

#include <string>

#include "imagepiece/runtime.h"
#include "sealed_file.h"

namespace imagepiece::detail {

struct VerifiedArtifact {
  ModelInfo info;
  SealedFile library;  // the shared library to load: the whole .so, or the .pt2's compiled library
};

// Throws kFileNotFound, kNotAnArtifact (including "modified or corrupt" when the digest does not
// match), kIncompatible (another format version) or kLoadFailed (the file cannot be read).
VerifiedArtifact open_artifact(const std::string& path);

}  // namespace imagepiece::detail
