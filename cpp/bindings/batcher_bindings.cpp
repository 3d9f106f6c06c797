// ip_runtime.Batcher: imagepiece::Batcher for Python.
//
// submit() returns a concurrent.futures.Future (asyncio: `await asyncio.wrap_future(future)`), completed
// by the worker thread, which takes the GIL once per batch to set the batch's futures. Nothing else the worker touches belongs to
// Python: every image is copied at submit into a tensor of its own (no Python object to release; a numpy
// view would need the GIL to let go of its array). Copied, unlike the C++ API's: a Python caller that decodes
// into one reused buffer got another image's logits back, silently (its batch is assembled later).
// The Batcher keeps its Runtime alive; close() (also at interpreter exit, and the context manager's
// exit) and destruction release the GIL while they wait for the workers, which need it.
#include "batcher_bindings.h"

#include <cmath>
#include <map>
#include <set>

#include "conversions.h"
#include "imagepiece/batcher.h"

namespace py = pybind11;
using imagepiece::Batcher;
using imagepiece::BatcherOptions;
using imagepiece::Error;
using imagepiece::ErrorCode;
using imagepiece::Runtime;
using namespace imagepiece::python;

namespace {

int64_t delay_us_argument(const py::handle& object) {
  constexpr double kMaxMs = BatcherOptions::kMaxDelayUs / 1000.0;
  if (py::isinstance<py::bool_>(object) || !(py::isinstance<py::int_>(object) || py::isinstance<py::float_>(object) ||
                                            py::hasattr(object, "__float__"))) {
    wrong_type("max_delay_ms", "a number of milliseconds", object);
  }
  double ms = 0;
  try {
    ms = py::float_(py::reinterpret_borrow<py::object>(object)).cast<double>();
  } catch (const py::error_already_set& failure) {  // an array of several numbers, an int past the float range, ...
    if (failure.matches(PyExc_OverflowError)) {
      throw Error(ErrorCode::kInvalidOption,
                  "max_delay_ms must be in [0, " + std::to_string(static_cast<int64_t>(kMaxMs)) + "], got a number past the float range");
    }
    wrong_type("max_delay_ms", "a number of milliseconds", object);
  }
  if (!std::isfinite(ms) || ms < 0 || ms > kMaxMs) {
    throw Error(ErrorCode::kInvalidOption, "max_delay_ms must be in [0, " + std::to_string(static_cast<int64_t>(kMaxMs)) + "], got " +
                                               py::str(object).cast<std::string>());
  }
  return std::llround(ms * 1000.0);
}

// The Python future of one request. The callback sets and drops it under the GIL, so that the
// worker, which destroys the callback afterwards, never needs the GIL again.
struct PendingFuture {
  py::object future;
  bool numpy_out;

  ~PendingFuture() {
    if (future) {  // the request was refused at submit (GIL held) or never completed
      py::gil_scoped_acquire gil;
      future = py::object();
    }
  }

  void complete(const at::Tensor& logits, const std::exception_ptr& error) {
    py::gil_scoped_acquire gil;
    try {
      if (!future.attr("done")().cast<bool>()) {  // done already: someone else set it (it cannot be cancelled)
        if (error) {
          future.attr("set_exception")(exception_object(error));
        } else {
          future.attr("set_result")(numpy_out ? numpy_logits(logits) : py::reinterpret_steal<py::object>(THPVariable_Wrap(logits)));
        }
      }
    } catch (py::error_already_set& failure) {
      // Set meanwhile (InvalidStateError), or the result could not be converted: then the future
      // gets that failure, so that no future stays pending.
      try {
        if (!future.attr("done")().cast<bool>()) {
          future.attr("set_exception")(failure.value());
        } else {
          failure.discard_as_unraisable("ip_runtime.Batcher completing a future");
        }
      } catch (py::error_already_set& again) {
        again.discard_as_unraisable("ip_runtime.Batcher completing a future");
      }
    }
    future = py::object();
  }

  static py::object exception_object(const std::exception_ptr& error) {
    try {
      std::rethrow_exception(error);
    } catch (const Error& failure) {
      return error_object(failure);
    } catch (const std::exception& failure) {  // the batcher only passes on Errors; be safe anyway
      return error_object(Error(ErrorCode::kRunFailed, failure.what()));
    }
  }
};

class PyBatcher;
std::set<PyBatcher*> live_batchers;  // guarded by the GIL; closed at interpreter exit
// Set once those are closed: a Batcher made later (by another atexit function, a daemon thread) would have a worker
// asking for the GIL while the interpreter finalizes, which ends that thread (and aborts the process).
bool interpreter_exiting = false;

class PyBatcher {
 public:
  PyBatcher(Runtime& runtime, BatcherOptions options) {
    if (interpreter_exiting) throw Error(ErrorCode::kCancelled, "the interpreter is exiting: no new Batcher");
    batcher_ = std::make_unique<Batcher>(runtime, std::move(options));
    live_batchers.insert(this);
  }

  ~PyBatcher() {
    live_batchers.erase(this);
    py::gil_scoped_release release;  // the workers take the GIL to complete what is queued
    batcher_.reset();
  }

  py::object submit(const py::object& image) {
    const bool numpy_in = is_ndarray(image);
    // Copied anyway, so a reversed numpy view (OpenCV's BGR -> RGB `img[..., ::-1]`, negative strides, which a tensor
    // cannot wrap) is made contiguous first instead of refused; a torch view of any layout was already accepted.
    // numpy.require, not ascontiguousarray, which makes a 0-D array 1-D (and its refusal would name a shape not given).
    static py::handle require = py::object(py::module_::import("numpy").attr("require")).release();  // kept for good
    at::Tensor tensor;
    try {
      tensor = as_tensor(numpy_in ? require(image, py::none(), "C") : image, /*is_output=*/false).detach().clone();
    } catch (const Error& error) {
      ++refused_before_submit_[error.code()];  // the C++ Batcher never sees these: stats() adds them to its own
      throw;
    }
    auto pending = std::make_shared<PendingFuture>();
    static py::handle future_type = py::object(py::module_::import("concurrent.futures").attr("Future")).release();  // kept for good
    pending->future = future_type();
    // Queued is already running, as far as the caller can tell: nothing withdraws a request from the C++ queue, so
    // cancel() must answer False (as concurrent.futures does for a running call) rather than True while the request
    // keeps its queue slot and runs anyway. close(drain=False) is what cancels queued requests.
    pending->future.attr("set_running_or_notify_cancel")();
    pending->numpy_out = numpy_in;
    batcher_->submit(tensor, [pending](at::Tensor logits, std::exception_ptr error) { pending->complete(logits, error); });
    return pending->future;
  }

  void expedite() {
    py::gil_scoped_release release;
    batcher_->expedite();
  }

  void close(bool drain) {
    py::gil_scoped_release release;
    batcher_->shutdown(drain);
  }

  py::dict stats() const {
    const imagepiece::BatcherStats stats = batcher_->stats();
    py::dict rejected;
    std::map<ErrorCode, uint64_t> rejected_by_code = stats.rejected;
    for (const auto& [code, count] : refused_before_submit_) rejected_by_code[code] += count;
    for (const auto& [code, count] : rejected_by_code) rejected[imagepiece::error_code_name(code)] = count;
    auto histogram = [](const imagepiece::LatencyHistogram& h) {
      py::dict out;
      out["upper_bounds"] = h.upper_bounds;
      out["counts"] = h.counts;
      out["sum_seconds"] = h.sum_seconds;
      out["count"] = h.count;
      return out;
    };
    py::dict out;
    out["requests"] = stats.requests;
    out["completed"] = stats.completed;
    out["failed"] = stats.failed;
    out["cancelled"] = stats.cancelled;
    out["rejected"] = rejected;
    out["batches"] = stats.batches;
    out["batched_images"] = stats.batched_images;
    out["mean_batch_size"] = stats.mean_batch_size();
    out["padded_rows"] = stats.padded_rows;
    out["batch_sizes"] = stats.batch_sizes;
    out["queue_depth"] = stats.queue_depth;
    out["in_flight"] = stats.in_flight;
    out["queue_wait"] = histogram(stats.queue_wait);
    out["run_time"] = histogram(stats.run_time);
    return out;
  }

  py::dict options() const {
    const BatcherOptions& options = batcher_->options();
    py::dict out;
    out["max_batch"] = options.max_batch;
    out["max_delay_ms"] = static_cast<double>(options.max_delay_us) / 1000.0;
    out["queue_capacity"] = options.queue_capacity;
    out["preferred_batches"] = options.preferred_batches;
    return out;
  }

 private:
  std::unique_ptr<Batcher> batcher_;
  std::map<ErrorCode, uint64_t> refused_before_submit_;  // images no tensor could be made of; guarded by the GIL
};

PyBatcher& batcher(const py::handle& self) { return constructed<PyBatcher>(self, "Batcher"); }

void close_live_batchers() {
  // At exit: cancel what is still queued, before the interpreter stops serving the workers' GIL requests.
  // Each is held by a Python reference while the loop runs: a close releases the GIL and completes futures, and
  // their callbacks (or daemon threads) may drop the last reference to this or another Batcher; a raw pointer
  // was then closed after it was freed (SIGSEGV at exit).
  interpreter_exiting = true;
  std::vector<py::object> batchers;
  for (PyBatcher* batcher : live_batchers) batchers.push_back(py::cast(batcher, py::return_value_policy::reference));
  for (const py::object& batcher : batchers) batcher.cast<PyBatcher&>().close(/*drain=*/false);
  // And the workers of Batchers dropped in a callback, which finish their batch on their own (they take the GIL to
  // complete its futures): none may still want it once the interpreter finalizes.
  py::gil_scoped_release release;
  Batcher::wait_for_all_workers();
}

}  // namespace

void bind_batcher(py::module_& m) {
  py::class_<PyBatcher>(m, "Batcher")
      .def(py::init([](const py::object& runtime, const py::object& max_batch, const py::object& max_delay_ms,
                       const py::object& queue_capacity, const py::object& preferred_batches) {
             if (!py::isinstance<Runtime>(runtime)) wrong_type("runtime", "an ip_runtime.Runtime", runtime);
             BatcherOptions options;
             options.max_batch = int_argument("max_batch", max_batch);
             options.max_delay_us = delay_us_argument(max_delay_ms);
             options.queue_capacity = int_argument("queue_capacity", queue_capacity);
             options.preferred_batches = int_list_argument("preferred_batches", preferred_batches);
             options.around_completions = [](const std::function<void()>& complete) {
               // One GIL hand-over per batch: a busy event loop or client threads would otherwise make the
               // worker wait for the GIL once per future (up to the 5 ms switch interval each time).
               py::gil_scoped_acquire gil;
               complete();
             };
             return std::make_unique<PyBatcher>(imagepiece::python::runtime(runtime), std::move(options));
           }),
           py::arg("runtime"), py::arg("max_batch") = 0, py::arg("max_delay_ms") = 1.0, py::arg("queue_capacity") = 1024,
           py::arg("preferred_batches") = py::tuple(), py::keep_alive<1, 2>(),
           "Dynamic micro-batching over `runtime`: max_batch 0 = the largest batch the runtime runs (the artifact's, or its largest CUDA graph bucket).")
      .def(
          "submit", [](const py::object& self, const py::object& image) { return batcher(self).submit(image); }, py::arg("image"),
           "Queue one image (a batch's row: torch.Tensor or numpy.ndarray, copied at once: its buffer may be reused); returns a concurrent.futures.Future "
           "of its logits row (numpy for numpy), already running: cancel() returns False (close(drain=False) cancels what is "
           "queued). Raises ip_runtime.Error: the input's code, `overloaded` (queue full) or `cancelled` (closed).")
      .def(
          "expedite", [](const py::object& self) { batcher(self).expedite(); },
           "From now on no request waits for its batch to fill (max_delay 0): what is queued runs at once, later requests as "
           "they arrive; still accepting (a server's graceful shutdown, while uploads are still arriving).")
      .def(
          "close", [](const py::object& self, const py::object& drain) { batcher(self).close(bool_argument("drain", drain)); },
          py::arg("drain") = true,
          "Stop accepting; drain=True runs what is queued, drain=False cancels it (`cancelled`); waits for the workers.")
      .def_property_readonly("stats", [](const py::object& self) { return batcher(self).stats(); })
      .def_property_readonly("options", [](const py::object& self) { return batcher(self).options(); })
      .def("__enter__", [](const py::object& self) { return self; })
      .def("__exit__", [](const py::object& self, const py::args&) { batcher(self).close(/*drain=*/true); });

  py::module_::import("atexit").attr("register")(py::cpp_function(&close_live_batchers));
}
