#include "sealed_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "imagepiece/runtime.h"

namespace imagepiece::detail {
namespace {

constexpr size_t kChunk = size_t{1} << 30;

[[noreturn]] void io_error(const std::string& what) {
  throw Error(ErrorCode::kLoadFailed, what + ": " + std::strerror(errno));
}

}  // namespace

SealedFile::SealedFile(const std::string& name) {
  fd_ = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd_ < 0) io_error("could not create a private in-memory copy (memfd_create)");
}

SealedFile SealedFile::copy_of(const std::string& path) {
  SealedFile copy("imagepiece:" + path.substr(path.find_last_of('/') + 1));
  const int source = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (source < 0) io_error("could not read '" + path + "'");
  while (true) {
    const ssize_t sent = ::sendfile(copy.fd_, source, nullptr, kChunk);
    if (sent < 0) {
      const int error = errno;
      ::close(source);
      errno = error;
      io_error("could not read '" + path + "'");
    }
    if (sent == 0) break;
    copy.size_ += static_cast<uint64_t>(sent);
  }
  ::close(source);
  copy.seal_and_map();
  return copy;
}

SealedFile SealedFile::slice_of(const SealedFile& other, uint64_t offset, uint64_t size, const std::string& name) {
  SealedFile copy(name);
  auto from = static_cast<off_t>(offset);
  while (copy.size_ < size) {
    const ssize_t sent = ::sendfile(copy.fd_, other.fd_, &from, std::min<uint64_t>(kChunk, size - copy.size_));
    if (sent <= 0) io_error("could not copy " + name);
    copy.size_ += static_cast<uint64_t>(sent);
  }
  copy.seal_and_map();
  return copy;
}

void SealedFile::seal_and_map() {
  // The kernel refuses F_SEAL_WRITE (EBUSY) while it still holds extra references to freshly written pages (seen
  // once in CI on a busy 2-core machine); transient, so waited out (~1 s at most), as private_copy.py does.
  constexpr int kSealAttempts = 12;
  for (int attempt = 1;; ++attempt) {
    if (::fcntl(fd_, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) == 0) break;
    if (errno != EBUSY || attempt == kSealAttempts) io_error("could not seal the private copy");
    std::this_thread::sleep_for(std::chrono::milliseconds(15 * attempt));
  }
  if (size_ == 0) return;
  void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (mapped == MAP_FAILED) io_error("could not map the private copy");
  data_ = static_cast<const char*>(mapped);
}

void SealedFile::unmap() noexcept {
  if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
  data_ = nullptr;
}

void SealedFile::release() noexcept {
  unmap();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  size_ = 0;
}

SealedFile::SealedFile(SealedFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

SealedFile& SealedFile::operator=(SealedFile&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = std::exchange(other.fd_, -1);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

SealedFile::~SealedFile() { release(); }

}  // namespace imagepiece::detail
