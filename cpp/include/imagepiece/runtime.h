// libimagepiece_runtime: run an ImagePiece artifact (scripts/aot_compile.py -> .so / .pt2).
//
// Contract
//  * Every failure throws imagepiece::Error, whose code() says which kind; nothing returns error values.
//  * Runtime is RAII and move-only: the constructor loads and checks the artifact, the destructor unloads it.
//  * run() is thread-safe: concurrent calls share the loaded model (CPU) or take turns over `instances`
//    model containers, each with its own CUDA stream (CUDA). info() may be read from any thread.
//  * Inputs are validated against the artifact's metadata before the model sees them: rank, [C, H, W],
//    batch range, dtype and contiguity must match exactly (non-contiguous input is refused, never copied
//    silently); a CPU tensor given to a CUDA runtime is staged through pinned memory.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace imagepiece {

enum class ErrorCode {
  kFileNotFound,   // the artifact path does not exist
  kNotAnArtifact,  // not a .so/.pt2 made by aot_compile.py, truncated, or corrupt metadata
  kIncompatible,   // made for another format version, torch, device type or GPU
  kLoadFailed,     // PyTorch's AOTI loader refused the library
  kInvalidOption,  // a RuntimeOptions value that cannot work
  kInvalidType,    // not a tensor (bindings)
  kInvalidShape,   // wrong rank or [C, H, W]
  kInvalidBatch,   // batch outside the artifact's range
  kInvalidDtype,
  kInvalidDevice,
  kNotContiguous,
  kInvalidOutput,  // the logits tensor given to run(images, logits) does not fit
  kRunFailed,      // the compiled model failed while running
};
const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// The artifact's metadata (scripts/aot_compile.py writes it; `metadata_json` holds all of it).
struct ModelInfo {
  std::string model_name, arch, method, dtype, device_type, cuda_capability, torch_version, created, checkpoint_sha256;
  std::vector<int64_t> input_shape;     // [C, H, W]
  int64_t num_classes = 0, batch_min = 0, batch_max = 0;
  bool dynamic_batch = false;
  std::vector<int64_t> tokens_per_block;  // tokens entering each block
  std::vector<double> mean, std;          // preprocessing (timm pretrained cfg)
  std::string interpolation;
  double crop_pct = 0.0;
  std::string metadata_json;
};

struct RuntimeOptions {
  std::string device;             // "" = the artifact's device ("cuda" means cuda:0); "cpu", "cuda", "cuda:N"
  int instances = 1;              // CUDA: model containers on their own streams, for concurrent run() calls
  bool cuda_graphs = false;       // CUDA: capture one graph per batch bucket at load, then replay
  std::vector<int64_t> batch_buckets;  // CUDA graphs: batch sizes to capture (default: the artifact's
                                       // batch, or powers of two up to its max); a batch runs in the
                                       // smallest bucket that fits, padded, and the result is sliced
};

class Runtime {
 public:
  explicit Runtime(const std::string& artifact, RuntimeOptions options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  at::Tensor run(const at::Tensor& images);                // allocates the [B, num_classes] logits
  void run(const at::Tensor& images, at::Tensor& logits);  // into caller memory: no allocation
  const ModelInfo& info() const;
  const RuntimeOptions& options() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace imagepiece
