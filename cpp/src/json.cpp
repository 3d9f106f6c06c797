#include "json.h"

#include <cstdlib>
#include <stdexcept>

namespace imagepiece::json {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value document() {
    Value value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  // Nesting guard: metadata is a few levels deep; a hostile file must not overflow the stack.
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("malformed JSON at offset " + std::to_string(pos_) + ": " + why);
  }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t')) ++pos_;
  }

  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    return text_[pos_];
  }

  void expect(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("expected '" + std::string(word) + "'");
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    switch (peek()) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value{parse_string()};
      case 't': expect("true"); return Value{true};
      case 'f': expect("false"); return Value{false};
      case 'n': expect("null"); return Value{nullptr};
      default: return Value{parse_number()};
    }
  }

  Value parse_object(int depth) {
    auto object = std::make_shared<Object>();
    ++pos_;
    if (peek() == '}') { ++pos_; return Value{object}; }
    while (true) {
      if (peek() != '"') fail("expected a key");
      std::string key = parse_string();
      if (peek() != ':') fail("expected ':'");
      ++pos_;
      (*object)[key] = parse_value(depth + 1);
      char next = peek();
      ++pos_;
      if (next == '}') return Value{object};
      if (next != ',') fail("expected ',' or '}'");
    }
  }

  Value parse_array(int depth) {
    auto array = std::make_shared<Array>();
    ++pos_;
    if (peek() == ']') { ++pos_; return Value{array}; }
    while (true) {
      array->push_back(parse_value(depth + 1));
      char next = peek();
      ++pos_;
      if (next == ']') return Value{array};
      if (next != ',') fail("expected ',' or ']'");
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != '"') {
      char c = text_[pos_++];
      if (c != '\\') { out += c; continue; }
      if (pos_ >= text_.size()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (pos_ + 4 > text_.size()) fail("short \\u escape");
          unsigned code = std::stoul(std::string(text_.substr(pos_, 4)), nullptr, 16);
          pos_ += 4;
          // Metadata is ASCII; keep other code points readable as UTF-8 (no surrogate pairs).
          if (code < 0x80) out += static_cast<char>(code);
          else if (code < 0x800) { out += static_cast<char>(0xC0 | (code >> 6)); out += static_cast<char>(0x80 | (code & 0x3F)); }
          else { out += static_cast<char>(0xE0 | (code >> 12)); out += static_cast<char>(0x80 | ((code >> 6) & 0x3F)); out += static_cast<char>(0x80 | (code & 0x3F)); }
          break;
        }
        default: fail("bad escape");
      }
    }
    if (pos_ >= text_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }

  double parse_number() {
    const std::string rest(text_.substr(pos_, 64));
    char* end = nullptr;
    double value = std::strtod(rest.c_str(), &end);
    if (end == rest.c_str()) fail("expected a value");
    pos_ += static_cast<size_t>(end - rest.c_str());
    return value;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

[[noreturn]] void wrong_type(const char* what, const char* expected) {
  throw std::runtime_error(std::string("metadata field '") + what + "' is not " + expected);
}

}  // namespace

const Object& Value::object(const char* what) const {
  if (auto p = std::get_if<std::shared_ptr<Object>>(&data)) return **p;
  wrong_type(what, "an object");
}
const Array& Value::array(const char* what) const {
  if (auto p = std::get_if<std::shared_ptr<Array>>(&data)) return **p;
  wrong_type(what, "an array");
}
const std::string& Value::string(const char* what) const {
  if (auto p = std::get_if<std::string>(&data)) return *p;
  wrong_type(what, "a string");
}
double Value::number(const char* what) const {
  if (auto p = std::get_if<double>(&data)) return *p;
  wrong_type(what, "a number");
}
bool Value::boolean(const char* what) const {
  if (auto p = std::get_if<bool>(&data)) return *p;
  wrong_type(what, "a boolean");
}
const Value& Value::at(const std::string& key) const {
  const Object& members = object(key.c_str());
  auto found = members.find(key);
  if (found == members.end()) throw std::runtime_error("metadata lacks field '" + key + "'");
  return found->second;
}

Value parse(std::string_view text) { return Parser(text).document(); }

}  // namespace imagepiece::json
