#include "imagepiece/batcher.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cxxabi.h>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>

#include "error_text.h"
#include "process_setup.h"

#ifdef IMAGEPIECE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#endif

namespace imagepiece {
inline namespace abi_v1 {

namespace {

using Clock = std::chrono::steady_clock;

// Bucket bounds (seconds) for queue wait and run time: 0.5 ms .. 10 s covers a GPU batch of one and
// a large CPU batch alike.
const std::vector<double> kLatencyBounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};

// Orders the worker's read of a CUDA image after the work its submitter queued to produce it, as
// Runtime::run orders its work after its caller's stream: the image may still be being written by a
// kernel on the submitter's stream (a side stream, say) when submit() returns, and the worker copies
// it into the batch on a stream of its own. Nothing to order for a CPU image.
class WrittenImage {
 public:
  // Move-only in every build (a CUDA event cannot be copied): a copy of a Request must not compile on CPU-only CI alone.
  WrittenImage() = default;
  WrittenImage(const WrittenImage&) = delete;
  WrittenImage& operator=(const WrittenImage&) = delete;
  WrittenImage(WrittenImage&&) = default;
  WrittenImage& operator=(WrittenImage&&) = default;

  // At submit(), on the submitting thread.
  static WrittenImage after_current_work(const at::Tensor& image) {
    WrittenImage written;
#ifdef IMAGEPIECE_WITH_CUDA
    if (image.is_cuda()) {
      const auto writer = c10::cuda::getCurrentCUDAStream(image.device().index());
      // The worker copies on the device's default stream (its thread's current one): work queued there is
      // already ahead of the copy, and an event per request would only cost.
      if (writer != c10::cuda::getDefaultCUDAStream(image.device().index())) {
        written.event_.emplace();
        written.event_->record(writer);
      }
    }
#else
    (void)image;
#endif
    return written;
  }

  // On the worker, before it reads `image` on its current stream.
  void wait_before_reading(const at::Tensor& image) {
#ifdef IMAGEPIECE_WITH_CUDA
    if (!event_) return;
    const auto reader = c10::cuda::getCurrentCUDAStream(image.device().index());
    event_->block(reader);
    // The image's memory belongs to the submitter's stream: once the request completes and drops it, the
    // allocator could hand it out there again while this stream's copy has yet to read it.
    c10::cuda::CUDACachingAllocator::recordStream(image.storage().data_ptr(), reader);
#else
    (void)image;
#endif
  }

 private:
#ifdef IMAGEPIECE_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> event_;
#endif
};

struct Request {
  at::Tensor image;
  Batcher::Completion done;
  Clock::time_point submitted;
  WrittenImage written;
};

// The State whose worker this thread is (thread ids are reused once a thread is joined; this is not).
thread_local const void* worker_of = nullptr;
// The State whose around_completions hook this thread is inside, if any: completions started there (a callback
// destroying its Batcher cancels what is queued) run inside that same call, not in a second one (a hook that
// takes a lock would wait for itself).
thread_local const void* completing_for = nullptr;

// Every Batcher worker of the process that has not exited yet, for Batcher::wait_for_all_workers. Never destroyed:
// a detached worker may still count itself out while the process's statics are being destroyed. A forked child
// inherits the parent's count but none of its threads: a count of another fork generation is no one's.
struct RunningWorkers {
  std::mutex mutex;
  std::condition_variable exited;
  size_t count = 0;
  std::atomic<uint64_t> fork_generation{detail::fork_generation()};

  void change(bool starting) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (fork_generation.load() != detail::fork_generation()) {
        count = 0;
        fork_generation = detail::fork_generation();
      }
      starting ? ++count : --count;
    }
    exited.notify_all();
  }
};
RunningWorkers& running_workers() {
  static auto* workers = new RunningWorkers;
  return *workers;
}

double seconds_between(Clock::time_point from, Clock::time_point to) { return std::chrono::duration<double>(to - from).count(); }

LatencyHistogram empty_histogram() {
  LatencyHistogram histogram;
  histogram.upper_bounds = kLatencyBounds;
  histogram.counts.assign(kLatencyBounds.size() + 1, 0);
  return histogram;
}

void observe(LatencyHistogram& histogram, double seconds) {
  const auto bucket = std::lower_bound(histogram.upper_bounds.begin(), histogram.upper_bounds.end(), seconds) - histogram.upper_bounds.begin();
  ++histogram.counts[static_cast<size_t>(bucket)];
  histogram.sum_seconds += seconds;
  ++histogram.count;
}

// A callback that throws must not take the worker down with it (the contract says it is dropped).
void complete(Request& request, const at::Tensor& logits, std::exception_ptr error) noexcept {
  try {
    request.done(logits, std::move(error));
  } catch (...) {
  }
  request.done = nullptr;  // release what the callback holds (e.g. a Python future) here, not later
}

BatcherOptions validated(BatcherOptions options, const Runtime& runtime) {
  auto refuse = [](const std::string& why) { throw Error(ErrorCode::kInvalidOption, why); };
  // With CUDA graphs of the caller's buckets, a batch above the largest bucket fails (kInvalidBatch): a default
  // max_batch of the artifact's largest would have failed every batch above it under load.
  const auto& buckets = runtime.options().batch_buckets;
  const bool bucketed = runtime.options().cuda_graphs && !buckets.empty();
  const int64_t largest = bucketed ? *std::max_element(buckets.begin(), buckets.end()) : runtime.info().batch_max;
  if (options.max_batch == 0) options.max_batch = largest;
  if (options.max_batch < 1 || options.max_batch > largest) {
    refuse("max_batch must be in [1, " + std::to_string(largest) + "] (" +
           (bucketed ? "the largest CUDA graph bucket" : "the artifact's largest batch") + "), got " + std::to_string(options.max_batch));
  }
  if (options.max_delay_us < 0 || options.max_delay_us > BatcherOptions::kMaxDelayUs) {
    refuse("max_delay_us must be in [0, " + std::to_string(BatcherOptions::kMaxDelayUs) + "], got " + std::to_string(options.max_delay_us));
  }
  if (options.queue_capacity < 1) refuse("queue_capacity must be >= 1, got " + std::to_string(options.queue_capacity));
  auto& preferred = options.preferred_batches;
  for (int64_t size : preferred) {
    if (size < 1 || size > options.max_batch) {
      refuse("preferred batch " + std::to_string(size) + " is outside [1, max_batch = " + std::to_string(options.max_batch) + "]");
    }
  }
  std::sort(preferred.begin(), preferred.end());
  preferred.erase(std::unique(preferred.begin(), preferred.end()), preferred.end());
  return options;
}

// Anything but an Error (c10::Error from a copy, bad_alloc) leaves the batcher as one.
std::exception_ptr as_run_error(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const Error&) {
    return error;
  } catch (const std::exception& failure) {
    return std::make_exception_ptr(Error(ErrorCode::kRunFailed, "batch failed: " + detail::error_text(failure)));
  } catch (...) {
    return std::make_exception_ptr(Error(ErrorCode::kRunFailed, "batch failed with an unknown exception"));
  }
}

}  // namespace

struct Batcher::State {
  Runtime runtime;  // shares the caller's model: it may be moved or destroyed while requests run
  const BatcherOptions options;
  const int64_t smallest_run;  // the artifact's smallest batch: shorter batches are padded to it
  const size_t capacity;
  const Clock::duration max_delay;
  // The process the workers run in: a forked child inherits this State but none of its threads.
  const uint64_t fork_generation = detail::fork_generation();

  mutable std::mutex mutex;
  std::condition_variable work;  // a request arrived, or shutdown began
  std::deque<Request> queue;
  bool accepting = true;
  bool stopping = false;
  bool expedited = false;  // expedite(): no request waits for max_delay any more
  BatcherStats counters;

  // The workers' threads, and who ends them: one shutdown() takes and joins them, or a callback destroying the
  // Batcher detaches them; either way a shutdown() returns once `live_workers` is 0. The lock is never held
  // while joining.
  std::mutex join_mutex;
  std::condition_variable workers_ended;
  bool workers_taken = false;
  size_t live_workers = 0;  // started and not yet out of work_loop, joined or detached alike
  std::vector<std::thread> workers;

  State(Runtime shared_runtime, BatcherOptions options_)
      : runtime(std::move(shared_runtime)),
        options(validated(std::move(options_), runtime)),
        smallest_run(std::max<int64_t>(1, runtime.info().batch_min)),
        capacity(static_cast<size_t>(options.queue_capacity)),
        max_delay(std::chrono::microseconds(options.max_delay_us)) {
    counters.batch_sizes.assign(static_cast<size_t>(options.max_batch) + 1, 0);
    counters.queue_wait = empty_histogram();
    counters.run_time = empty_histogram();
  }

  bool on_worker_thread() const { return worker_of == this; }
  bool in_forked_child() const { return detail::fork_generation() != fork_generation; }

  // shutdown() in a forked child: no worker exists there to wait for, and a lock a parent thread held at
  // fork() stays held forever, so nothing here may block. Queued requests are cancelled if the queue's
  // lock is free; the workers' std::threads are detached (never joined), so destroying them is safe.
  void abandon_in_forked_child() {
    std::vector<Request> cancelled;
    std::unique_lock<std::mutex> lock(mutex, std::try_to_lock);
    if (lock.owns_lock()) {
      accepting = false;
      cancelled = take_queued_as_cancelled();
      lock.unlock();
    }
    cancel(cancelled);
    std::unique_lock<std::mutex> join_lock(join_mutex, std::try_to_lock);
    if (!join_lock.owns_lock()) return;
    for (auto& worker : workers) {
      try {
        if (worker.joinable()) worker.detach();
      } catch (const std::system_error&) {
      }
    }
  }

  // How many queued requests to run now; 0 = keep waiting. Full batches go at once, then the largest
  // preferred size that is queued (Triton's rule), and anything once the oldest has waited long enough.
  size_t ready_count(bool oldest_expired) const {
    const auto max_batch = static_cast<size_t>(options.max_batch);
    if (queue.size() >= max_batch) return max_batch;
    const auto& preferred = options.preferred_batches;
    for (auto size = preferred.rbegin(); size != preferred.rend(); ++size) {
      if (static_cast<size_t>(*size) <= queue.size()) return static_cast<size_t>(*size);
    }
    return oldest_expired ? queue.size() : 0;
  }

  // Blocks until a batch is due and moves it into `batch`; false once stopping with nothing queued.
  bool next_batch(std::vector<Request>& batch) {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      work.wait(lock, [&] { return !queue.empty() || stopping; });
      if (queue.empty()) return false;
      const auto deadline = queue.front().submitted + max_delay;
      const size_t count = ready_count(stopping || expedited || Clock::now() >= deadline);
      if (count == 0) {
        work.wait_until(lock, deadline);
        continue;  // re-check: more arrived, the deadline passed, or another worker took them
      }
      const auto taken = Clock::now();
      for (size_t i = 0; i < count; ++i) {
        observe(counters.queue_wait, seconds_between(queue.front().submitted, taken));
        batch.push_back(std::move(queue.front()));
        queue.pop_front();
      }
      counters.queue_depth = queue.size();
      counters.in_flight += count;
      if (!queue.empty()) work.notify_one();  // an idle worker can start on the rest
      return true;
    }
  }

  // The batch's input in `buffer` (reused run after run: the runtime has read it when run() returns).
  at::Tensor assemble(std::vector<Request>& batch, at::Tensor& buffer) const {
    const auto count = static_cast<int64_t>(batch.size());
    const int64_t rows = std::max(count, smallest_run);
    const at::Tensor& first = batch.front().image;
    if (!buffer.defined() || buffer.device() != first.device()) {
      std::vector<int64_t> shape{std::max(options.max_batch, smallest_run)};
      shape.insert(shape.end(), first.sizes().begin(), first.sizes().end());
      buffer = at::empty(shape, first.options());
    }
    at::Tensor input = buffer.narrow(0, 0, rows);
    for (int64_t i = 0; i < count; ++i) {
      Request& request = batch[static_cast<size_t>(i)];
      request.written.wait_before_reading(request.image);
      input.select(0, i).copy_(request.image);
    }
    if (rows > count) input.narrow(0, count, rows - count).zero_();  // rows are independent: padding never changes a real row
    return input;
  }

  void run_batch(std::vector<Request>& batch, at::Tensor& host_buffer, at::Tensor& device_buffer) {
    const auto started = Clock::now();
    at::Tensor logits;
    std::exception_ptr error;
    try {
      c10::NoGradGuard no_grad;  // an image that requires grad must not make the buffer part of a graph
      at::Tensor& buffer = batch.front().image.is_cpu() ? host_buffer : device_buffer;
      logits = runtime.run(assemble(batch, buffer));
    } catch (...) {
      error = as_run_error(std::current_exception());
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      const auto count = static_cast<int64_t>(batch.size());
      ++counters.batches;
      counters.batched_images += static_cast<uint64_t>(count);
      counters.padded_rows += static_cast<uint64_t>(std::max<int64_t>(0, smallest_run - count));
      ++counters.batch_sizes[static_cast<size_t>(count)];
      observe(counters.run_time, seconds_between(started, Clock::now()));
      (error ? counters.failed : counters.completed) += static_cast<uint64_t>(count);
    }
    complete_all(batch, [&](size_t i) { return error ? at::Tensor() : logits.select(0, static_cast<int64_t>(i)); }, error);
    std::lock_guard<std::mutex> lock(mutex);
    counters.in_flight -= batch.size();
  }

  void work_loop() noexcept {
    worker_of = this;
    at::init_num_threads();  // intra-op threads as the process set them, not OpenMP's per-thread default
    at::Tensor host_buffer, device_buffer;
    std::vector<Request> batch;
    batch.reserve(static_cast<size_t>(options.max_batch));
    while (next_batch(batch)) {
      run_batch(batch, host_buffer, device_buffer);
      batch.clear();
    }
  }

  // Stops accepting; without `drain` takes every queued request out (to be completed as cancelled).
  std::vector<Request> stop(bool drain) {
    std::vector<Request> cancelled;
    {
      std::lock_guard<std::mutex> lock(mutex);
      accepting = false;
      stopping = true;
      if (!drain) cancelled = take_queued_as_cancelled();
    }
    work.notify_all();
    return cancelled;
  }

  // Under `mutex`: every queued request, counted as cancelled (cancel() completes them).
  std::vector<Request> take_queued_as_cancelled() {
    std::vector<Request> cancelled(std::make_move_iterator(queue.begin()), std::make_move_iterator(queue.end()));
    queue.clear();
    counters.queue_depth = 0;
    counters.cancelled += cancelled.size();
    return cancelled;
  }

  void cancel(std::vector<Request>& requests) const {
    if (requests.empty()) return;
    auto error = std::make_exception_ptr(Error(ErrorCode::kCancelled, "cancelled: the batcher was shut down before this request ran"));
    complete_all(requests, [](size_t) { return at::Tensor(); }, error);
  }

  // Completes every request once, inside options.around_completions when there is one. A request
  // the hook left incomplete (it threw, or never called `complete`) is completed after it.
  template <typename RowOf>
  void complete_all(std::vector<Request>& requests, const RowOf& row_of, const std::exception_ptr& error) const {
    auto complete_remaining = [&] {
      for (size_t i = 0; i < requests.size(); ++i) {
        if (requests[i].done) complete(requests[i], row_of(i), error);
      }
    };
    if (options.around_completions && completing_for != this) {
      struct Inside {
        const void* outer = completing_for;
        explicit Inside(const void* state) { completing_for = state; }
        ~Inside() { completing_for = outer; }
      } inside(this);
      try {
        options.around_completions(complete_remaining);
      } catch (abi::__forced_unwind&) {
        throw;  // the thread is being ended (pthread_exit: Python does it to a thread that wants the GIL while it exits)
      } catch (...) {
      }
    }
    complete_remaining();
  }

  // A worker thread about to start (starting), or one that left work_loop or failed to start.
  void count_worker(bool starting) {
    {
      std::lock_guard<std::mutex> lock(join_mutex);
      starting ? ++live_workers : --live_workers;
    }
    workers_ended.notify_all();
  }

  // From a thread that is not a worker (shutdown, a failed constructor): returns once every worker has exited.
  // The first caller joins the threads; a callback that destroys the Batcher meanwhile (`release_workers`) must
  // not wait for that joiner, and workers it detached are waited for by their count.
  void join_workers() {
    std::vector<std::thread> taken;
    {
      std::lock_guard<std::mutex> lock(join_mutex);
      if (!workers_taken) {
        workers_taken = true;
        taken.swap(workers);
      }
    }
    for (auto& worker : taken) {
      if (worker.joinable()) worker.join();
    }
    std::unique_lock<std::mutex> lock(join_mutex);
    workers_ended.wait(lock, [&] { return live_workers == 0; });
  }

  // A callback destroying its Batcher: waits for no worker, neither its own (it runs this) nor the others (a
  // callback of theirs may wait for a lock this one holds, e.g. in around_completions). Workers no shutdown()
  // has taken are detached; each holds this State and exits after its batch.
  void release_workers() {
    std::lock_guard<std::mutex> lock(join_mutex);
    if (workers_taken) return;  // a shutdown() joins them, this thread too once its callback returns
    workers_taken = true;
    for (auto& worker : workers) {
      if (worker.joinable()) worker.detach();
    }
    workers.clear();
  }
};

Batcher::Batcher(Runtime& runtime, BatcherOptions options) : state_(std::make_shared<State>(runtime.share(), std::move(options))) {
  const int instances = std::max(1, runtime.options().instances);
  try {
    for (int i = 0; i < instances; ++i) {
      state_->count_worker(/*starting=*/true);
      running_workers().change(/*starting=*/true);
      try {
        // Each worker holds the state, so it stays valid for a worker detached by a callback's destruction.
        state_->workers.emplace_back([state = state_]() mutable {
          state->work_loop();
          state->count_worker(/*starting=*/false);
          state.reset();  // its last holder may release the model: before wait_for_all_workers can return
          running_workers().change(/*starting=*/false);
        });
      } catch (const std::system_error&) {
        state_->count_worker(/*starting=*/false);
        running_workers().change(/*starting=*/false);
        throw;
      }
    }
  } catch (const std::system_error& error) {
    state_->stop(true);
    state_->join_workers();
    throw Error(ErrorCode::kInvalidOption, std::string("cannot start the batcher's worker threads: ") + error.what());
  }
}

Batcher::~Batcher() {
  if (!state_) return;  // moved from
  if (state_->in_forked_child()) {  // first: a child forked from a callback is no worker, and may find locks held
    state_->abandon_in_forked_child();
    return;
  }
  if (state_->on_worker_thread()) {
    // Destroyed from a completion callback: waiting for queued work would wait for this very thread.
    const std::shared_ptr<State> state = state_;
    auto cancelled = state->stop(/*drain=*/false);
    state->cancel(cancelled);
    state->release_workers();
    return;
  }
  shutdown(true);
}

Batcher::Batcher(Batcher&&) noexcept = default;

Batcher& Batcher::operator=(Batcher&& other) noexcept {
  if (this != &other) {
    Batcher old(std::move(*this));  // shut down like a destroyed one
    state_ = std::move(other.state_);
  }
  return *this;
}

namespace {
[[noreturn]] void refuse_moved_from() { throw Error(ErrorCode::kInvalidOption, "this Batcher was moved from"); }
}  // namespace

void Batcher::submit(const at::Tensor& image, Completion done) {
  if (!state_) refuse_moved_from();
  State& state = *state_;
  if (state.in_forked_child()) {  // checked before any lock: one held by a parent thread at fork() is held for good
    throw Error(ErrorCode::kCancelled, "this Batcher was created before fork(): create it in the child");
  }
  auto reject = [&](const Error& error) -> Error {
    std::lock_guard<std::mutex> lock(state.mutex);
    ++state.counters.rejected[error.code()];
    return error;
  };
  if (!done) throw reject(Error(ErrorCode::kInvalidType, "submit() needs a completion callback"));
  try {
    state.runtime.check_sample(image);
  } catch (const Error& error) {
    throw reject(error);
  }
  WrittenImage written;
  try {
    written = WrittenImage::after_current_work(image);  // outside the lock: a CUDA call
  } catch (const std::exception& error) {
    throw reject(Error(ErrorCode::kRunFailed, "cannot order the image after its stream's work: " + detail::error_text(error)));
  }
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (!state.accepting) {
      ++state.counters.rejected[ErrorCode::kCancelled];
      throw Error(ErrorCode::kCancelled, "the batcher is shut down: it takes no new requests");
    }
    if (state.queue.size() >= state.capacity) {
      ++state.counters.rejected[ErrorCode::kOverloaded];
      throw Error(ErrorCode::kOverloaded, "overloaded: " + std::to_string(state.queue.size()) +
                                              " requests are already waiting (queue_capacity); retry later");
    }
    state.queue.push_back(Request{image, std::move(done), Clock::now(), std::move(written)});
    ++state.counters.requests;
    state.counters.queue_depth = state.queue.size();
  }
  state.work.notify_one();
}

std::future<at::Tensor> Batcher::submit(const at::Tensor& image) {
  auto promise = std::make_shared<std::promise<at::Tensor>>();
  std::future<at::Tensor> result = promise->get_future();
  submit(image, [promise](at::Tensor logits, std::exception_ptr error) {
    if (error) {
      promise->set_exception(std::move(error));
    } else {
      promise->set_value(std::move(logits));
    }
  });
  return result;
}

void Batcher::expedite() {
  if (!state_) refuse_moved_from();
  if (state_->in_forked_child()) return;  // no worker waits here; a lock held by a parent thread at fork() is held for good
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->expedited = true;
  }
  state_->work.notify_all();  // workers waiting out a deadline take what is queued now
}

void Batcher::shutdown(bool drain) {
  if (!state_) return;  // moved from: nothing to shut down
  if (state_->in_forked_child()) {
    state_->abandon_in_forked_child();
    return;
  }
  if (state_->on_worker_thread()) {
    throw Error(ErrorCode::kInvalidOption, "shutdown() cannot be called from a completion callback: it would wait for its own thread");
  }
  // A cancellation callback runs on this thread and may destroy this Batcher: from here on only the
  // shared State is used, never `this`.
  const std::shared_ptr<State> state = state_;
  auto cancelled = state->stop(drain);
  state->cancel(cancelled);
  state->join_workers();
}

void Batcher::wait_for_all_workers() {
  RunningWorkers& all = running_workers();
  if (all.fork_generation.load() != detail::fork_generation()) return;  // a forked child: the count is the parent's
  std::unique_lock<std::mutex> lock(all.mutex);
  all.exited.wait(lock, [&] { return all.count == 0; });
}

BatcherStats Batcher::stats() const {
  if (!state_) refuse_moved_from();
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->counters;
}

const BatcherOptions& Batcher::options() const {
  if (!state_) refuse_moved_from();
  return state_->options;
}

}  // inline namespace abi_v1
}  // namespace imagepiece
