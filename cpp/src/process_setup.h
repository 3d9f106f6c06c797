// What the runtime sets up once per process before any artifact library runs, and how it stays
// usable across fork():
//  * AOTI_RUNTIME_CHECK_INPUTS=1 (unless the user set it): every AOTInductor library then checks its
//    inputs' sizes, strides, dtype and device against what it was compiled for, so no metadata can
//    make it read out of bounds.
//  * fork(): waits until no load or run is in flight (so the child inherits no lock held mid-run),
//    and the child runs single-threaded (at::set_num_threads(1), as PyTorch's DataLoader workers do):
//    the parent's OpenMP thread pool does not survive fork(), and the next parallel region of the
//    forking thread (AOTI kernels, MKL) would wait for it forever. CUDA cannot be used in a forked child
//    at all (fork_generation() tells a Runtime).
//  * the C++ runtime (libstdc++) in the global symbol scope, as in any C++ program: an artifact built
//    with a private static copy of it then binds to the process's copy (process_setup.cpp says why).
#pragma once

#include <cstdint>

namespace imagepiece::detail {

void prepare_process();

// How many fork()s separate this process from the one that called prepare_process() first.
uint64_t fork_generation();

// Held for the duration of each load and run: fork() waits for all of them to finish.
class InFlight {
 public:
  InFlight();
  ~InFlight();
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
};

}  // namespace imagepiece::detail
