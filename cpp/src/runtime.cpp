#include "imagepiece/runtime.h"

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <algorithm>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <sstream>

#include "metadata.h"

#ifdef IMAGEPIECE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cuda.h>
#endif

namespace imagepiece {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kFileNotFound: return "file_not_found";
    case ErrorCode::kNotAnArtifact: return "not_an_artifact";
    case ErrorCode::kIncompatible: return "incompatible";
    case ErrorCode::kLoadFailed: return "load_failed";
    case ErrorCode::kInvalidOption: return "invalid_option";
    case ErrorCode::kInvalidType: return "invalid_type";
    case ErrorCode::kInvalidShape: return "invalid_shape";
    case ErrorCode::kInvalidBatch: return "invalid_batch";
    case ErrorCode::kInvalidDtype: return "invalid_dtype";
    case ErrorCode::kInvalidDevice: return "invalid_device";
    case ErrorCode::kNotContiguous: return "not_contiguous";
    case ErrorCode::kInvalidOutput: return "invalid_output";
    case ErrorCode::kRunFailed: return "run_failed";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}

at::ScalarType scalar_type_of(const std::string& dtype) {
  static const std::map<std::string, at::ScalarType> kTypes = {
      {"fp32", at::kFloat}, {"fp16", at::kHalf}, {"bf16", at::kBFloat16}};
  auto found = kTypes.find(dtype);
  if (found == kTypes.end()) throw Error(ErrorCode::kNotAnArtifact, "artifact metadata names an unknown dtype '" + dtype + "'");
  return found->second;
}

c10::Device resolve_device(const RuntimeOptions& options, const ModelInfo& info) {
  const std::string name = options.device.empty() ? info.device_type : options.device;
  try {
    c10::Device device(name);
    if (device.is_cuda() && !device.has_index()) device.set_index(0);
    return device;
  } catch (const std::exception&) {
    throw Error(ErrorCode::kInvalidOption, "device '" + name + "' is not a device (use cpu, cuda or cuda:N)");
  }
}

// One AOTI model container, from a .so (runner) or a .pt2 (package loader that owns its runner).
struct ModelRunner {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::unique_ptr<torch::inductor::AOTIModelContainerRunner> library;

  ModelRunner(const std::string& path, const c10::Device& device, size_t containers, bool single_threaded) {
    try {
      if (std::filesystem::path(path).extension() == ".pt2") {
        package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", single_threaded, containers,
                                                                            device.is_cuda() ? device.index() : -1);
      } else if (device.is_cuda()) {
#ifdef IMAGEPIECE_WITH_CUDA
        library = std::make_unique<torch::inductor::AOTIModelContainerRunnerCuda>(path, containers, device.str(), "", single_threaded);
#endif
      } else {
        library = std::make_unique<torch::inductor::AOTIModelContainerRunnerCpu>(path, containers, single_threaded);
      }
    } catch (const std::exception& error) {
      throw Error(ErrorCode::kLoadFailed, "could not load '" + path + "': " + error.what());
    }
  }

  at::Tensor run(const at::Tensor& images, void* stream = nullptr) {
    try {
      auto outputs = package ? package->run({images}, stream) : library->run({images}, stream);
      return outputs.at(0);
    } catch (const std::exception& error) {
      throw Error(ErrorCode::kRunFailed, std::string("the compiled model failed: ") + error.what());
    }
  }
};

}  // namespace

#ifdef IMAGEPIECE_WITH_CUDA
// What one concurrent CUDA caller holds: a stream, pinned staging for host inputs, and (with CUDA
// graphs) its own single-threaded runner with one captured graph per batch bucket.
struct CudaSlot {
  struct Graph {
    at::cuda::CUDAGraph graph;
    at::Tensor input, output;
  };
  c10::cuda::CUDAStream stream;
  at::Tensor pinned;
  at::cuda::CUDAEvent pinned_read;  // the last copy out of `pinned` finished: safe to overwrite
  // Reused every call (creating CUDA events per call costs more than recording them).
  at::cuda::CUDAEvent input_ready, output_ready;
  std::unique_ptr<ModelRunner> own_runner;
  std::map<int64_t, std::unique_ptr<Graph>> graphs;  // bucket batch -> graph
  explicit CudaSlot(c10::cuda::CUDAStream s) : stream(s) {}
};
#endif

struct Runtime::Impl {
  std::string path;
  RuntimeOptions options;
  ModelInfo info;
  c10::Device device{c10::kCPU};
  at::ScalarType dtype = at::kFloat;
  std::unique_ptr<ModelRunner> shared_runner;  // every CPU call, and CUDA calls without graphs

#ifdef IMAGEPIECE_WITH_CUDA
  std::vector<std::unique_ptr<CudaSlot>> slots;
  std::vector<size_t> free_slots;
  std::mutex slot_mutex;
  std::condition_variable slot_released;
#endif

  Impl(std::string artifact, RuntimeOptions opts) : path(std::move(artifact)), options(std::move(opts)) {
    info = detail::read_model_info(path);
    dtype = scalar_type_of(info.dtype);
    device = resolve_device(options, info);
    check_options();
    detail::check_compatible(info, device);
    if (device.is_cuda()) {
      start_cuda();
    } else {
      shared_runner = std::make_unique<ModelRunner>(path, device, static_cast<size_t>(options.instances), false);
    }
  }

  void check_options() {
    if (options.instances < 1 || options.instances > 64) {
      throw Error(ErrorCode::kInvalidOption, "instances must be in [1, 64], got " + std::to_string(options.instances));
    }
    if (options.cuda_graphs && !device.is_cuda()) throw Error(ErrorCode::kInvalidOption, "cuda_graphs needs a CUDA device, not " + device.str());
    for (int64_t bucket : options.batch_buckets) {
      if (bucket < info.batch_min || bucket > info.batch_max) {
        throw Error(ErrorCode::kInvalidOption, "batch bucket " + std::to_string(bucket) + " is outside the artifact's batch range " +
                                                   std::to_string(info.batch_min) + ".." + std::to_string(info.batch_max));
      }
    }
    if (!options.batch_buckets.empty() && !options.cuda_graphs) {
      throw Error(ErrorCode::kInvalidOption, "batch_buckets only apply with cuda_graphs");
    }
  }

  void check_images(const at::Tensor& images) const {
    // Messages are built only on failure: this runs on every call.
    const auto& shape = info.input_shape;
    auto expected = [&] { return "[B, " + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + ", " + std::to_string(shape[2]) + "]"; };
    if (!images.defined()) throw Error(ErrorCode::kInvalidShape, "images is an undefined tensor");
    if (images.dim() != 4) {
      throw Error(ErrorCode::kInvalidShape, "images must be 4-D " + expected() + ", got " + std::to_string(images.dim()) + "-D " + shape_string(images.sizes()));
    }
    if (images.size(1) != shape[0] || images.size(2) != shape[1] || images.size(3) != shape[2]) {
      throw Error(ErrorCode::kInvalidShape, "images must be " + expected() + ", got " + shape_string(images.sizes()));
    }
    const int64_t batch = images.size(0);
    if (batch < info.batch_min || batch > info.batch_max) {
      const std::string allowed = info.batch_min == info.batch_max ? "exactly " + std::to_string(info.batch_min)
                                                                   : std::to_string(info.batch_min) + ".." + std::to_string(info.batch_max);
      throw Error(ErrorCode::kInvalidBatch, "batch " + std::to_string(batch) + " is outside the artifact's batch range (" + allowed + ")");
    }
    if (images.scalar_type() != dtype) {
      throw Error(ErrorCode::kInvalidDtype, std::string("images must be ") + c10::toString(dtype) + " (" + info.dtype + "), got " + c10::toString(images.scalar_type()));
    }
    const bool staged = device.is_cuda() && images.device().is_cpu();  // host input: copied via pinned memory
    if (images.device() != device && !staged) {
      throw Error(ErrorCode::kInvalidDevice, "images are on " + images.device().str() + ", the runtime runs on " + device.str());
    }
    if (!images.is_contiguous()) throw Error(ErrorCode::kNotContiguous, "images must be contiguous (NCHW); call .contiguous() first");
  }

  void check_logits(const at::Tensor& images, const at::Tensor& logits) const {
    if (!logits.defined() || logits.dim() != 2 || logits.size(0) != images.size(0) || logits.size(1) != info.num_classes) {
      throw Error(ErrorCode::kInvalidOutput, "logits must be " + shape_string({images.size(0), info.num_classes}) + ", got " +
                                                 (logits.defined() ? shape_string(logits.sizes()) : std::string("an undefined tensor")));
    }
    if (logits.scalar_type() != dtype && logits.scalar_type() != at::kFloat) {
      throw Error(ErrorCode::kInvalidOutput, std::string("logits must be ") + c10::toString(dtype) + " or Float, got " + c10::toString(logits.scalar_type()));
    }
    if (logits.device() != device && !logits.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidOutput, "logits are on " + logits.device().str() + ", expected " + device.str() + " or cpu");
    }
    if (!logits.is_contiguous()) throw Error(ErrorCode::kInvalidOutput, "logits must be contiguous");
  }

  at::Tensor run(const at::Tensor& images) {
    check_images(images);
    if (device.is_cpu()) return shared_runner->run(images);
    auto logits = at::empty({images.size(0), info.num_classes}, images.options().dtype(dtype).device(device));
    run_cuda(images, logits);
    return logits;
  }

  void run(const at::Tensor& images, at::Tensor& logits) {
    check_images(images);
    check_logits(images, logits);
    if (device.is_cpu()) {
      logits.copy_(shared_runner->run(images));
    } else {
      run_cuda(images, logits);
    }
  }

#ifdef IMAGEPIECE_WITH_CUDA
  std::vector<int64_t> graph_buckets() const {
    if (!options.batch_buckets.empty()) {
      auto buckets = options.batch_buckets;
      std::sort(buckets.begin(), buckets.end());
      buckets.erase(std::unique(buckets.begin(), buckets.end()), buckets.end());
      return buckets;
    }
    if (!info.dynamic_batch) return {info.batch_max};
    std::vector<int64_t> buckets;
    for (int64_t b = 1; b < info.batch_max; b *= 2) buckets.push_back(b);
    buckets.push_back(info.batch_max);
    return buckets;
  }

  void start_cuda() {
    c10::cuda::CUDAGuard guard(device.index());
    const auto count = static_cast<size_t>(options.instances);
    if (!options.cuda_graphs) shared_runner = std::make_unique<ModelRunner>(path, device, count, false);
    for (size_t i = 0; i < count; ++i) {
      auto slot = std::make_unique<CudaSlot>(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
      // Capture needs a runner that never synchronises across its own containers: one per slot.
      if (options.cuda_graphs) {
        slot->own_runner = std::make_unique<ModelRunner>(path, device, 1, /*single_threaded=*/true);
        for (int64_t bucket : graph_buckets()) capture(*slot, bucket);
      }
      slots.push_back(std::move(slot));
      free_slots.push_back(i);
    }
  }

  void capture(CudaSlot& slot, int64_t batch) {
    auto graph = std::make_unique<CudaSlot::Graph>();
    const auto& shape = info.input_shape;
    graph->input = at::zeros({batch, shape[0], shape[1], shape[2]}, at::TensorOptions().dtype(dtype).device(device));
    c10::cuda::CUDAStreamGuard stream_guard(slot.stream);
    void* stream = slot.stream.stream();
    for (int warmup = 0; warmup < 2; ++warmup) slot.own_runner->run(graph->input, stream);  // lazy init off-graph
    slot.stream.synchronize();
    try {
      graph->graph.capture_begin();
      graph->output = slot.own_runner->run(graph->input, stream);
      graph->graph.capture_end();
    } catch (const std::exception& error) {
      throw Error(ErrorCode::kLoadFailed, "CUDA graph capture failed for batch " + std::to_string(batch) + ": " + error.what());
    }
    slot.graphs[batch] = std::move(graph);
  }

  size_t acquire_slot() {
    std::unique_lock<std::mutex> lock(slot_mutex);
    slot_released.wait(lock, [&] { return !free_slots.empty(); });
    size_t index = free_slots.back();
    free_slots.pop_back();
    return index;
  }

  void release_slot(size_t index) {
    {
      std::lock_guard<std::mutex> lock(slot_mutex);
      free_slots.push_back(index);
    }
    slot_released.notify_one();
  }

  // Input ready on the slot's stream: device tensors wait for the caller's stream; host tensors go
  // through pinned memory so the copy is asynchronous.
  at::Tensor stage_input(CudaSlot& slot, const at::Tensor& images, const c10::cuda::CUDAStream& caller) {
    if (images.is_cuda()) {
      slot.input_ready.record(caller);
      slot.input_ready.block(slot.stream);
      return images;
    }
    if (!slot.pinned.defined() || slot.pinned.numel() < images.numel()) {
      slot.pinned = at::empty({images.numel()}, images.options().pinned_memory(true));
    }
    slot.pinned_read.synchronize();
    auto host = slot.pinned.narrow(0, 0, images.numel()).view(images.sizes());
    host.copy_(images);
    auto on_device = host.to(device, /*non_blocking=*/true);
    slot.pinned_read.record(slot.stream);
    return on_device;
  }

  void run_cuda(const at::Tensor& images, at::Tensor& logits) {
    c10::cuda::CUDAGuard guard(device.index());
    const auto caller = c10::cuda::getCurrentCUDAStream(device.index());
    const size_t index = acquire_slot();
    CudaSlot& slot = *slots[index];
    try {
      c10::cuda::CUDAStreamGuard stream_guard(slot.stream);
      at::Tensor input = stage_input(slot, images, caller);
      const int64_t batch = images.size(0);
      if (options.cuda_graphs) {
        auto bucket = slot.graphs.lower_bound(batch);
        if (bucket == slot.graphs.end()) {
          throw Error(ErrorCode::kInvalidBatch, "batch " + std::to_string(batch) + " is larger than the largest CUDA graph bucket");
        }
        auto& graph = *bucket->second;
        graph.input.narrow(0, 0, batch).copy_(input, /*non_blocking=*/true);  // rows past `batch` keep stale data: samples are independent
        graph.graph.replay();
        logits.copy_(graph.output.narrow(0, 0, batch), /*non_blocking=*/true);
      } else {
        auto output = shared_runner->run(input, slot.stream.stream());
        logits.copy_(output, /*non_blocking=*/true);
        c10::cuda::CUDACachingAllocator::recordStream(output.storage().data_ptr(), slot.stream);
      }
      if (logits.is_cpu()) {
        slot.stream.synchronize();
      } else {
        slot.output_ready.record(slot.stream);
        slot.output_ready.block(caller);
        if (images.is_cuda()) c10::cuda::CUDACachingAllocator::recordStream(images.storage().data_ptr(), slot.stream);
      }
    } catch (...) {
      release_slot(index);
      throw;
    }
    release_slot(index);
  }
#else
  void start_cuda() { throw Error(ErrorCode::kIncompatible, "this runtime was built without CUDA support"); }
  void run_cuda(const at::Tensor&, at::Tensor&) { throw Error(ErrorCode::kIncompatible, "this runtime was built without CUDA support"); }
#endif
};

Runtime::Runtime(const std::string& artifact, RuntimeOptions options) : impl_(std::make_unique<Impl>(artifact, std::move(options))) {}
Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

at::Tensor Runtime::run(const at::Tensor& images) { return impl_->run(images); }
void Runtime::run(const at::Tensor& images, at::Tensor& logits) { impl_->run(images, logits); }
const ModelInfo& Runtime::info() const { return impl_->info; }
const RuntimeOptions& Runtime::options() const { return impl_->options; }

}  // namespace imagepiece
