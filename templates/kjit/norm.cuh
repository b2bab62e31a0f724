// RMSNorm and its fused forms, one row per group of kThreads threads.
//
//   fused add:  residual <- round(input + residual);  x = residual   (else x = input)
//   norm:       y = x * rsqrt(mean(x^2) + eps) * weight             (in fp32)
//   output:     round(y) to T,  or with FP8 quantization per row:
//               scale = max(max|y| / 448, 1 / (448 * 512));  q = e4m3(y * (1 / scale))
//
// The row stays in registers between the passes, so each element is read once
// and written once. A block holds kRows rows (threadIdx.y) of kThreads threads
// (threadIdx.x); each thread moves kVec elements per access.
#pragma once

#include "kjit/common.cuh"

namespace kjit::norm {

template <typename T, int kHidden, int kVec, int kThreads, int kRows, bool kFusedAdd, bool kQuantFp8>
struct RmsNorm {
  static constexpr int kVecsPerRow = kHidden / kVec;
  static constexpr int kItems = (kVecsPerRow + kThreads - 1) / kThreads;
  static constexpr bool kExact = kVecsPerRow % kThreads == 0;  // no idle slots
  static constexpr int kWarpsPerRow = kThreads >= 32 ? kThreads / 32 : 1;
  static constexpr float kFp8Max = 448.0f;
  static_assert(kHidden % kVec == 0, "hidden size must be a multiple of the vector width");
  static_assert(kThreads <= 32 ? (32 % kThreads == 0) : (kThreads % 32 == 0), "bad row width");

  // Sum of `sum` and max of `max` over the threads of one row, in one pass;
  // every thread of the block must call it.
  static __device__ __forceinline__ void row_reduce(float& sum, float& max, float2 (*partial)[kWarpsPerRow]) {
    constexpr int kWidth = kThreads < 32 ? kThreads : 32;
    sum = group_sum<kWidth>(sum);
    if constexpr (kQuantFp8) max = group_max<kWidth>(max);
    if constexpr (kThreads > 32) {
      const int warp = threadIdx.x / 32;
      if (threadIdx.x % 32 == 0) partial[threadIdx.y][warp] = make_float2(sum, max);
      __syncthreads();
      float2 v = partial[threadIdx.y][0];
#pragma unroll
      for (int w = 1; w < kWarpsPerRow; ++w) {
        v.x += partial[threadIdx.y][w].x;
        v.y = fmaxf(v.y, partial[threadIdx.y][w].y);
      }
      sum = v.x;
      max = v.y;
    }
  }

  static __device__ __forceinline__ void run(const T* input, T* residual, const T* __restrict__ weight,
                                             T* output, unsigned char* output_fp8, float* output_scale,
                                             long long rows, float eps) {
    __shared__ float2 partial[kRows][kWarpsPerRow];
    const long long row = static_cast<long long>(blockIdx.x) * kRows + threadIdx.y;
    const bool active = row < rows;
    const long long base = row * kHidden;

    // x * w is kept (not x): the weights die before the barrier, and max |y| is
    // inv_rms * max |x * w|, so one reduction gives both the sum and the max.
    float xw[kItems][kVec];
    float sum_sq = 0.f, amax_xw = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = threadIdx.x + i * kThreads;
      const bool valid = active && (kExact || v < kVecsPerRow);
      Vec<T, kVec> in, w;
      if (valid) {
        in.load(input + base + v * kVec);
        w.load(weight + v * kVec);
        if constexpr (kFusedAdd) {
          Vec<T, kVec> res;
          res.load(residual + base + v * kVec);
#pragma unroll
          for (int j = 0; j < kVec; ++j) in[j] = from_float<T>(to_float(in[j]) + to_float(res[j]));
          in.store(residual + base + v * kVec);
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float x = valid ? to_float(in[j]) : 0.f;
        sum_sq += x * x;
        xw[i][j] = valid ? x * to_float(w[j]) : 0.f;
        if constexpr (kQuantFp8) amax_xw = fmaxf(amax_xw, fabsf(xw[i][j]));
      }
    }
    row_reduce(sum_sq, amax_xw, partial);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(kHidden) + eps);

#pragma unroll
    for (int i = 0; i < kItems; ++i)
#pragma unroll
      for (int j = 0; j < kVec; ++j) xw[i][j] *= inv_rms;  // now y

    if constexpr (!kQuantFp8) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = threadIdx.x + i * kThreads;
        if (active && (kExact || v < kVecsPerRow)) {
          Vec<T, kVec> out;
#pragma unroll
          for (int j = 0; j < kVec; ++j) out[j] = from_float<T>(xw[i][j]);
          out.store(output + base + v * kVec);
        }
      }
    } else {
      const float amax = amax_xw * inv_rms;
      const float scale = fmaxf(amax / kFp8Max, 1.0f / (kFp8Max * 512.0f));
      // One division per thread, not per element: y * (1 / scale) is within an
      // fp32 ulp of y / scale, which moves an e4m3 code only on exact near-ties.
      const float inv_scale = 1.0f / scale;
      if (active && threadIdx.x == 0) output_scale[row] = scale;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = threadIdx.x + i * kThreads;
        if (active && (kExact || v < kVecsPerRow)) {
          Vec<unsigned char, kVec> q;
          if constexpr (kVec == 1) {
            q[0] = static_cast<unsigned char>(float2_to_e4m3x2(xw[i][0] * inv_scale, 0.f) & 0xff);
          } else {
#pragma unroll
            for (int j = 0; j < kVec; j += 2) {
              unsigned short pair = float2_to_e4m3x2(xw[i][j] * inv_scale, xw[i][j + 1] * inv_scale);
              q[j] = static_cast<unsigned char>(pair & 0xff);
              q[j + 1] = static_cast<unsigned char>(pair >> 8);
            }
          }
          q.store(output_fp8 + base + v * kVec);
        }
      }
    }
  }
};

}  // namespace kjit::norm
