// A private copy of artifact bytes: an anonymous memory file (memfd) sealed against any change and
// mapped read-only. Loading `path()` (/proc/self/fd/N) opens exactly these bytes: no library search
// path, no file replaced or rewritten at the artifact's name can change what was verified.
// python/imagepiece/private_copy.py is the Python twin.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace imagepiece::detail {

class SealedFile {
 public:
  // One read of the file at `path` (throws kLoadFailed when it cannot be read).
  static SealedFile copy_of(const std::string& path);
  // `size` bytes of `other` from `offset` (the caller checked the range).
  static SealedFile slice_of(const SealedFile& other, uint64_t offset, uint64_t size, const std::string& name);

  SealedFile(SealedFile&& other) noexcept;
  SealedFile& operator=(SealedFile&& other) noexcept;
  SealedFile(const SealedFile&) = delete;
  SealedFile& operator=(const SealedFile&) = delete;
  ~SealedFile();

  std::string_view bytes() const { return {data_, static_cast<size_t>(size_)}; }
  // Drops the read-only view (bytes() is empty afterwards); the file and path() stay.
  void unmap() noexcept;
  uint64_t size() const { return size_; }
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  explicit SealedFile(const std::string& name);
  void seal_and_map();
  void release() noexcept;

  int fd_ = -1;
  const char* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace imagepiece::detail
