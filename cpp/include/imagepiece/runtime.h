// libimagepiece_runtime: run an ImagePiece artifact (scripts/aot_compile.py -> .so / .pt2).
//
// Contract
//  * Every failure throws imagepiece::Error, whose code() says which kind; nothing returns error values.
//  * Runtime is RAII and move-only: the constructor loads and checks the artifact, the destructor releases it
//    (a Batcher shares it: the model stays until both are gone, and moving the Runtime is safe).
//  * Loading reads the file once into a sealed private copy, checks the sha256 digest its metadata records
//    over payload and metadata (kNotAnArtifact "modified or corrupt" on mismatch) and loads exactly those
//    bytes; the file may then be replaced or deleted. One copy of each distinct artifact's library stays
//    loaded for the life of the process (AOTInductor libraries cannot be unloaded) and is shared by later
//    loads of it, so reloading does not grow memory; but each live Runtime holds its own model container
//    with its own copy of the weights (share one Runtime, with `instances` for concurrency, not many).
//    The digest catches corruption and mix-ups, not forgery: an artifact is native code, load only ones
//    you trust.
//  * run() is thread-safe: concurrent calls take turns over `instances` model containers, which share the
//    weights (each has its own activations, and on CUDA its own stream): with instances = 1 they run one at
//    a time. info() may be read from any thread.
//  * Inputs are validated against the artifact's metadata before the model sees them: rank, per-image
//    shape ([C, H, W] normalised floats, or [H, W, C] uint8 pixels for an artifact whose input_format is
//    "uint8_nhwc"), batch range, dtype and contiguity must match exactly (non-contiguous input is refused,
//    never copied silently); a CPU tensor given to a CUDA runtime is staged through pinned memory. The compiled code
//    checks them again against what it was compiled for (AOTI_RUNTIME_CHECK_INPUTS, set unless already set).
//  * fork(): a CPU Runtime keeps working in the child, single-threaded (the parent's OpenMP pool does not
//    survive fork()); a CUDA Runtime throws kRunFailed there (CUDA cannot be used in a forked child).
//    Process-wide: once any Runtime was created, every child forked from the process starts with
//    at::set_num_threads(1), whether or not it uses a Runtime (a fork handler registered at the first load).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace imagepiece {
// Every public type lives in a versioned inline namespace, so its symbols are named imagepiece::abi_v1::...:
// bump it whenever a class layout or a signature here changes, and an app compiled against other
// headers then fails to start with an undefined symbol instead of running with the wrong layout
// (wheels carry no versioned soname that could say so). Code still writes imagepiece::Runtime.
inline namespace abi_v1 {

enum class ErrorCode {
  kFileNotFound,   // the artifact path does not exist or is not a regular file (a folder, /dev/null)
  kNotAnArtifact,  // not a .so/.pt2 made by aot_compile.py, truncated, or corrupt metadata
  kIncompatible,   // made for another format version, torch, device type, GPU, or a CPU with more instructions
  kLoadFailed,     // PyTorch's AOTI loader refused the library
  kInvalidOption,  // a call that cannot work as made: a RuntimeOptions or BatcherOptions value (or a Batcher
                   // whose worker threads cannot start), any method of a moved-from Runtime or Batcher
                   // (but Batcher::shutdown()), or Batcher::shutdown() from a completion callback
  kInvalidType,    // an argument of the wrong type (bindings: not a tensor, path or int)
  kInvalidShape,   // wrong rank or per-image shape
  kInvalidBatch,   // batch outside the artifact's range
  kInvalidDtype,
  kInvalidDevice,
  kNotContiguous,
  kInvalidOutput,  // the logits given to run(images, logits) do not fit or cannot be written
  kRunFailed,      // the compiled model failed while running
  kOverloaded,     // Batcher: its queue is full; retry later
  kCancelled,      // Batcher: shut down before the request ran, or no longer taking requests
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
  std::string model_name, arch, method, device_type, cuda_capability, torch_version, created, checkpoint_sha256;
  std::string dtype;                    // of the images it takes: fp32, fp16, bf16, or uint8
  std::string precision;                // what it computes in and returns logits in: fp32, fp16, bf16 (int8: fp32 logits)
  std::string input_format;             // "float_nchw" (normalised [B, C, H, W]) or "uint8_nhwc" (RGB pixels [B, H, W, C])
  std::string cpu_capability;           // CPU artifacts: ATen's ISA level the kernels need (AVX512, AVX2, DEFAULT)
  std::vector<std::string> cpu_features;  // CPU artifacts: every x86 extension they may use (cpuinfo names)
  std::string artifact_sha256;          // the verified digest of the artifact
  std::vector<int64_t> input_shape;     // one image, [C, H, W], whatever the input_format
  int64_t num_classes = 0, batch_min = 0, batch_max = 0;
  bool dynamic_batch = false;
  std::vector<int64_t> tokens_per_block;  // tokens entering each block
  std::vector<double> mean, std;          // preprocessing (timm pretrained cfg)
  std::string interpolation;
  double crop_pct = 0.0;
  std::string metadata_json;
};

struct RuntimeOptions {
  std::string device{};           // "" = the artifact's device ("cuda" means cuda:0); "cpu", "cuda", "cuda:N"
  int instances = 1;              // model containers for concurrent run() calls (sharing the weights; on CUDA each
                                  // on its own stream); a Batcher runs one worker per instance
  bool cuda_graphs = false;       // CUDA: capture one graph per batch bucket at load, then replay
  std::vector<int64_t> batch_buckets{};  // CUDA graphs: batch sizes to capture (default: the artifact's
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
  // Into caller memory (e.g. a reused or pinned buffer). With CUDA graphs and CUDA images nothing is allocated
  // (CPU images are staged through a pinned buffer and a device copy);
  // otherwise the compiled model allocates its output, which is copied into `logits` (AOTInductor
  // takes no output buffers).
  void run(const at::Tensor& images, at::Tensor& logits);
  // Checks one image, a row of a batch, as run() checks each row (shape, dtype, device; batch range
  // and contiguity aside: a Batcher copies rows into its batch). Throws the Error run() would.
  void check_sample(const at::Tensor& image) const;
  const ModelInfo& info() const;
  const RuntimeOptions& options() const;  // as in effect: device resolved ("cpu", "cuda:N")
  const std::string& artifact() const;    // the path it was loaded from, as given

 private:
  struct Impl;
  friend class Batcher;
  explicit Runtime(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  Runtime share() const;  // another handle on this model (a Batcher's), unaffected by moving this one
  Impl& impl() const;  // a moved-from Runtime: every method throws kInvalidOption
  std::shared_ptr<Impl> impl_;
};

}  // inline namespace abi_v1
}  // namespace imagepiece
