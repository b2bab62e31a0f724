#include "runtime/driver.hpp"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

#include <fmt/format.h>

#include "kjit/kjit.hpp"

namespace kjit::runtime {
namespace {

struct Loaded {
  DriverApi api{};
  std::string error;
};

const Loaded& loaded() {
  static const Loaded instance = [] {
    Loaded l;
    void* h = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      l.error = "no CUDA driver: libcuda.so.1 could not be loaded (is an NVIDIA driver installed?)";
      return l;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(h, name));
      if (!fn && l.error.empty()) l.error = fmt::format("libcuda.so.1 lacks {} (driver too old?)", name);
    };
    DriverApi& a = l.api;
    sym(a.init, "cuInit");
    sym(a.driver_version, "cuDriverGetVersion");
    sym(a.error_name, "cuGetErrorName");
    sym(a.error_string, "cuGetErrorString");
    sym(a.device_count, "cuDeviceGetCount");
    sym(a.device_get, "cuDeviceGet");
    sym(a.device_name, "cuDeviceGetName");
    sym(a.device_attribute, "cuDeviceGetAttribute");
    sym(a.device_memory, "cuDeviceTotalMem_v2");
    sym(a.primary_retain, "cuDevicePrimaryCtxRetain");
    sym(a.ctx_get_current, "cuCtxGetCurrent");
    sym(a.ctx_set_current, "cuCtxSetCurrent");
    sym(a.ctx_get_device, "cuCtxGetDevice");
    sym(a.ctx_synchronize, "cuCtxSynchronize");
    sym(a.module_load_data, "cuModuleLoadData");
    sym(a.module_unload, "cuModuleUnload");
    sym(a.module_get_function, "cuModuleGetFunction");
    sym(a.func_get_attribute, "cuFuncGetAttribute");
    sym(a.func_set_attribute, "cuFuncSetAttribute");
    sym(a.occupancy_blocks_per_sm, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    sym(a.launch_kernel, "cuLaunchKernel");
    a.launch_kernel_ex = reinterpret_cast<decltype(a.launch_kernel_ex)>(::dlsym(h, "cuLaunchKernelEx"));  // optional
    a.tensor_map_encode_tiled =
        reinterpret_cast<decltype(a.tensor_map_encode_tiled)>(::dlsym(h, "cuTensorMapEncodeTiled"));  // optional
    sym(a.mem_alloc, "cuMemAlloc_v2");
    sym(a.mem_free, "cuMemFree_v2");
    sym(a.memcpy_htod, "cuMemcpyHtoD_v2");
    sym(a.memcpy_dtoh, "cuMemcpyDtoH_v2");
    sym(a.memcpy_dtod, "cuMemcpyDtoD_v2");
    sym(a.memset_d8, "cuMemsetD8_v2");
    sym(a.stream_synchronize, "cuStreamSynchronize");
    sym(a.event_create, "cuEventCreate");
    sym(a.event_destroy, "cuEventDestroy_v2");
    sym(a.event_record, "cuEventRecord");
    sym(a.event_synchronize, "cuEventSynchronize");
    sym(a.event_elapsed, "cuEventElapsedTime_v2");
    if (!l.error.empty()) return l;
    CUresult r = a.init(0);
    if (r != CUDA_SUCCESS) {
      const char* name = "?";
      a.error_name(r, &name);
      l.error = fmt::format("the CUDA driver is present but cuInit failed: {} (no usable GPU?)", name);
      return l;
    }
    int n = 0;
    if (a.device_count(&n) != CUDA_SUCCESS || n == 0) l.error = "the CUDA driver reports no GPU";
    return l;
  }();
  return instance;
}

}  // namespace

const DriverApi& driver() {
  const Loaded& l = loaded();
  if (!l.error.empty()) throw UnavailableError(l.error);
  return l.api;
}

bool driver_available(std::string* why) {
  const Loaded& l = loaded();
  if (why) *why = l.error;
  return l.error.empty();
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const Loaded& l = loaded();
  const char* name = "CUDA_ERROR_UNKNOWN";
  const char* text = "";
  if (l.api.error_name) l.api.error_name(r, &name);
  if (l.api.error_string) l.api.error_string(r, &text);
  throw CudaError(fmt::format("{} failed: {} ({})", what, name, text));
}

int device_count() {
  int n = 0;
  check(driver().device_count(&n), "cuDeviceGetCount");
  return n;
}

DeviceInfo device_info(int ordinal) {
  const DriverApi& d = driver();
  CUdevice dev;
  check(d.device_get(&dev, ordinal), "cuDeviceGet");
  DeviceInfo info;
  info.ordinal = ordinal;
  char name[256] = {};
  check(d.device_name(name, sizeof name, dev), "cuDeviceGetName");
  info.name = name;
  check(d.device_attribute(&info.major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute");
  check(d.device_attribute(&info.minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute");
  check(d.device_attribute(&info.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
  check(d.device_memory(&info.memory_bytes, dev), "cuDeviceTotalMem");
  return info;
}

int multiprocessor_count(int ordinal) {
  static std::atomic<int> counts[64] = {};
  if (ordinal < 0 || ordinal >= 64) throw CudaError(fmt::format("device ordinal {} is out of range", ordinal));
  int n = counts[ordinal].load(std::memory_order_relaxed);
  if (n == 0) {
    CUdevice dev;
    check(driver().device_get(&dev, ordinal), "cuDeviceGet");
    check(driver().device_attribute(&n, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
    counts[ordinal].store(n, std::memory_order_relaxed);
  }
  return n;
}

void use_device(int ordinal) {
  static std::mutex mutex;
  static CUcontext contexts[64] = {};
  if (ordinal < 0 || ordinal >= 64) throw CudaError(fmt::format("device ordinal {} is out of range", ordinal));
  const DriverApi& d = driver();
  CUcontext ctx;
  {
    std::lock_guard lock(mutex);
    if (!contexts[ordinal]) {
      CUdevice dev;
      check(d.device_get(&dev, ordinal), "cuDeviceGet");
      check(d.primary_retain(&contexts[ordinal], dev), "cuDevicePrimaryCtxRetain");  // kept for the process
    }
    ctx = contexts[ordinal];
  }
  check(d.ctx_set_current(ctx), "cuCtxSetCurrent");
}

int current_device() {
  const DriverApi& d = driver();
  // The launch path calls this: one driver call when the context is the last one seen.
  thread_local CUcontext last_context = nullptr;
  thread_local int last_device = 0;
  CUcontext ctx = nullptr;
  check(d.ctx_get_current(&ctx), "cuCtxGetCurrent");
  if (!ctx) {
    use_device(0);
    return 0;
  }
  if (ctx == last_context) return last_device;
  CUdevice dev;
  check(d.ctx_get_device(&dev), "cuCtxGetDevice");
  last_context = ctx;
  last_device = static_cast<int>(dev);
  return last_device;
}

std::string device_arch(int ordinal) {
  DeviceInfo info = device_info(ordinal);
  bool arch_specific = (info.major == 9 && info.minor == 0) || (info.major == 10 && info.minor == 0);
  return fmt::format("sm_{}{}{}", info.major, info.minor, arch_specific ? "a" : "");
}

}  // namespace kjit::runtime
