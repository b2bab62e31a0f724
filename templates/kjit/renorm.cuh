// Top-k / top-p thresholds found exactly by radix select, and the row rewritten:
//
//   top_k_renorm_probs:  out_i = p_i / mass(S)  for i in S, else 0
//   top_p_renorm_probs:  the same with the top-p set
//   top_k_mask_logits:   out_i = x_i for i in S, else -inf
//
// The sets are the sampling family's (tie-inclusive upper sets): S = {i : x_i >= t}.
// t is found digit by digit (8 bits a pass, 4 passes) over an order-preserving
// integer key of each value: a pass builds a 256-bin histogram (counts, or masses)
// of the entries that share the digits found so far, and keeps the lowest bin
// whose largest entry still has fewer than k entries (less than top_p of the mass)
// strictly above it. After the last digit the key is t's exact bit pattern.
// NaN and negative probabilities count as 0; NaN logits as -inf.
#pragma once

#include "kjit/common.cuh"

namespace kjit::renorm {

enum class Mode { top_k_probs, top_p_probs, top_k_logits };

// Unsigned key with the order of the floats (negatives below positives).
__device__ __forceinline__ unsigned order_key(float x) {
  const unsigned b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T, int kVocab, int kVec, int kThreads, Mode kMode>
struct Renorm {
  static constexpr int kVecsPerRow = kVocab / kVec;
  static constexpr bool kByMass = kMode == Mode::top_p_probs;
  static_assert(kVocab % kVec == 0, "vector width must divide the vocabulary");

  static __device__ __forceinline__ float value(T raw) {
    const float x = to_float(raw);
    if constexpr (kMode == Mode::top_k_logits) return x == x ? x : -__int_as_float(0x7f800000);  // NaN -> -inf
    else return x > 0.f ? x : 0.f;  // NaN, negatives -> 0
  }

  static __device__ double block_sum(double v, double* shared) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    double r = 0;
    for (int w = 0; w < kThreads / 32; ++w) r += shared[w];
    __syncthreads();
    return r;
  }

  static __device__ void run(const T* __restrict__ in, T* __restrict__ out, long long top_k, float top_p) {
    __shared__ double masses[256];    // top-p: the bins' masses
    __shared__ unsigned counts[256];  // top-k: the bins' counts (integer atomics, native and fast)
    __shared__ double sums[kThreads / 32];
    __shared__ unsigned chosen_digit;
    __shared__ double chosen_above;
    const T* row = in + static_cast<long long>(blockIdx.x) * kVocab;
    T* out_row = out + static_cast<long long>(blockIdx.x) * kVocab;

    // Top-p's limit is top_p times the row's mass: the sum of the first pass's bins, which
    // hold every entry (so no pass of its own); thread 0 selects the digits.
    double limit = static_cast<double>(top_k);
    // Entries strictly above the current prefix's range: their count (or mass).
    double above = 0;
    unsigned prefix = 0, prefix_mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += kThreads) {
        if constexpr (kByMass) masses[b] = 0;
        else counts[b] = 0;
      }
      __syncthreads();
      for (int v = threadIdx.x; v < kVecsPerRow; v += kThreads) {
        Vec<T, kVec> x;
        x.load(row + v * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float p = value(x[j]);
          const unsigned k = order_key(p);
          const bool hit = (k & prefix_mask) == prefix;
          const unsigned bin = (k >> shift) & 0xffu;
          // Lanes adding to the same bin add once: most entries of a long-tailed row share a
          // few bins, and same-address atomics of a warp serialize (a double one is a
          // compare-and-swap loop, retried by every lane that lost).
          const unsigned hits = __ballot_sync(__activemask(), hit);
          if (hit) {
            const unsigned peers = __match_any_sync(hits, bin);
            const bool leader = static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1;
            if constexpr (kByMass) {
              double mass = 0;  // the peers' values, passed along to every peer
              for (unsigned m = peers; m != 0; m &= m - 1) mass += __shfl_sync(peers, static_cast<double>(p), __ffs(m) - 1);
              if (leader) atomicAdd(&masses[bin], mass);
            } else if (leader) {
              atomicAdd(&counts[bin], __popc(peers));
            }
          }
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        if constexpr (kByMass) {
          if (shift == 24) {
            double total = 0;
            for (int b = 0; b < 256; ++b) total += masses[b];
            limit = static_cast<double>(top_p) * total;
          }
        }
        // From the top bin down: the lowest non-empty bin whose entries have less than the
        // limit strictly above its largest entry. The top non-empty bin always qualifies
        // (its entries only have `above` over them, and that is below the limit).
        double running = above;
        unsigned digit = 0;
        double digit_above = above;
        for (int b = 255; b >= 0; --b) {
          const double bin = kByMass ? masses[b] : static_cast<double>(counts[b]);
          if (bin == 0) continue;
          if (running < limit) { digit = static_cast<unsigned>(b); digit_above = running; }
          else break;
          running += bin;
        }
        chosen_digit = digit;
        chosen_above = digit_above;
      }
      __syncthreads();
      prefix |= chosen_digit << shift;
      prefix_mask |= 0xffu << shift;
      above = chosen_above;
      __syncthreads();
    }
    const float threshold = key_value(prefix);

    // The set's mass: top-p has it from the last pass (the mass above t's bin, and t's bin,
    // whose entries all equal t); top-k sums it in one more pass.
    double mass = 1.0;
    if constexpr (kByMass) mass = above + masses[prefix & 0xffu];
    if constexpr (kMode == Mode::top_k_probs) {
      double local = 0;
      for (int v = threadIdx.x; v < kVecsPerRow; v += kThreads) {
        Vec<T, kVec> x;
        x.load(row + v * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float p = value(x[j]);
          if (p >= threshold) local += p;
        }
      }
      mass = block_sum(local, sums);
    }
    const float scale = mass > 0 ? static_cast<float>(1.0 / mass) : 0.f;  // a row without mass becomes all zero
    for (int v = threadIdx.x; v < kVecsPerRow; v += kThreads) {
      Vec<T, kVec> x, y;
      x.load(row + v * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float p = value(x[j]);
        if constexpr (kMode == Mode::top_k_logits)
          y[j] = from_float<T>(p >= threshold ? p : -__int_as_float(0x7f800000));  // NaN comes out as -inf
        else
          y[j] = from_float<T>(p >= threshold && p > 0.f ? p * scale : 0.f);
      }
      y.store(out_row + v * kVec);
    }
  }
};

}  // namespace kjit::renorm
