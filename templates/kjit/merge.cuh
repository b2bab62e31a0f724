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

  // A lane group's running merge of some of a row's states: their largest lse m, the sum
  // of their weights 2^(s_i - m), and their values so weighted (kVec per lane).
  struct Partial {
    float m, weight_sum;
    float acc[kVec];
  };

  // States first, first + step, ... (< count) of a row; called by the kLanes threads of a lane group.
  // One pass, kBatch states at a time: every lse and value load of a batch is issued before
  // any is used, and the running maximum moves with the batches (a split decode merges tens
  // of states per row, and each round trip is a memory latency). An empty state (lse -inf)
  // weighs nothing; its values are loaded but never used, not even multiplied by 0.
  template <typename States>
  static __device__ __forceinline__ Partial accumulate(const States& states, int first, int step, int count, int lane) {
    constexpr int kBatch = 8;
    Partial p;
    p.m = -__int_as_float(0x7f800000);
    p.weight_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) p.acc[j] = 0.f;
    for (int base = first; base < count; base += kBatch * step) {
      float s[kBatch];
      Vec<TIn, kVec> x[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = min(base + k * step, count - 1);
        s[k] = base + k * step < count ? states.lse(i) : -__int_as_float(0x7f800000);
        x[k].load(states.values(i) + lane * kVec);
      }
      float m = p.m;
#pragma unroll
      for (int k = 0; k < kBatch; ++k) m = fmaxf(m, s[k]);
      if (m == -__int_as_float(0x7f800000)) continue;  // only empty states so far
      const float rescale = exp2f(p.m - m);               // 0 while p.m is -inf
      p.weight_sum *= rescale;
#pragma unroll
      for (int j = 0; j < kVec; ++j) p.acc[j] *= rescale;
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const float w = exp2f(s[k] - m);
        if (w == 0.f) continue;  // an empty state (or one too small to count): its values may be garbage
        p.weight_sum += w;
#pragma unroll
        for (int j = 0; j < kVec; ++j) p.acc[j] = fmaf(w, to_float(x[k][j]), p.acc[j]);
      }
      p.m = m;
    }
    return p;
  }

  static __device__ __forceinline__ void write(const Partial& p, TOut* out, float* s_out, int lane) {
    Vec<TOut, kVec> y;
    const float inv = p.weight_sum > 0.f ? 1.f / p.weight_sum : 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = from_float<TOut>(p.acc[j] * inv);
    y.store(out + lane * kVec);
    if (lane == 0 && s_out) *s_out = p.weight_sum > 0.f ? p.m + log2f(p.weight_sum) : -__int_as_float(0x7f800000);
  }

  // One output row from `count` states; called by the kLanes threads of a lane group.
  template <typename States>
  static __device__ __forceinline__ void merge_row(const States& states, int count, TOut* out, float* s_out, int lane) {
    write(accumulate(states, 0, 1, count, lane), out, s_out, lane);
  }

  // One output row by the whole block, for few rows of many states (a split decode of a
  // small batch): kGroups lane groups take every kGroups-th state, then the first group
  // combines their partials from shared memory. (With one lane group per row, the states'
  // load latencies add up: 60 states of 32 rows took 16.5 us, 6.1 with a block of 512.)
  template <int kGroups, typename States>
  static __device__ __forceinline__ void merge_row_split(const States& states, int count, TOut* out, float* s_out) {
    const int group = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    const Partial p = accumulate(states, group, kGroups, count, lane);
    __shared__ float group_m[kGroups], group_sum[kGroups];
    __shared__ float group_acc[kGroups][kHeadDim];
    if (lane == 0) {
      group_m[group] = p.m;
      group_sum[group] = p.weight_sum;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) group_acc[group][lane * kVec + j] = p.acc[j];
    __syncthreads();
    if (group != 0) return;
    Partial total;
    total.m = -__int_as_float(0x7f800000);
    total.weight_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) total.acc[j] = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total.m = fmaxf(total.m, group_m[g]);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      if (group_sum[g] == 0.f) continue;  // no states, or only empty ones
      const float w = exp2f(group_m[g] - total.m);
      total.weight_sum = fmaf(w, group_sum[g], total.weight_sum);
#pragma unroll
      for (int j = 0; j < kVec; ++j) total.acc[j] = fmaf(w, group_acc[g][lane * kVec + j], total.acc[j]);
    }
    write(total, out, s_out, lane);
  }
};

}  // namespace kjit::attention
