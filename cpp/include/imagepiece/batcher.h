// imagepiece::Batcher: dynamic micro-batching over a Runtime, for online traffic that arrives one image
// at a time (what Triton's dynamic batcher does, inside the process).
//
// Contract
//  * submit() takes one image: a batch's row, e.g. [3, H, W] float, as Runtime::check_sample accepts it
//    (whatever input format the artifact records). Worker threads, one per runtime instance
//    (RuntimeOptions::instances), take queued requests in arrival order until they hold max_batch, or
//    a preferred batch size, or the oldest has waited max_delay_us; copy them into one batch (padded
//    with zero rows up to the artifact's smallest batch: a static-batch artifact always runs its own
//    batch), run it once, and complete each request with its own row of logits. A row is a view of
//    that run's freshly allocated output, never of a reused buffer.
//  * The image is read when its batch is assembled, not at submit(): leave it unmodified until its
//    request completes (as with an argument to std::async). A CUDA image is read after the work queued
//    on the submitting thread's current stream before submit() (as Runtime::run orders its work). A CUDA
//    row of logits is ready on the worker's stream, the device's default one, when its request completes:
//    read it there (as Python's .cpu() does), or synchronize before reading it on a stream of your own.
//  * Errors are imagepiece::Error. submit() throws, and queues nothing, for an image the runtime would
//    refuse (its code: kInvalidShape, kInvalidDtype, ...), kOverloaded when queue_capacity requests
//    already wait, kCancelled once shutdown() began, kRunFailed when a CUDA image cannot be ordered after
//    its stream's work (no event can be recorded). A failure while a batch runs reaches the
//    requests of that batch only.
//  * Every accepted request completes exactly once: with its logits, its batch's error, or kCancelled.
//  * Lifetime: the Batcher shares the Runtime's loaded model: the Runtime may be moved (into a container
//    that grows, say) or destroyed while the Batcher runs; the model is released when both are gone.
//  * expedite(): from now on no request waits for its batch to fill (max_delay 0: what is queued runs at
//    once, each later request as it arrives, preferred sizes aside), and submit() keeps accepting; for a
//    server's graceful shutdown, where requests still being uploaded or decoded must yet be answered.
//  * shutdown(drain) stops accepting, then drain = true runs every queued request, drain = false
//    completes queued requests with kCancelled (a batch already running finishes); it returns once the
//    workers have exited. Later calls wait for the same; the destructor calls shutdown(true).
//  * Thread safety: submit(), stats() and shutdown() may be called from any thread at once.
//    Completion callbacks run on a worker thread (cancellations: on the thread calling shutdown), never
//    under the Batcher's lock; they should be quick, must not throw (what they throw is dropped), must
//    not wait for another request's result (that request may need this very worker: a deadlock, not
//    detected), and must not call shutdown() (kInvalidOption: it would wait for itself). Destroying the Batcher from a
//    completion callback on a worker cancels what is queued and returns without waiting for any worker: not for
//    its own, nor for the others, whose running batches finish (their callbacks may still run after it returns)
//    before they exit; a shutdown() running meanwhile still returns only once they have. A cancellation callback
//    (on the thread calling shutdown) that destroys it waits for the workers, as shutdown() does.
//  * fork(): a Batcher's workers do not exist in a forked child. There submit() throws kCancelled
//    ("created before fork(): create it in the child"), and shutdown() and the destructor wait for nothing:
//    they cancel what is queued (when no parent thread held the queue's lock at fork()) and return.
//  * A moved-from Batcher: submit(), stats() and options() throw kInvalidOption; shutdown() does nothing.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <vector>

#include "imagepiece/runtime.h"

namespace imagepiece {
inline namespace abi_v1 {

struct BatcherOptions {
  static constexpr int64_t kMaxDelayUs = 10'000'000;

  int64_t max_batch = 0;          // images per run, 1 .. the largest the runtime runs (the artifact's, or with
                                  // cuda_graphs and batch_buckets the largest bucket); 0 = that largest
  int64_t max_delay_us = 1000;    // how long the oldest queued request may wait for its batch to fill (0 .. 10 s)
  int64_t queue_capacity = 1024;  // waiting requests beyond this are refused with kOverloaded (>= 1)
  std::vector<int64_t> preferred_batches{};  // run at once when one of these sizes is queued (the largest
                                             // that is), without waiting for max_batch or max_delay_us
  // ({} initialisers: designated initialisers that leave these out compile under -Wextra -Werror.)
  // Runs around the completion callbacks of each batch (and of the requests a shutdown cancels) and
  // must call `complete` once: to take a lock once per batch rather than per request (the Python
  // binding takes the GIL here). Empty: the callbacks are called directly. Completions started inside it
  // (a callback destroying the Batcher cancels what is queued) run within that same call, not a nested one.
  std::function<void(const std::function<void()>& complete)> around_completions{};
};

// A latency distribution in fixed buckets, ready for a Prometheus histogram.
struct LatencyHistogram {
  std::vector<double> upper_bounds;  // seconds, ascending; counts has one more bucket, for the rest (+Inf)
  std::vector<uint64_t> counts;      // per bucket, not cumulative
  double sum_seconds = 0.0;
  uint64_t count = 0;
};

struct BatcherStats {
  uint64_t requests = 0;        // accepted by submit()
  uint64_t completed = 0;       // completed with their logits
  uint64_t failed = 0;          // completed with their batch's error
  uint64_t cancelled = 0;       // completed with kCancelled by shutdown(false)
  std::map<ErrorCode, uint64_t> rejected;  // refused by submit(), by code
  uint64_t batches = 0;         // runs
  uint64_t batched_images = 0;  // requests in those runs (mean batch size = batched_images / batches)
  uint64_t padded_rows = 0;     // zero rows added to reach the artifact's smallest batch
  std::vector<uint64_t> batch_sizes;  // [n] = runs of n requests, n = 0 .. max_batch
  uint64_t queue_depth = 0;     // waiting now
  uint64_t in_flight = 0;       // in a batch being assembled, run or completed now
  LatencyHistogram queue_wait;  // submit() to the batch taking the request, per request
  LatencyHistogram run_time;    // assembling and running a batch, per batch
  double mean_batch_size() const { return batches ? static_cast<double>(batched_images) / static_cast<double>(batches) : 0.0; }
};

class Batcher {
 public:
  // The request's row of logits, or (logits undefined) the error it completed with.
  using Completion = std::function<void(at::Tensor logits, std::exception_ptr error)>;

  explicit Batcher(Runtime& runtime, BatcherOptions options = {});
  ~Batcher();
  Batcher(Batcher&&) noexcept;
  Batcher& operator=(Batcher&&) noexcept;
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  std::future<at::Tensor> submit(const at::Tensor& image);
  void submit(const at::Tensor& image, Completion done);  // the one mechanism; the future wraps it
  void expedite();
  void shutdown(bool drain = true);
  BatcherStats stats() const;
  const BatcherOptions& options() const;  // as validated: max_batch resolved, preferred_batches sorted
  // Blocks until no worker of any Batcher in the process runs, those of Batchers destroyed from a callback (whose
  // workers finish their batch on their own) included: for a process about to exit, after shutting down the
  // Batchers it holds (the Python binding calls it at interpreter exit).
  static void wait_for_all_workers();

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with the workers, so one destroyed from a callback can finish
};

}  // inline namespace abi_v1
}  // namespace imagepiece
