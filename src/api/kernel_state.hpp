// What a Kernel handle points to: the cubin, the signature prepared for cheap
// per-launch checks, the launch rule, and the loaded function per device.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <cuda.h>

#include "families/family.hpp"
#include "kjit/kjit.hpp"

namespace kjit::detail {

inline constexpr int kMaxParams = 32;
inline constexpr int kMaxDevices = 64;
inline constexpr int kMaxRank = 6;
inline constexpr int kMaxLaunchRules = 4;
inline constexpr int kMaxTensorMaps = 4;  // per launch rule

// One tensor dimension's expectation: a constant, or equal to an integer argument.
struct DimCheck {
  std::int64_t value = -1;  // >= 0: constant
  int param = -1;           // >= 0: index of the integer parameter it must equal
};

struct ParamCheck {
  Param::Kind kind;
  DType dtype;
  double min, max;
  bool min_exclusive;
  std::uintptr_t alignment = 1;  // tensors: the address must be a multiple of it
  int rank = 0;
  DimCheck dims[kMaxRank];
};

// A tensor map's extents and byte strides (innermost first) for the view `view` (a
// TensorMapRule's dims) of a tensor of `elements` elements (-1: unknown) of element_bytes.
struct TensorMapGeometry {
  int rank = 0;
  std::uint64_t dims[5] = {};
  std::uint64_t strides[4] = {};  // of dims 1.. (dim 0 is contiguous)
};
TensorMapGeometry tensor_map_geometry(const std::vector<std::int64_t>& view, std::size_t element_bytes,
                                      std::int64_t elements);

struct KernelState {
  KernelInfo info;
  std::string cubin;
  std::vector<families::LaunchRule> launches;  // conditional ones first, the unconditional one last
  std::vector<ParamCheck> checks;               // one per param, built at handle creation

  // Loaded on first launch on each device; the module stays loaded with the handle.
  // functions[device][0] is published last, so the others are ready when it is.
  mutable std::array<std::array<std::atomic<CUfunction>, kMaxLaunchRules>, kMaxDevices> functions{};
  mutable std::array<CUmodule, kMaxDevices> modules{};
  mutable std::mutex load_mutex;

  KernelState(KernelInfo info, std::string cubin, std::vector<families::LaunchRule> launches);
  ~KernelState();
  CUfunction function(int device, std::size_t rule = 0) const;  // loads on first use
};

}  // namespace kjit::detail
