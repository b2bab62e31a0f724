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
  int rank = 0;
  DimCheck dims[kMaxRank];
};

struct KernelState {
  KernelInfo info;
  std::string cubin;
  families::LaunchRule launch;
  std::vector<ParamCheck> checks;  // one per param, built at handle creation

  // Loaded on first launch on each device; the module stays loaded with the handle.
  mutable std::array<std::atomic<CUfunction>, kMaxDevices> functions{};
  mutable std::array<CUmodule, kMaxDevices> modules{};
  mutable std::mutex load_mutex;

  KernelState(KernelInfo info, std::string cubin, families::LaunchRule launch);
  ~KernelState();
  CUfunction function(int device) const;  // loads on first use
};

}  // namespace kjit::detail
