#include "imagepiece/runtime.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <sstream>

#include "artifact_file.h"
#include "error_text.h"
#include "library_copies.h"
#include "metadata.h"
#include "process_setup.h"

#ifdef IMAGEPIECE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cuda.h>
#endif

namespace imagepiece {
inline namespace abi_v1 {

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
    case ErrorCode::kOverloaded: return "overloaded";
    case ErrorCode::kCancelled: return "cancelled";
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
      {"fp32", at::kFloat}, {"fp16", at::kHalf}, {"bf16", at::kBFloat16}, {"uint8", at::kByte}};
  auto found = kTypes.find(dtype);
  if (found == kTypes.end()) throw Error(ErrorCode::kNotAnArtifact, "artifact metadata names an unknown dtype '" + dtype + "'");
  return found->second;
}

c10::Device resolve_device(const RuntimeOptions& options, const ModelInfo& info) {
  const std::string name = options.device.empty() ? info.device_type : options.device;
  c10::Device device{c10::kCPU};
  try {
    device = c10::Device(name);
  } catch (const std::exception&) {
    throw Error(ErrorCode::kInvalidOption, "device '" + name + "' is not a device (use cpu, cuda or cuda:N)");
  }
  if (!device.is_cpu() && !device.is_cuda()) {
    throw Error(ErrorCode::kInvalidOption, "device '" + name + "' is not supported: the runtime runs on cpu or cuda[:N]");
  }
  if (device.is_cuda() && !device.has_index()) device.set_index(0);
#ifdef IMAGEPIECE_WITH_CUDA
  if (device.is_cuda()) {
    // Past the last GPU, getDeviceProperties fails with an internal assert. With no GPU at all,
    // check_compatible says so ("no CUDA device is available"), which is the more useful answer.
    const int64_t gpus = at::cuda::device_count();
    if (gpus > 0 && device.index() >= gpus) {
      throw Error(ErrorCode::kInvalidOption, "device '" + name + "' does not exist: this machine has " + std::to_string(gpus) +
                                                 (gpus == 1 ? " GPU (cuda:0)" : " GPUs (cuda:0..cuda:" + std::to_string(gpus - 1) + ")"));
    }
  }
#endif
  if (device.is_cpu() && device.has_index()) {
    // CPU tensors carry no index, so "cpu:0" is plain "cpu" (else every input would be "on the wrong device");
    // any other index names nothing.
    if (device.index() != 0) throw Error(ErrorCode::kInvalidOption, "device '" + name + "' does not exist: there is one CPU device, 'cpu'");
    device = c10::Device(c10::kCPU);
  }
  return device;
}

// AOTI model containers in the verified private copy of an artifact's library (`library_path`; the
// artifact's own path only names it in messages). A .pt2's library is loaded the same way: PyTorch's
// package loader would unpack it to a new temporary path per load, which glibc never unloads.
struct ModelRunner {
  std::unique_ptr<torch::inductor::AOTIModelContainerRunner> library;

  ModelRunner(const std::string& library_path, const std::string& artifact, const c10::Device& device, size_t containers,
              bool single_threaded) {
    try {
      if (device.is_cuda()) {
#ifdef IMAGEPIECE_WITH_CUDA
        library = std::make_unique<torch::inductor::AOTIModelContainerRunnerCuda>(library_path, containers, device.str(), "", single_threaded);
#endif
      } else {
        library = std::make_unique<torch::inductor::AOTIModelContainerRunnerCpu>(library_path, containers, single_threaded);
      }
    } catch (const std::exception& error) {
      throw Error(ErrorCode::kLoadFailed, "could not load '" + artifact + "': " + detail::error_text(error));
    }
  }

  // The logits, which must be [batch, num_classes] as the metadata promises.
  at::Tensor run(const at::Tensor& images, int64_t num_classes, void* stream = nullptr) {
    at::Tensor logits;
    try {
      logits = library->run({images}, stream).at(0);
    } catch (const std::exception& error) {
      throw Error(ErrorCode::kRunFailed, "the compiled model failed: " + detail::error_text(error));
    }
    if (logits.dim() != 2 || logits.size(0) != images.size(0) || logits.size(1) != num_classes) {
      throw Error(ErrorCode::kRunFailed, "the compiled model returned " + shape_string(logits.sizes()) + " but its metadata promises " +
                                             shape_string({images.size(0), num_classes}));
    }
    return logits;
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
  at::ScalarType dtype = at::kFloat;         // of the images
  at::ScalarType logits_dtype = at::kFloat;  // what the model computes in
  std::vector<int64_t> image_dims;           // one image as the artifact takes it ([C, H, W] or [H, W, C])
  uint64_t fork_generation = 0;
  // Declared before every runner, so destroyed after them: the lease outlives the library's users.
  std::unique_ptr<detail::LibraryLease> library;
  std::unique_ptr<ModelRunner> shared_runner;  // every CPU call, and CUDA calls without graphs

#ifdef IMAGEPIECE_WITH_CUDA
  std::vector<std::unique_ptr<CudaSlot>> slots;
  std::vector<size_t> free_slots;
  std::mutex slot_mutex;
  std::condition_variable slot_released;
#endif

  Impl(std::string artifact, RuntimeOptions opts) : path(std::move(artifact)), options(std::move(opts)) {
    detail::prepare_process();
    detail::InFlight loading;
    fork_generation = detail::fork_generation();
    detail::VerifiedArtifact verified = detail::open_artifact(path);
    info = std::move(verified.info);
    dtype = scalar_type_of(info.dtype);
    logits_dtype = scalar_type_of(detail::compute_dtype(info.precision));
    image_dims = detail::image_dims(info);
    device = resolve_device(options, info);
    options.device = device.str();  // options() reports what is in effect: "" -> the artifact's, "cuda" -> "cuda:0"
    check_options();
    detail::check_compatible(info, device);
    library = detail::lease_library(info.artifact_sha256, std::move(verified.library));
    if (device.is_cuda()) {
      start_cuda();
    } else {
      shared_runner = runner(static_cast<size_t>(options.instances), false);
    }
  }

  std::unique_ptr<ModelRunner> runner(size_t containers, bool single_threaded) const {
    return std::make_unique<ModelRunner>(library->path(), path, device, containers, single_threaded);
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

  // `whole_batch` = false: one row of a batch, unsqueezed (check_sample), whose batch and layout do not matter.
  void check_images(const at::Tensor& images, bool whole_batch = true) const {
    // Messages are built only on failure: this runs on every call.
    const auto& shape = image_dims;
    const bool pixels = info.input_format == "uint8_nhwc";
    auto expected = [&] {
      return "[B, " + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + ", " + std::to_string(shape[2]) + "]" +
             (pixels ? " uint8 RGB pixels (the artifact normalises them)" : "");
    };
    if (!images.defined()) throw Error(ErrorCode::kInvalidShape, "images is an undefined tensor");
    check_layout(images);
    if (images.dim() != 4) {
      throw Error(ErrorCode::kInvalidShape, "images must be 4-D " + expected() + ", got " + std::to_string(images.dim()) + "-D " + shape_string(images.sizes()));
    }
    if (images.size(1) != shape[0] || images.size(2) != shape[1] || images.size(3) != shape[2]) {
      throw Error(ErrorCode::kInvalidShape, "images must be " + expected() + ", got " + shape_string(images.sizes()));
    }
    const int64_t batch = images.size(0);
    if (whole_batch && (batch < info.batch_min || batch > info.batch_max)) {
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
    if (whole_batch && !images.is_contiguous()) {
      throw Error(ErrorCode::kNotContiguous, std::string("images must be contiguous (") + (pixels ? "NHWC" : "NCHW") + "); call .contiguous() first");
    }
    check_memory(images, ErrorCode::kInvalidType, "images");
  }

  // A tensor whose storage was shrunk (untyped_storage().resize_()) or never allocated (a fake tensor) passes every
  // check of sizes and strides; the model would then read (or write) past its memory, or at address 0.
  static void check_memory(const at::Tensor& tensor, ErrorCode code, const char* what) {
    if (tensor.numel() == 0) return;
    if (!tensor.has_storage() || tensor.storage().data() == nullptr) {
      throw Error(code, std::string(what) + " have no memory behind them (a fake tensor, or one whose storage was freed)");
    }
    int64_t last = tensor.storage_offset();  // the element furthest into the storage
    for (int64_t d = 0; d < tensor.dim(); ++d) last += (tensor.size(d) - 1) * tensor.stride(d);
    const auto needed = static_cast<uint64_t>(last + 1) * static_cast<uint64_t>(tensor.element_size());
    if (needed > tensor.storage().nbytes()) {
      throw Error(code, std::string(what) + " reach past their storage (" + std::to_string(needed) + " bytes needed, " +
                            std::to_string(tensor.storage().nbytes()) + " allocated): was it resized?");
    }
  }

  // Sparse, mkldnn or other non-strided tensors would pass the shape checks and then fail inside the
  // copy into a batch (or the model), taking the other requests of that batch with them.
  static void check_layout(const at::Tensor& images) {
    if (images.is_nested()) throw Error(ErrorCode::kInvalidType, "images must be a dense (strided) tensor, got a nested tensor");
    if (images.layout() != at::kStrided) {
      std::ostringstream layout;
      layout << images.layout();
      throw Error(ErrorCode::kInvalidType, "images must be a dense (strided) tensor, got layout " + layout.str() + "; call .to_dense() first");
    }
    // A lazily negated view (torch._neg_view, the .imag of a conjugate) stores -x: the compiled code reads the memory.
    if (images.is_neg()) throw Error(ErrorCode::kInvalidType, "images are a lazily negated view; call .resolve_neg() first");
  }

  void check_logits(const at::Tensor& images, const at::Tensor& logits) const {
    if (logits.defined() && logits.layout() != at::kStrided) throw Error(ErrorCode::kInvalidOutput, "logits must be a dense (strided) tensor");
    if (!logits.defined() || logits.dim() != 2 || logits.size(0) != images.size(0) || logits.size(1) != info.num_classes) {
      throw Error(ErrorCode::kInvalidOutput, "logits must be " + shape_string({images.size(0), info.num_classes}) + ", got " +
                                                 (logits.defined() ? shape_string(logits.sizes()) : std::string("an undefined tensor")));
    }
    if (logits.scalar_type() != logits_dtype && logits.scalar_type() != at::kFloat) {
      const std::string allowed = logits_dtype == at::kFloat ? "Float" : std::string(c10::toString(logits_dtype)) + " or Float";
      throw Error(ErrorCode::kInvalidOutput, "logits must be " + allowed + ", got " + c10::toString(logits.scalar_type()));
    }
    if (logits.device() != device && !logits.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidOutput, "logits are on " + logits.device().str() + ", expected " + (device.is_cpu() ? "cpu" : device.str() + " or cpu"));
    }
    if (!logits.is_contiguous()) throw Error(ErrorCode::kInvalidOutput, "logits must be contiguous");
    if (logits.requires_grad()) throw Error(ErrorCode::kInvalidOutput, "logits must not require grad (pass a tensor without requires_grad, or .detach())");
    if (logits.is_neg()) throw Error(ErrorCode::kInvalidOutput, "logits must not be a lazily negated view");
    check_memory(logits, ErrorCode::kInvalidOutput, "logits");
  }

  void check_process() const {
    if (device.is_cuda() && detail::fork_generation() != fork_generation) {
      throw Error(ErrorCode::kRunFailed, "this CUDA Runtime was created before fork(): CUDA cannot be used in a forked child; "
                                         "create Runtimes in the child, or start workers with 'spawn' or 'forkserver'");
    }
  }

  // ATen calls a tensor contiguous whatever the stride of a size-1 dimension, and .contiguous() keeps it;
  // AOTInductor compares every stride. Such a stride never moves an address, so a view with the
  // textbook strides reads the same memory. Runs on every call: DimVector keeps the strides inline
  // (no allocation), and the view is made only for the rare tensor that needs it.
  static at::Tensor with_exact_strides(const at::Tensor& images) {
    at::DimVector strides(images.dim());
    bool exact = true;
    int64_t textbook = 1;  // the stride of dimension d in a freshly allocated tensor
    for (int64_t d = images.dim() - 1; d >= 0; --d) {
      strides[d] = textbook;
      exact = exact && images.stride(d) == textbook;
      textbook *= std::max<int64_t>(images.size(d), 1);
    }
    return exact ? images : images.as_strided(images.sizes(), strides);
  }

  at::Tensor run(const at::Tensor& batch) {
    check_images(batch);
    const at::Tensor images = with_exact_strides(batch);
    detail::InFlight running;
    check_process();
    if (device.is_cpu()) return shared_runner->run(images, info.num_classes);
    auto logits = at::empty({images.size(0), info.num_classes}, images.options().dtype(logits_dtype).device(device));
    run_cuda(images, logits);
    return logits;
  }

  void run(const at::Tensor& batch, at::Tensor& logits) {
    check_images(batch);
    check_logits(batch, logits);
    const at::Tensor images = with_exact_strides(batch);
    detail::InFlight running;
    check_process();
    if (device.is_cpu()) {
      at::Tensor output = shared_runner->run(images, info.num_classes);
      c10::InferenceMode no_autograd;  // logits may be an inference tensor made in torch.inference_mode()
      logits.copy_(output);
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
    if (!options.cuda_graphs) shared_runner = runner(count, false);
    for (size_t i = 0; i < count; ++i) {
      auto slot = std::make_unique<CudaSlot>(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
      // Capture needs a runner that never synchronises across its own containers: one per slot.
      if (options.cuda_graphs) {
        slot->own_runner = runner(1, /*single_threaded=*/true);
        for (int64_t bucket : graph_buckets()) capture(*slot, bucket);
      }
      slots.push_back(std::move(slot));
      free_slots.push_back(i);
    }
  }

  void capture(CudaSlot& slot, int64_t batch) {
    auto graph = std::make_unique<CudaSlot::Graph>();
    const auto& shape = image_dims;
    graph->input = at::zeros({batch, shape[0], shape[1], shape[2]}, at::TensorOptions().dtype(dtype).device(device));
    c10::cuda::CUDAStreamGuard stream_guard(slot.stream);
    void* stream = slot.stream.stream();
    for (int warmup = 0; warmup < 2; ++warmup) slot.own_runner->run(graph->input, info.num_classes, stream);  // lazy init off-graph
    slot.stream.synchronize();
    // Thread-local capture: another thread's run() (or any allocation) meanwhile is not part of this capture and
    // must not invalidate it; the process-global mode would make their CUDA calls fail while a Runtime loads.
    bool capturing = false;
    try {
      graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      capturing = true;
      graph->output = slot.own_runner->run(graph->input, info.num_classes, stream);
      capturing = false;
      graph->graph.capture_end();
    } catch (const std::exception& error) {
      if (capturing) {
        try {
          graph->graph.capture_end();  // ends the stream's capture: the pool stream is shared with the rest of the process
        } catch (const std::exception&) {
        }
      }
      throw Error(ErrorCode::kLoadFailed, "CUDA graph capture failed for batch " + std::to_string(batch) + ": " + detail::error_text(error));
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
    c10::InferenceMode no_autograd;  // logits may be an inference tensor made in torch.inference_mode()
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
        auto output = shared_runner->run(input, info.num_classes, slot.stream.stream());
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

namespace {

// Every failure leaves as an Error: anything else escaping the layers below (c10::Error, bad_alloc,
// filesystem errors) is wrapped with the code of the step that failed.
template <typename Step>
auto as_error(ErrorCode code, const char* doing, Step&& step) {
  try {
    return step();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& error) {
    throw Error(code, std::string(doing) + ": " + detail::error_text(error));
  }
}

}  // namespace

Runtime::Runtime(const std::string& artifact, RuntimeOptions options)
    : impl_(as_error(ErrorCode::kLoadFailed, ("could not load '" + artifact + "'").c_str(),
                     [&] { return std::make_shared<Impl>(artifact, std::move(options)); })) {}
Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

Runtime Runtime::share() const {
  impl();  // a moved-from Runtime has nothing to share: kInvalidOption
  return Runtime(impl_);
}

Runtime::Impl& Runtime::impl() const {
  if (!impl_) throw Error(ErrorCode::kInvalidOption, "this Runtime was moved from: use the Runtime it was moved to");
  return *impl_;
}

at::Tensor Runtime::run(const at::Tensor& images) {
  return as_error(ErrorCode::kRunFailed, "run failed", [&] { return impl().run(images); });
}
void Runtime::run(const at::Tensor& images, at::Tensor& logits) {
  as_error(ErrorCode::kRunFailed, "run failed", [&] { impl().run(images, logits); });
}
void Runtime::check_sample(const at::Tensor& image) const {
  // run()'s own rules on a batch of one: whatever input format the artifact takes.
  const Impl& runtime = impl();
  if (!image.defined()) throw Error(ErrorCode::kInvalidShape, "image is an undefined tensor");
  Impl::check_layout(image);  // before unsqueeze, which mkldnn tensors do not support
  if (image.dim() != 3) {  // checked here, not after unsqueeze: a whole batch would read as "got 5-D"
    throw Error(ErrorCode::kInvalidShape, "expected one 3-D image, got " + std::to_string(image.dim()) + "-D " + shape_string(image.sizes()) +
                                              (image.dim() == 4 ? " (submit one image, not a batch)" : ""));
  }
  try {
    runtime.check_images(image.unsqueeze(0), /*whole_batch=*/false);
  } catch (const Error& error) {
    throw Error(error.code(), "image " + shape_string(image.sizes()) + " is not a row of a batch this artifact takes: " + error.what());
  }
}
const ModelInfo& Runtime::info() const { return impl().info; }
const RuntimeOptions& Runtime::options() const { return impl().options; }
const std::string& Runtime::artifact() const { return impl().path; }

}  // inline namespace abi_v1
}  // namespace imagepiece
