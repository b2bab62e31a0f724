// The CUDA driver API, loaded with dlopen on first use, so that kjit starts on
// machines without a GPU and says what is missing only when a GPU is needed.
// Contexts: each device's primary context (what the CUDA runtime and PyTorch use).
#pragma once

#include <cstddef>
#include <string>

#include <cuda.h>

namespace kjit::runtime {

struct DriverApi {
  decltype(&::cuInit) init;
  decltype(&::cuDriverGetVersion) driver_version;
  decltype(&::cuGetErrorName) error_name;
  decltype(&::cuGetErrorString) error_string;
  decltype(&::cuDeviceGetCount) device_count;
  decltype(&::cuDeviceGet) device_get;
  decltype(&::cuDeviceGetName) device_name;
  decltype(&::cuDeviceGetAttribute) device_attribute;
  decltype(&::cuDeviceTotalMem_v2) device_memory;
  decltype(&::cuDevicePrimaryCtxRetain) primary_retain;
  decltype(&::cuCtxGetCurrent) ctx_get_current;
  decltype(&::cuCtxSetCurrent) ctx_set_current;
  decltype(&::cuCtxGetDevice) ctx_get_device;
  decltype(&::cuCtxSynchronize) ctx_synchronize;
  decltype(&::cuModuleLoadData) module_load_data;
  decltype(&::cuModuleUnload) module_unload;
  decltype(&::cuModuleGetFunction) module_get_function;
  decltype(&::cuFuncGetAttribute) func_get_attribute;
  decltype(&::cuFuncSetAttribute) func_set_attribute;
  decltype(&::cuLaunchKernel) launch_kernel;
  decltype(&::cuLaunchKernelEx) launch_kernel_ex;  // null on drivers before CUDA 12
  decltype(&::cuTensorMapEncodeTiled) tensor_map_encode_tiled;  // null on drivers before CUDA 12
  decltype(&::cuOccupancyMaxActiveBlocksPerMultiprocessor) occupancy_blocks_per_sm;
  decltype(&::cuMemAlloc_v2) mem_alloc;
  decltype(&::cuMemFree_v2) mem_free;
  decltype(&::cuMemcpyHtoD_v2) memcpy_htod;
  decltype(&::cuMemcpyDtoH_v2) memcpy_dtoh;
  decltype(&::cuMemcpyDtoD_v2) memcpy_dtod;
  decltype(&::cuMemsetD8_v2) memset_d8;
  decltype(&::cuStreamSynchronize) stream_synchronize;
  decltype(&::cuEventCreate) event_create;
  decltype(&::cuEventDestroy_v2) event_destroy;
  decltype(&::cuEventRecord) event_record;
  decltype(&::cuEventSynchronize) event_synchronize;
  decltype(&::cuEventElapsedTime_v2) event_elapsed;
};

// Loaded and initialized driver; UnavailableError says why not (no libcuda,
// cuInit failed, no device).
const DriverApi& driver();
bool driver_available(std::string* why = nullptr);

// Throws CudaError("<what>: CUDA_ERROR_X (description)") unless r is CUDA_SUCCESS.
void check(CUresult r, const char* what);

int device_count();

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  std::size_t memory_bytes = 0;
};
DeviceInfo device_info(int ordinal);
// The device's SM count, queried once per device (the launch path reads it).
int multiprocessor_count(int ordinal);

// The device of the calling thread's current context; with none current, makes
// device 0's primary context current (as the CUDA runtime would) and returns 0.
int current_device();

// Makes device `ordinal`'s primary context current on this thread.
void use_device(int ordinal);

// sm_XY for a device, with the "a" suffix where the arch-specific features
// (wgmma, setmaxnreg, tcgen05) exist: sm_90a, sm_100a.
std::string device_arch(int ordinal);

}  // namespace kjit::runtime
