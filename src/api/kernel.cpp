#include <algorithm>
#include <cstdint>

#include <fmt/format.h>

#include "api/kernel_state.hpp"
#include "runtime/driver.hpp"

namespace kjit {
namespace detail {

KernelState::KernelState(KernelInfo i, std::string c, std::vector<families::LaunchRule> l)
    : info(std::move(i)), cubin(std::move(c)), launches(std::move(l)) {
  if (info.params.size() > static_cast<std::size_t>(kMaxParams))
    throw Error(ErrorCode::internal, fmt::format("{}: too many parameters", info.entry));
  if (launches.empty() || launches.size() > static_cast<std::size_t>(kMaxLaunchRules))
    throw Error(ErrorCode::internal, fmt::format("{}: {} launch rules", info.entry, launches.size()));
  for (auto& rule : launches) {
    if (rule.entry.empty()) rule.entry = info.entry;
    if (rule.tensor_maps.size() > static_cast<std::size_t>(kMaxTensorMaps))
      throw Error(ErrorCode::internal, fmt::format("{}: {} tensor maps", rule.entry, rule.tensor_maps.size()));
    for (const auto& map : rule.tensor_maps) {
      const bool tensor = map.param >= 0 && static_cast<std::size_t>(map.param) < info.params.size() &&
                          info.params[map.param].kind == Param::Kind::tensor;
      if (!tensor || map.box.size() != map.dims.size() || map.box.empty() || map.box.size() > 5 ||
          std::count(map.dims.begin(), map.dims.end(), 0) > 1)
        throw Error(ErrorCode::internal, fmt::format("{}: a tensor map does not fit its argument", rule.entry));
    }
  }
  for (const Param& p : info.params) {
    ParamCheck c{p.kind, p.dtype, p.min, p.max, p.min_exclusive};
    if (p.kind == Param::Kind::tensor) c.alignment = std::max<std::uintptr_t>(p.alignment, 1);
    c.rank = static_cast<int>(p.shape.size());
    if (c.rank > kMaxRank) throw Error(ErrorCode::internal, fmt::format("{}: rank of {} too high", info.entry, p.name));
    for (int d = 0; d < c.rank; ++d) {
      const std::string& axis = p.shape[d];
      if (!axis.empty() && std::isdigit(static_cast<unsigned char>(axis[0]))) {
        c.dims[d].value = std::stoll(axis);
      } else {
        c.dims[d].param = families::param_index(info.params, axis);
      }
    }
    checks.push_back(c);
  }
}

KernelState::~KernelState() {
  std::string why;
  if (!runtime::driver_available(&why)) return;
  const auto& d = runtime::driver();
  for (CUmodule m : modules)
    if (m) d.module_unload(m);
}

CUfunction KernelState::function(int device, std::size_t rule) const {
  if (device < 0 || device >= kMaxDevices) throw CudaError(fmt::format("device {} is out of range", device));
  auto& loaded = functions[device];
  if (loaded[0].load(std::memory_order_acquire)) return loaded[rule].load(std::memory_order_relaxed);
  std::lock_guard lock(load_mutex);
  if (loaded[0].load(std::memory_order_relaxed)) return loaded[rule].load(std::memory_order_relaxed);
  const auto& d = runtime::driver();
  CUmodule module = nullptr;
  runtime::check(d.module_load_data(&module, cubin.data()), "cuModuleLoadData");
  CUfunction fs[kMaxLaunchRules] = {};
  for (std::size_t i = 0; i < launches.size(); ++i) {
    const families::LaunchRule& l = launches[i];
    CUresult r = d.module_get_function(&fs[i], module, l.entry.c_str());
    if (r == CUDA_SUCCESS && l.dynamic_shared_bytes > 48 * 1024)
      r = d.func_set_attribute(fs[i], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(l.dynamic_shared_bytes));
    if (r != CUDA_SUCCESS) {
      d.module_unload(module);
      runtime::check(r, fmt::format("loading {}", l.entry).c_str());
    }
  }
  modules[device] = module;
  for (std::size_t i = launches.size(); i-- > 0;) loaded[i].store(fs[i], std::memory_order_release);
  return fs[rule];
}

TensorMapGeometry tensor_map_geometry(const std::vector<std::int64_t>& view, std::size_t element_bytes,
                                      std::int64_t elements) {
  TensorMapGeometry g;
  g.rank = static_cast<int>(std::min<std::size_t>(view.size(), 5));
  std::int64_t known = 1;  // the product of the given dims
  for (std::int64_t x : view) known *= x > 0 ? x : 1;
  std::uint64_t stride = element_bytes;  // bytes from one index of the dim to the next
  for (int a = 0; a < g.rank; ++a) {
    std::int64_t extent = view[a];
    // The rest: what the tensor holds, or, unknown, as far as a 47-bit address range
    // allows, at most 2^31. Empty: 1, as TMA refuses 0 (no box is read then).
    if (extent == 0)
      extent = elements >= 0 ? elements / known
                             : static_cast<std::int64_t>(std::min<std::uint64_t>(1ull << 31, (1ull << 47) / stride));
    g.dims[a] = static_cast<std::uint64_t>(std::max<std::int64_t>(extent, 1));
    if (a > 0) g.strides[a - 1] = stride;
    stride *= g.dims[a];
  }
  return g;
}

namespace {

bool dtype_matches(const DLDataType& t, DType want) {
  if (t.lanes != 1) return false;
  if (want == DType::float8_e4m3 || want == DType::float8_e5m2) {
    // DLPack 1.x has float8 codes (e4m3fn = 10, e5m2 = 12); older producers export uint8.
    return t.bits == 8 && (t.code == kDLUInt || t.code == kDLInt || t.code == (want == DType::float8_e4m3 ? 10 : 12));
  }
  DLDataType d = to_dlpack(want);
  return t.code == d.code && t.bits == d.bits;
}

bool in_range(double x, const ParamCheck& c) {
  return (c.min_exclusive ? x > c.min : x >= c.min) && x <= c.max;  // false for NaN
}

std::string describe_range(const ParamCheck& c) {
  return fmt::format("allowed {}{}, {}]", c.min_exclusive ? "(" : "[", c.min, c.max);
}

std::string describe(const DLDataType& t) { return fmt::format("(code {}, bits {}, lanes {})", t.code, t.bits, t.lanes); }

[[noreturn]] void argument_error(const KernelInfo& info, std::size_t i, const std::string& what) {
  throw ArgumentError(fmt::format("{}: argument {} ({}) {}", info.entry, i, info.params[i].name, what));
}

CUtensorMapDataType tensor_map_type(DType dtype) {
  switch (dtype) {
    case DType::float16: return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    case DType::bfloat16: return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    case DType::float32: return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
    case DType::int32: return CU_TENSOR_MAP_DATA_TYPE_INT32;
    default: return CU_TENSOR_MAP_DATA_TYPE_UINT8;  // 8-bit types are moved as bytes
  }
}

// The TMA descriptor of a tensor argument at `data` holding `elements` elements (-1: unknown).
void encode_tensor_map(CUtensorMap* map, const KernelInfo& info, const families::TensorMapRule& rule, const void* data,
                       std::int64_t elements) {
  const auto& d = runtime::driver();
  if (!d.tensor_map_encode_tiled)
    throw CudaError(fmt::format("{}: the driver lacks cuTensorMapEncodeTiled (CUDA 12 or newer)", info.entry));
  const Param& p = info.params[rule.param];
  const TensorMapGeometry g = tensor_map_geometry(rule.dims, dtype_size(p.dtype), elements);
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5], element_strides[5];
  for (int a = 0; a < g.rank; ++a) {
    dims[a] = g.dims[a];
    if (a > 0) strides[a - 1] = g.strides[a - 1];
    box[a] = rule.box[a];
    element_strides[a] = 1;
  }
  const CUresult r = d.tensor_map_encode_tiled(map, tensor_map_type(p.dtype), static_cast<cuuint32_t>(g.rank),
                                               const_cast<void*>(data), dims, strides, box, element_strides,
                                               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)  // the message is built only then: this runs on every launch
    runtime::check(r, fmt::format("{}: cuTensorMapEncodeTiled for argument {} ({})", info.entry, rule.param, p.name).c_str());
}

}  // namespace
}  // namespace detail

void Kernel::launch(std::span<const Arg> args, void* stream) const {
  using detail::kMaxParams;
  if (!state_) throw ArgumentError("launch on an empty kjit::Kernel handle");
  const detail::KernelState& s = *state_;
  const std::size_t n = s.checks.size();
  if (args.size() != n)
    throw ArgumentError(fmt::format("{}: expects {} arguments, got {}", s.info.entry, n, args.size()));

  union Value {
    const void* pointer;
    long long integer;
    float real;
  } values[kMaxParams];
  void* slots[kMaxParams + detail::kMaxTensorMaps];
  for (std::size_t i = 0; i < n; ++i) {
    const detail::ParamCheck& c = s.checks[i];
    const Arg& a = args[i];
    slots[i] = &values[i];
    switch (c.kind) {
      case Param::Kind::tensor:
        if (a.kind() == Arg::Kind::pointer) {
          values[i].pointer = a.pointer();
        } else if (a.kind() == Arg::Kind::tensor && a.tensor()) {
          const DLTensor& t = *a.tensor();
          values[i].pointer = static_cast<const char*>(t.data) + t.byte_offset;
        } else {
          detail::argument_error(s.info, i, "expects a device pointer or a DLTensor");
        }
        // A misaligned address would fault in the kernel's vector accesses (or, for an
        // element type, read torn values): say so here instead.
        if (reinterpret_cast<std::uintptr_t>(values[i].pointer) % c.alignment != 0)
          detail::argument_error(s.info, i, fmt::format("at address {} must be {}-byte aligned", values[i].pointer, c.alignment));
        break;
      case Param::Kind::integer:
        if (a.kind() != Arg::Kind::integer) detail::argument_error(s.info, i, "expects an integer");
        if (!detail::in_range(static_cast<double>(a.integer()), c))
          detail::argument_error(s.info, i, fmt::format("= {} is out of range: {}", a.integer(), detail::describe_range(c)));
        values[i].integer = a.integer();
        break;
      case Param::Kind::real: {
        double x;
        if (a.kind() == Arg::Kind::real) x = a.real();
        else if (a.kind() == Arg::Kind::integer) x = static_cast<double>(a.integer());
        else detail::argument_error(s.info, i, "expects a number");
        if (!detail::in_range(x, c))
          detail::argument_error(s.info, i, fmt::format("= {} is out of range: {}", x, detail::describe_range(c)));
        values[i].real = static_cast<float>(x);
        break;
      }
    }
  }
  // DLTensors: dtype, device, rank, constant dims and dims bound to integer arguments.
  for (std::size_t i = 0; i < n; ++i) {
    if (args[i].kind() != Arg::Kind::tensor) continue;
    const detail::ParamCheck& c = s.checks[i];
    const DLTensor& t = *args[i].tensor();
    if (!detail::dtype_matches(t.dtype, c.dtype))
      detail::argument_error(s.info, i, fmt::format("expects dtype {}, got {}", dtype_name(c.dtype), detail::describe(t.dtype)));
    if (t.device.device_type != kDLCUDA && t.device.device_type != kDLCUDAManaged)
      detail::argument_error(s.info, i, fmt::format("must be on a CUDA device (DLPack device type {})", static_cast<int>(t.device.device_type)));
    if (t.ndim != c.rank) detail::argument_error(s.info, i, fmt::format("expects rank {}, got {}", c.rank, t.ndim));
    std::int64_t expected_stride = 1;
    for (int d = c.rank - 1; d >= 0; --d) {
      const detail::DimCheck& dim = c.dims[d];
      std::int64_t want = dim.value >= 0 ? dim.value : dim.param >= 0 ? values[dim.param].integer : -1;
      if (want >= 0 && t.shape[d] != want)
        detail::argument_error(s.info, i, fmt::format("dim {} ({}) must be {}, got {}", d, s.info.params[i].shape[d], want, t.shape[d]));
      if (t.strides && t.shape[d] != 1 && t.strides[d] != expected_stride)
        detail::argument_error(s.info, i, "must be contiguous (row-major)");
      expected_stride *= t.shape[d];
    }
  }

  std::size_t rule = 0;
  while (rule + 1 < s.launches.size() && values[s.launches[rule].when_param].integer > s.launches[rule].at_most) ++rule;
  const families::LaunchRule& launch = s.launches[rule];
  unsigned grid[3];
  for (int d = 0; d < 3; ++d) {
    const families::GridDim& g = launch.grid[d];
    if (g.param < 0) {
      grid[d] = g.constant;
    } else {
      long long v = values[g.param].integer;
      long long blocks = (v + g.divisor - 1) / g.divisor * g.multiplier;
      const long long limit = d == 0 ? 0x7fffffffLL : 65535;  // CUDA's grid limits for x, and y / z
      if (blocks > limit)
        detail::argument_error(s.info, static_cast<std::size_t>(g.param),
                               fmt::format("is too large for one launch ({} blocks along grid {}, at most {})", blocks,
                                           "xyz"[d], limit));
      grid[d] = static_cast<unsigned>(blocks);
    }
  }
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return;  // nothing to do (e.g. zero rows)

  const runtime::DriverApi& d = runtime::driver();
  const int device = runtime::current_device();
  CUfunction f = s.function(device, rule);
  alignas(64) CUtensorMap maps[detail::kMaxTensorMaps];
  for (std::size_t m = 0; m < launch.tensor_maps.size(); ++m) {
    const families::TensorMapRule& map = launch.tensor_maps[m];
    const std::size_t i = static_cast<std::size_t>(map.param);
    std::int64_t elements = -1;
    if (args[i].kind() == Arg::Kind::tensor) {
      const DLTensor& t = *args[i].tensor();
      elements = 1;
      for (int a = 0; a < t.ndim; ++a) elements *= t.shape[a];
    }
    detail::encode_tensor_map(&maps[m], s.info, map, values[i].pointer, elements);
    slots[n + m] = &maps[m];
  }
  if (launch.persistent_blocks_per_sm > 0) {  // the work grid above, walked by at most k blocks per SM
    const long long work = static_cast<long long>(grid[0]) * grid[1] * grid[2];
    if (work > 0x7fffffffLL)  // the kernel counts its work items in an int
      detail::argument_error(s.info, static_cast<std::size_t>(launch.grid[2].param >= 0 ? launch.grid[2].param : 0),
                             fmt::format("is too large for one launch ({} work items, at most 2^31 - 1)", work));
    const long long blocks = static_cast<long long>(runtime::multiprocessor_count(device)) * launch.persistent_blocks_per_sm;
    grid[0] = static_cast<unsigned>(std::min(work, blocks));
    grid[1] = grid[2] = 1;
  }
  if (launch.waits_for_previous_grid && d.launch_kernel_ex) {
    CUlaunchAttribute overlap{};
    overlap.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    overlap.value.programmaticStreamSerializationAllowed = 1;
    const CUlaunchConfig config{grid[0], grid[1], grid[2], launch.block[0], launch.block[1], launch.block[2],
                                launch.dynamic_shared_bytes, static_cast<CUstream>(stream), &overlap, 1};
    runtime::check(d.launch_kernel_ex(&config, f, slots, nullptr), "cuLaunchKernelEx");
    return;
  }
  runtime::check(d.launch_kernel(f, grid[0], grid[1], grid[2], launch.block[0], launch.block[1], launch.block[2],
                                 launch.dynamic_shared_bytes, static_cast<CUstream>(stream), slots, nullptr),
                 "cuLaunchKernel");
}

int Kernel::max_blocks_per_sm() const {
  if (!state_) throw ArgumentError("max_blocks_per_sm() on an empty kjit::Kernel handle");
  const detail::KernelState& s = *state_;
  const families::LaunchRule& launch = s.launches.back();
  int blocks = 0;
  runtime::check(runtime::driver().occupancy_blocks_per_sm(&blocks, s.function(runtime::current_device(), s.launches.size() - 1),
                                                            static_cast<int>(launch.block[0] * launch.block[1] * launch.block[2]),
                                                            launch.dynamic_shared_bytes),
                 "cuOccupancyMaxActiveBlocksPerMultiprocessor");
  return blocks;
}

const KernelInfo& Kernel::info() const {
  if (!state_) throw ArgumentError("info() on an empty kjit::Kernel handle");
  return state_->info;
}

}  // namespace kjit
