// Python <-> C++ conversions shared by the binding files of ip_runtime._core (defined in ip_runtime.cpp).
// Each refuses a wrong argument with an imagepiece::Error (invalid_type, invalid_option, ...), never a
// TypeError, so every failure of a call is an ip_runtime.Error.
#pragma once

#include <torch/python.h>

#include <cstdint>
#include <string>
#include <vector>

#include "imagepiece/runtime.h"

namespace imagepiece::python {

[[noreturn]] void wrong_type(const std::string& what, const std::string& wanted, const pybind11::handle& object);
int64_t int_argument(const std::string& what, const pybind11::handle& object);
std::vector<int64_t> int_list_argument(const std::string& what, const pybind11::handle& object);
bool bool_argument(const std::string& what, const pybind11::handle& object);
bool is_ndarray(const pybind11::handle& object);
// A tensor over a torch.Tensor's or numpy array's memory (no copy); `is_output`: the logits buffer.
at::Tensor as_tensor(const pybind11::handle& object, bool is_output);
// Logits for a caller who passed numpy images: a host numpy array; bf16 (numpy has no such type) as float32, exactly.
pybind11::object numpy_logits(const at::Tensor& logits);
// The ip_runtime.Error instance (with `.code`) for an Error; needs the GIL.
pybind11::object error_object(const Error& error);

// The C++ object behind `self`, a Python instance of a bound class T. One made by T.__new__(T) without __init__
// holds none (pybind11 would hand a method uninitialised memory): refused with invalid_type.
template <class T>
T& constructed(const pybind11::handle& self, const char* class_name) {
  // The methods take `self` untyped (to see an unconstructed one): any other object, Runtime.run(object(), ...), ends here.
  if (!pybind11::isinstance<T>(self)) wrong_type("self", std::string("an ip_runtime.") + class_name, self);
  auto* instance = reinterpret_cast<pybind11::detail::instance*>(self.ptr());
  auto holder = instance->get_value_and_holder(pybind11::detail::get_type_info(typeid(T)), /*throw_if_missing=*/false);
  if (!holder || !holder.holder_constructed()) {
    throw Error(ErrorCode::kInvalidType, std::string("this ip_runtime.") + class_name + " was made without __init__; create it as ip_runtime." +
                                             class_name + "(...)");
  }
  return *holder.template value_ptr<T>();
}

inline Runtime& runtime(const pybind11::handle& self) { return constructed<Runtime>(self, "Runtime"); }

}  // namespace imagepiece::python
