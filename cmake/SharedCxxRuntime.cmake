# imagepiece_link_shared_cxx_runtime(target): link libstdc++ as the shared library, by name, even
# where the toolchain would link it statically.
#
# On the GPU machines (g++ 13.3, torch 2.11) shared libraries came out with libstdc++ linked in
# statically: libimagepiece_runtime.so had no NEEDED libstdc++ and a std::locale of its own beside
# torch's, and std::regex crashed while it read the first artifact's metadata
# (benchmarks/results/nvidia-h100-80gb-hbm3/README.md). Named ahead of the compiler driver's own
# -lstdc++, the shared library resolves every symbol first. PUBLIC: whatever links the target (the
# Python bindings, apps) gets it too. GCC on Linux only; other toolchains bring their own runtime.
include_guard(GLOBAL)

function(imagepiece_link_shared_cxx_runtime target)
  target_link_libraries(${target} PUBLIC $<$<AND:$<CXX_COMPILER_ID:GNU>,$<PLATFORM_ID:Linux>>:-l:libstdc++.so.6>)
endfunction()
