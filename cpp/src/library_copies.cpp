#include "library_copies.h"

#include <dlfcn.h>

#include <map>
#include <mutex>

namespace imagepiece::detail {
namespace {

struct Entry {
  SealedFile copy;
  size_t users = 0;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, Entry> entries;  // by digest
};

// Never destroyed: a Runtime may outlive static destruction at exit.
Registry& registry() {
  static auto* instance = new Registry;
  return *instance;
}

// Whether the dynamic loader still has the library opened from `path` (RTLD_NOLOAD opens nothing).
bool still_loaded(const std::string& path) {
  void* handle = ::dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return false;
  ::dlclose(handle);
  return true;
}

void forget_unloaded(Registry& state) {
  for (auto it = state.entries.begin(); it != state.entries.end();) {
    it = it->second.users == 0 && !still_loaded(it->second.copy.path()) ? state.entries.erase(it) : std::next(it);
  }
}

}  // namespace

std::unique_ptr<LibraryLease> lease_library(const std::string& digest, SealedFile candidate) {
  Registry& state = registry();
  std::lock_guard<std::mutex> lock(state.mutex);
  forget_unloaded(state);
  candidate.unmap();  // verified: from now on only the loader maps it
  auto [entry, inserted] = state.entries.try_emplace(digest, Entry{std::move(candidate)});
  ++entry->second.users;
  return std::make_unique<LibraryLease>(digest, entry->second.copy.path());
}

LibraryLease::~LibraryLease() {
  Registry& state = registry();
  std::lock_guard<std::mutex> lock(state.mutex);
  auto found = state.entries.find(digest_);
  if (found != state.entries.end()) --found->second.users;
  forget_unloaded(state);
}

}  // namespace imagepiece::detail
