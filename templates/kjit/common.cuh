// Small device helpers every kjit kernel uses: element conversion, vectors of
// elements moved as one 2/4/8/16-byte access, and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace kjit {

template <typename T> struct Element;
template <> struct Element<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct Element<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <> struct Element<__nv_fp8_e4m3> {
  static __device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
  static __device__ __forceinline__ __nv_fp8_e4m3 from_float(float x) { return __nv_fp8_e4m3(x); }  // saturating
};

template <typename T> __device__ __forceinline__ float to_float(T x) { return Element<T>::to_float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return Element<T>::from_float(x); }

// N elements loaded or stored with one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T data[N];

  __device__ __forceinline__ void load(const T* p) { *this = *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
  __device__ __forceinline__ T& operator[](int i) { return data[i]; }
  __device__ __forceinline__ const T& operator[](int i) const { return data[i]; }
};

// The elements of a vector as floats; fp8 e4m3 two at a time (one cvt per pair).
template <typename T, int N>
__device__ __forceinline__ void to_floats(const Vec<T, N>& x, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(x[i]);
}
template <int N>
__device__ __forceinline__ void to_floats(const Vec<__nv_fp8_e4m3, N>& x, float (&out)[N]) {
  static_assert(N % 2 == 0, "fp8 pairs");
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(*reinterpret_cast<const __nv_fp8x2_storage_t*>(&x.data[i]), __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    out[i] = f.x;
    out[i + 1] = f.y;
  }
}

// Sum / max over groups of `kWidth` consecutive lanes (a power of two <= 32).
template <int kWidth = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <int kWidth = 32>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Programmatic dependent launch (sm_90). A kernel launched to overlap the one before it in
// its stream calls wait_for_previous_grid before its first read: it returns once that kernel
// has finished and its writes are visible (at once without the overlap). A kernel calls
// allow_next_grid when the next kernel's blocks may take free slots and start waiting.
__device__ __forceinline__ void wait_for_previous_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Two float values -> two fp8 e4m3 codes (round to nearest even, saturating to +-448).
__device__ __forceinline__ unsigned short float2_to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

}  // namespace kjit
