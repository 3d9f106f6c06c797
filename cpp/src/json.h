// A minimal JSON reader for artifact metadata (objects, arrays, strings, numbers, booleans, null).
// libtorch ships no JSON library and the metadata is small and machine-written, so a strict
// recursive-descent parser is enough; malformed input throws std::runtime_error.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace imagepiece::json {

struct Value;
using Object = std::map<std::string, Value>;
using Array = std::vector<Value>;

struct Value {
  std::variant<std::nullptr_t, bool, double, std::string, std::shared_ptr<Array>, std::shared_ptr<Object>> data;

  bool is_null() const { return std::holds_alternative<std::nullptr_t>(data); }
  bool is_object() const { return std::holds_alternative<std::shared_ptr<Object>>(data); }
  // Typed accessors throw std::runtime_error naming `what` when the type is not the expected one.
  const Object& object(const char* what) const;
  const Array& array(const char* what) const;
  const std::string& string(const char* what) const;
  double number(const char* what) const;
  bool boolean(const char* what) const;
  // A member of an object; throws if this is not an object or the key is missing.
  const Value& at(const std::string& key) const;
};

Value parse(std::string_view text);

}  // namespace imagepiece::json
