#pragma once
// The text of an exception for an imagepiece::Error message: a c10::Error's what() carries a C++
// backtrace (frame #0, #1, ...) that tells a user of ip_runtime nothing; its message alone does.
#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace imagepiece::detail {

inline std::string error_text(const std::exception& error) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) return torch_error->what_without_backtrace();
  return error.what();
}

}  // namespace imagepiece::detail
