// Merging attention states (cascade attention, split KV): partial outputs v_i over
// disjoint parts of the keys, each with its base-2 log-sum-exp s_i, combine into the
// output over all the keys:
//   s = log2(sum_i 2^s_i),   v = sum_i 2^(s_i - s) v_i.
// A state with s_i = -inf (no keys) weighs nothing; if every state is empty the
// result is v = 0, s = -inf.
#pragma once

#include "kjit/common.cuh"

namespace kjit::attention {

template <typename TIn, typename TOut, int kHeadDim, int kVec>
struct MergeStates {
  static constexpr int kLanes = kHeadDim / kVec;  // threads per state row
  static_assert(kHeadDim % kVec == 0 && 32 % kLanes == 0, "a row must fit one warp evenly");

  // State i of a row at v + i * v_stride (elements), its lse at s + i * s_stride.
  struct Strided {
    const TIn* v;
    long long v_stride;
    const float* s;
    long long s_stride;
    __device__ __forceinline__ const TIn* values(int i) const { return v + i * v_stride; }
    __device__ __forceinline__ float lse(int i) const { return s[i * s_stride]; }
  };
  // Two states in separate tensors.
  struct Pair {
    const TIn* v[2];
    const float* s[2];
    __device__ __forceinline__ const TIn* values(int i) const { return v[i]; }
    __device__ __forceinline__ float lse(int i) const { return *s[i]; }
  };

  // One output row from `count` states; called by the kLanes threads of a lane group.
  template <typename States>
  static __device__ __forceinline__ void merge_row(const States& states, int count, TOut* out, float* s_out, int lane) {
    float m = -__int_as_float(0x7f800000);
#pragma unroll 8
    for (int i = 0; i < count; ++i) m = fmaxf(m, states.lse(i));
    float acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
    float weight_sum = 0.f;
    if (m != -__int_as_float(0x7f800000)) {
      // kBatch states at a time, all loads issued first: a split decode merges up to
      // hundreds of states per row, and one load at a time would serialize latencies.
      constexpr int kBatch = 4;
      for (int first = 0; first < count; first += kBatch) {
        float w[kBatch];
        Vec<TIn, kVec> x[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          w[k] = first + k < count ? exp2f(states.lse(first + k) - m) : 0.f;
          if (w[k] > 0.f) x[k].load(states.values(first + k) + lane * kVec);  // an empty state's values are never read
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          if (w[k] == 0.f) continue;
          weight_sum += w[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] = fmaf(w[k], to_float(x[k][j]), acc[j]);
        }
      }
    }
    Vec<TOut, kVec> y;
    const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = from_float<TOut>(acc[j] * inv);
    y.store(out + lane * kVec);
    if (lane == 0 && s_out) *s_out = weight_sum > 0.f ? m + log2f(weight_sum) : -__int_as_float(0x7f800000);
  }
};

}  // namespace kjit::attention
