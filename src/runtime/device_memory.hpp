// A device allocation owned by one object (benchmarks and tests; the library
// itself never allocates device memory).
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "runtime/driver.hpp"

namespace kjit::runtime {

class DeviceMemory {
 public:
  explicit DeviceMemory(std::size_t bytes) : bytes_(bytes) {
    check(driver().mem_alloc(&ptr_, std::max<std::size_t>(bytes, 256)), "cuMemAlloc");
  }
  ~DeviceMemory() {
    if (ptr_) driver().mem_free(ptr_);
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = 0; }

  CUdeviceptr address() const { return ptr_; }
  void* get() const { return reinterpret_cast<void*>(ptr_); }
  std::size_t bytes() const { return bytes_; }

  void upload(const void* host) { check(driver().memcpy_htod(ptr_, host, bytes_), "cuMemcpyHtoD"); }
  void download(void* host) const { check(driver().memcpy_dtoh(host, ptr_, bytes_), "cuMemcpyDtoH"); }
  void fill(unsigned char byte) { check(driver().memset_d8(ptr_, byte, bytes_), "cuMemsetD8"); }
  template <class T>
  std::vector<T> download_as() const {
    std::vector<T> out(bytes_ / sizeof(T));
    download(out.data());
    return out;
  }

 private:
  CUdeviceptr ptr_ = 0;
  std::size_t bytes_ = 0;
};

}  // namespace kjit::runtime
