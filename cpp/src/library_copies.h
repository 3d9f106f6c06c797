// The process-wide set of loaded artifact libraries, one sealed private copy per digest.
//
// AOTInductor libraries define STB_GNU_UNIQUE symbols, so glibc never unmaps them (dlclose does not
// unload). Every Runtime of the same artifact therefore reuses the copy loaded first: loading the same
// artifact again and again costs no memory. A copy is closed only when no Runtime uses it *and* the
// dynamic loader has let it go, so the name /proc/self/fd/N is never reused while glibc may still
// match a loaded library by it. python/imagepiece/private_copy.py does the same for Python.
#pragma once

#include <memory>
#include <string>

#include "sealed_file.h"

namespace imagepiece::detail {

// One Runtime's use of a loaded copy; destroy it after the runners that loaded `path()`.
class LibraryLease {
 public:
  LibraryLease(std::string digest, std::string path) : digest_(std::move(digest)), path_(std::move(path)) {}
  ~LibraryLease();
  LibraryLease(const LibraryLease&) = delete;
  LibraryLease& operator=(const LibraryLease&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string digest_, path_;
};

// The process's copy of the library with `digest`: `candidate` becomes it, or is dropped in favour of
// the copy already registered (same digest, same bytes).
std::unique_ptr<LibraryLease> lease_library(const std::string& digest, SealedFile candidate);

}  // namespace imagepiece::detail
