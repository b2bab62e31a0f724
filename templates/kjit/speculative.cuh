// Chain speculative sampling: one block per request.
//
// For draft position i = 0 .. n-1, with draft token d, draft probability q = q_i(d)
// and target probability p = p_i(d): accept d when u * q < p (u uniform in [0, 1),
// i.e. with probability min(1, p / q)); otherwise emit a token drawn from the
// residual max(0, p_i - q_i), normalized, and stop. If all n are accepted, emit a
// bonus token drawn from p_n. Each emitted token is then distributed as the target.
// Outputs: tokens [n + 1] (emitted tokens, then -1) and the count of accepted draft
// tokens. A residual without mass (p_i == q_i) falls back to p_i itself.
// Draws use the same two-level exponential race as the sampling kernels.
#pragma once

#include "kjit/common.cuh"
#include "kjit/philox.cuh"

namespace kjit::speculative {

template <typename T, int kVocab, int kVec, int kThreads>
struct ChainSampler {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kVecsPerRow = kVocab / kVec;
  static constexpr int kNone = 0x7fffffff;

  static __device__ __forceinline__ float clean(float p) { return p > 0.f ? p : 0.f; }

  // weight(i) of the residual max(0, p - q) (or of p alone when use_target_only).
  static __device__ __forceinline__ float weight(const T* p, const T* q, int i, bool target_only) {
    const float pt = clean(to_float(p[i]));
    if (target_only) return pt;
    return fmaxf(pt - clean(to_float(q[i])), 0.f);
  }

  // A token with probability proportional to weight; kNone if every weight is 0.
  static __device__ int draw(const T* p, const T* q, bool target_only, random::Philox4x32 philox, unsigned stream,
                             float* shared_key, int* shared_index) {
    double chunk = 0;
    for (int v = threadIdx.x; v < kVecsPerRow; v += kThreads)
#pragma unroll
      for (int j = 0; j < kVec; ++j) chunk += weight(p, q, v * kVec + j, target_only);
    // Chunk race.
    philox.counter.x = threadIdx.x;
    philox.counter.z = stream;
    float key = __int_as_float(0x7f800000);
    int owner = kNone;
    if (chunk > 0) { key = static_cast<float>(random::exponential(philox().x) / chunk); owner = threadIdx.x; }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const float k2 = __shfl_xor_sync(0xffffffffu, key, o);
      const int i2 = __shfl_xor_sync(0xffffffffu, owner, o);
      if (k2 < key || (k2 == key && i2 < owner)) { key = k2; owner = i2; }
    }
    if (threadIdx.x % 32 == 0) { shared_key[threadIdx.x / 32] = key; shared_index[threadIdx.x / 32] = owner; }
    __syncthreads();
    if (threadIdx.x < 32) {
      key = threadIdx.x < kWarps ? shared_key[threadIdx.x] : __int_as_float(0x7f800000);
      owner = threadIdx.x < kWarps ? shared_index[threadIdx.x] : kNone;
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
        const float k2 = __shfl_xor_sync(0xffffffffu, key, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, owner, o);
        if (k2 < key || (k2 == key && i2 < owner)) { key = k2; owner = i2; }
      }
      // Element race inside the winning chunk (warp 0).
      float best_key = __int_as_float(0x7f800000);
      int best = kNone;
      if (owner != kNone) {
        philox.counter.z = stream + 1u;
        for (int v = owner + static_cast<int>(threadIdx.x) * kThreads; v < kVecsPerRow; v += 32 * kThreads) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const int i = v * kVec + j;
            const float w = weight(p, q, i, target_only);
            if (w > 0.f) {
              philox.counter.x = static_cast<unsigned>(i);
              const float k = random::exponential(philox().x) / w;
              if (k < best_key || (k == best_key && i < best)) { best_key = k; best = i; }
            }
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
        const float k2 = __shfl_xor_sync(0xffffffffu, best_key, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, best, o);
        if (k2 < best_key || (k2 == best_key && i2 < best)) { best_key = k2; best = i2; }
      }
      if (threadIdx.x == 0) shared_index[0] = best;
    }
    __syncthreads();
    const int token = shared_index[0];
    __syncthreads();
    return token;
  }

  static __device__ void run(const T* __restrict__ draft_probs, const int* __restrict__ draft_tokens,
                             const T* __restrict__ target_probs, int* __restrict__ output_tokens,
                             int* __restrict__ accepted_count, int num_draft, unsigned long long seed,
                             unsigned long long offset) {
    __shared__ float shared_key[kWarps];
    __shared__ int shared_index[kWarps];
    const long long request = blockIdx.x;
    random::Philox4x32 philox;
    philox.key = make_uint2(static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32) ^ static_cast<unsigned>(offset >> 32));
    philox.counter = make_uint4(0, static_cast<unsigned>(request), 0, static_cast<unsigned>(offset));

    int* out = output_tokens + request * (num_draft + 1);
    int emitted = 0;
    bool stopped = false;
    for (int i = 0; i < num_draft && !stopped; ++i) {
      const T* q = draft_probs + (request * num_draft + i) * kVocab;
      const T* p = target_probs + (request * (num_draft + 1) + i) * kVocab;
      const int d = draft_tokens[request * num_draft + i];
      const bool valid = d >= 0 && d < kVocab;
      // Acceptance: one uniform per position (stream 3i), the same in every thread.
      random::Philox4x32 accept = philox;
      accept.counter.x = 0xffffffffu;
      accept.counter.z = 4u * static_cast<unsigned>(i);
      const float u = static_cast<float>(accept().x >> 8) * (1.0f / 16777216.0f);
      const float pd = valid ? clean(to_float(p[d])) : 0.f;
      const float qd = valid ? clean(to_float(q[d])) : 0.f;
      if (valid && u * qd < pd) {
        if (threadIdx.x == 0) out[i] = d;
        ++emitted;
        continue;
      }
      int token = draw(p, q, false, philox, 4u * i + 1u, shared_key, shared_index);
      if (token == kNone) token = draw(p, q, true, philox, 4u * i + 3u, shared_key, shared_index);
      if (threadIdx.x == 0) out[i] = token == kNone ? 0 : token;
      stopped = true;
    }
    if (!stopped) {  // every draft accepted: the bonus token from the last target distribution
      const T* p = target_probs + (request * (num_draft + 1) + num_draft) * kVocab;
      const int token = draw(p, p, true, philox, 4u * num_draft + 1u, shared_key, shared_index);
      if (threadIdx.x == 0) out[num_draft] = token == kNone ? 0 : token;
    }
    if (threadIdx.x == 0) {
      for (int j = emitted + 1; j <= num_draft; ++j) out[j] = -1;
      accepted_count[request] = emitted;
    }
  }
};

}  // namespace kjit::speculative
