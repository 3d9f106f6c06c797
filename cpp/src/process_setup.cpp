#include "process_setup.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>

namespace imagepiece::detail {
namespace {

struct Gate {
  std::mutex mutex;
  std::condition_variable idle, fork_done;
  int64_t in_flight = 0;
  bool forking = false;  // new loads and runs wait, so a busy Runtime cannot starve fork()
};

// Rebuilt in place in a forked child, where the parent's copy may be locked by a thread that no
// longer exists; never destroyed (threads may run past static destruction).
alignas(Gate) unsigned char gate_storage[sizeof(Gate)];
Gate* gate = new (gate_storage) Gate;

std::atomic<uint64_t> generation{0};

void before_fork() {
  std::unique_lock<std::mutex> lock(gate->mutex);
  gate->forking = true;
  gate->idle.wait(lock, [] { return gate->in_flight == 0; });
  lock.release();  // held across fork(): no load or run starts until both sides are back
}

void after_fork_in_parent() {
  gate->forking = false;
  gate->mutex.unlock();
  gate->fork_done.notify_all();
}

void after_fork_in_child() {
  gate = new (gate_storage) Gate;
  generation.fetch_add(1, std::memory_order_relaxed);
  try {
    at::set_num_threads(1);  // OpenMP and MKL on this thread: what PyTorch's DataLoader workers do
  } catch (...) {  // nothing may escape a fork handler; a failure here only leaves the thread count as it was
  }
}

// Puts the C++ runtime this library uses into the global symbol scope, where it is in any C++ program
// but not in Python, which loads torch and this module RTLD_LOCAL. An artifact that carries a private
// static copy of libstdc++ then binds to the process's copy instead of mixing the two: on the H200
// machine (g++ 13, torch 2.11) such CUDA artifacts crashed in std::locale inside their constructor.
// New artifacts link libstdc++ dynamically (python/imagepiece/export.py); this covers the others.
void promote_cxx_runtime() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<const void*>(&std::terminate), &info) != 0 && info.dli_fname != nullptr) {
    // RTLD_NOLOAD: only changes the flags of the copy already loaded; the reference is kept for good.
    (void)::dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
  }
}

}  // namespace

void prepare_process() {
  static std::once_flag once;
  std::call_once(once, [] {
    ::setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
    ::pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
    promote_cxx_runtime();
  });
}

uint64_t fork_generation() { return generation.load(std::memory_order_relaxed); }

InFlight::InFlight() {
  std::unique_lock<std::mutex> lock(gate->mutex);
  gate->fork_done.wait(lock, [] { return !gate->forking; });
  ++gate->in_flight;
}

InFlight::~InFlight() {
  std::lock_guard<std::mutex> lock(gate->mutex);
  if (--gate->in_flight == 0) gate->idle.notify_all();
}

}  // namespace imagepiece::detail
