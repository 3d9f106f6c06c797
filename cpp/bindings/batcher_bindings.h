// ip_runtime.Batcher (batcher_bindings.cpp), added to the module by ip_runtime.cpp.
#pragma once

#include <torch/python.h>

void bind_batcher(pybind11::module_& m);
