// Batch decode over a paged KV cache: one query token per request, every query
// head of a GQA group read against its KV head's pages once.
//
// Block (chunk, request, head group): the request's KV tokens in
// [start + chunk * chunk_size, + chunk_size), for kHeads query heads that share one
// KV head. kLanes threads hold one token's row, 8 elements each (16 bytes; 8 bytes of fp8
// e4m3 KV), so a block of 128 threads has 128 / kLanes token slots; each slot runs its own
// online softmax over its tokens (kUnroll tokens per step), and the slots are merged
// through shared memory at the end. The kernel is bound by bytes in flight: each thread
// copies the K/V pieces it will use kStages - 1 steps ahead with cp.async into its own part
// of shared memory (no barrier needed), and loads the page indices one step before that.
//
// fp8 KV is dequantized by two scalars: k_scale folds into the query's scale and
// v_scale into the output.
// Scores are kept in the log2 domain: s = log2(e) * sm_scale * q.k, or with a soft
// cap c: s = log2(e) * c * tanh(sm_scale * q.k / c). The log-sum-exp written out is
// base 2 (FlashInfer's convention): lse = log2(sum_t 2^s_t). A request or chunk with
// no tokens gives o = 0 and lse = -inf.
// With several chunks the block writes float partial (o, lse) to
// [request, chunk, head] and merge_states combines them.
#pragma once

#include "kjit/common.cuh"
#include "kjit/mma.cuh"  // cp.async helpers
#include "kjit/paged_kv.cuh"

namespace kjit::attention {

constexpr int bits_of(int n) { return n <= 1 ? 0 : 1 + bits_of(n / 2); }  // floor(log2(n))

// The online-softmax states a decode block ends with, one per slot (a part of the block's
// tokens) and head, in shared memory: base-2 reference maxima m, sums l and unnormalized
// outputs acc. write_out merges the slots of each head and writes o (or, with the KV split
// in num_chunks > 1 chunks, the chunk's float partial state for merge_states) and lse.
template <int kSlots, int kHeads, int kHeadDim>
struct SlotStates {
  float m[kSlots][kHeads];
  float l[kSlots][kHeads];
  float acc[kSlots][kHeads][kHeadDim];

  template <int kThreads, int kQoHeads, bool kLse, typename TQ>
  __device__ __forceinline__ void write_out(int b, int chunk, int head0, int num_chunks, float v_scale, TQ* __restrict__ o,
                                            float* __restrict__ lse, float* __restrict__ partial_o,
                                            float* __restrict__ partial_lse) const {
    const float kNegInf = -__int_as_float(0x7f800000);
    for (int e = threadIdx.x; e < kHeads * kHeadDim; e += kThreads) {
      const int h = e / kHeadDim, d = e % kHeadDim;
      float m_all = kNegInf;
#pragma unroll
      for (int sl = 0; sl < kSlots; ++sl) m_all = fmaxf(m_all, m[sl][h]);
      float l_all = 0.f, o_all = 0.f;
      if (m_all != kNegInf) {
#pragma unroll
        for (int sl = 0; sl < kSlots; ++sl) {
          const float w = exp2f(m[sl][h] - m_all);
          l_all = fmaf(l[sl][h], w, l_all);
          o_all = fmaf(acc[sl][h][d], w, o_all);
        }
      }
      const float out = l_all > 0.f ? o_all / l_all * v_scale : 0.f;
      const float out_lse = l_all > 0.f ? m_all + log2f(l_all) : kNegInf;
      const long long head = head0 + h;
      if (num_chunks > 1) {
        const long long row = (static_cast<long long>(b) * num_chunks + chunk) * kQoHeads + head;
        partial_o[row * kHeadDim + d] = out;
        if (d == 0) partial_lse[row] = out_lse;
      } else {
        const long long row = static_cast<long long>(b) * kQoHeads + head;
        o[row * kHeadDim + d] = from_float<TQ>(out);
        if constexpr (kLse)
          if (d == 0) lse[row] = out_lse;
      }
    }
  }
};

template <typename TQ, typename TKV, int kHeadDim, int kQoHeads, int kKvHeads, int kHeads, paged_kv::Layout kLayout,
          int kPageSize, bool kCombined, bool kSoftCap, int kWindow, bool kLse, int kStages>
struct BatchDecode {
  using Cache = paged_kv::PagedKv<kLayout, kPageSize, kKvHeads, kHeadDim, kCombined>;
  static constexpr int kGroup = kQoHeads / kKvHeads;
  static constexpr int kBlocksPerKvHead = kGroup / kHeads;
  static constexpr int kVec = 8;  // elements per thread per token
  static constexpr int kPieceBytes = kVec * static_cast<int>(sizeof(TKV));
  static constexpr int kLanes = kHeadDim / kVec;  // threads per token row
  static constexpr int kThreads = 128;
  static constexpr int kMinBlocksPerSm = 1;  // (registers as the compiler likes; four blocks fit at d128)
  static constexpr int kSlots = kThreads / kLanes;
  static constexpr int kUnroll = 4;
  static constexpr int kTile = kSlots * kUnroll;  // tokens per step of the block
  // Dynamic shared memory: the copy stages, reused for merging the slots at the end.
  static constexpr int kStageBytes = kStages * kUnroll * 2 * kThreads * kPieceBytes;
  static constexpr float kLog2e = 1.4426950408889634f;
  // A step's scores: kScores lane-partial dots per thread, e = u * kHeadSlots + h (heads
  // padded to a power of two). The token row's lanes reduce them transposed: each lane ends
  // up owning kOwned full sums (the lane's top two bits are u), so the softmax runs once per
  // score instead of on every lane.
  static constexpr int kHeadSlots = 1 << bits_of(2 * kHeads - 1);
  static constexpr int kScores = kUnroll * kHeadSlots;
  static constexpr int kLaneBits = bits_of(kLanes);
  static constexpr int kScoreBits = bits_of(kScores);
  static constexpr int kOwned = kScores > kLanes ? kScores / kLanes : 1;
  static_assert(kStages >= 2, "one step copied while another is used");
  static_assert(kQoHeads % kKvHeads == 0 && kGroup % kHeads == 0, "heads per block must divide the group");
  static_assert(kHeadDim % kVec == 0 && kLanes <= 32 && 32 % kLanes == 0, "a token row must fit one warp");
  static_assert(kUnroll == 4 && (1 << kLaneBits) == kLanes && kLaneBits >= 2, "u is a score's top two bits and a lane's");

  using Shared = SlotStates<kSlots, kHeads, kHeadDim>;
  static constexpr int kSharedBytes = kStageBytes > static_cast<int>(sizeof(Shared)) ? kStageBytes : static_cast<int>(sizeof(Shared));

  // The lane (of a token row's kLanes) that owns score e after the transposed reduction,
  // and where e sits among that lane's kOwned values.
  static __device__ __forceinline__ constexpr int owner_lane(int e) {
    return kScores >= kLanes ? e >> (kScoreBits - kLaneBits) : e << (kLaneBits - kScoreBits);
  }
  static __device__ __forceinline__ constexpr int owner_slot(int e) { return kScores >= kLanes ? e & (kOwned - 1) : 0; }

  // Sums v over the token row's lanes, transposed: at each level a lane keeps half of its
  // values and adds its partner's half, so kScores sums take about kScores shuffles
  // (kScores * kLaneBits one by one). v[0, kOwned) ends up holding the lane's scores.
  template <int kLevel = 0>
  static __device__ __forceinline__ void reduce_transposed(float (&v)[kScores], int lane) {
    if constexpr (kLevel < kLaneBits) {
      constexpr int kOffset = kLanes >> (kLevel + 1);
      constexpr int kHeld = kScores >> kLevel;  // values still held (while more than one)
      if constexpr (kHeld > 1) {
        const bool upper = (lane & kOffset) != 0;
#pragma unroll
        for (int k = 0; k < kHeld / 2; ++k) {
          const float low = v[k], high = v[k + kHeld / 2];
          v[k] = (upper ? high : low) + __shfl_xor_sync(0xffffffffu, upper ? low : high, kOffset);
        }
      } else {
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOffset);
      }
      reduce_transposed<kLevel + 1>(v, lane);
    }
  }

  // The maximum (or sum) over the four lanes that own the same head's scores for u = 0..3.
  static __device__ __forceinline__ float max_over_tokens(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, kLanes / 2));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, kLanes / 4));
  }
  static __device__ __forceinline__ float sum_over_tokens(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, kLanes / 2);
    return v + __shfl_xor_sync(0xffffffffu, v, kLanes / 4);
  }

  static __device__ void run(const TQ* __restrict__ q, const TKV* __restrict__ k_cache, const TKV* __restrict__ v_cache,
                             const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
                             const int* __restrict__ kv_last_page_len, TQ* __restrict__ o, float* __restrict__ lse,
                             float* __restrict__ partial_o, float* __restrict__ partial_lse, int num_chunks, int chunk_size,
                             float sm_scale, float soft_cap, float k_scale, float v_scale) {
    const int chunk = blockIdx.x, b = blockIdx.y;
    const int kv_head = blockIdx.z / kBlocksPerKvHead;
    const int head0 = kv_head * kGroup + static_cast<int>(blockIdx.z % kBlocksPerKvHead) * kHeads;
    const int lane = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
    const int len = Cache::length(kv_indptr, kv_last_page_len, b);
    const int first_page = kv_indptr[b];
    const int begin = kWindow > 0 ? max(0, len - kWindow) : 0;
    const int start = begin + chunk * chunk_size;
    // The last chunk runs to the end, so a plan made for shorter requests still
    // covers every token (only the balance suffers).
    const int end = chunk == num_chunks - 1 ? len : min(len, start + chunk_size);

    // The query, scaled so that q.k is the log2-domain score (or tanh's argument).
    const float q_scale = (kSoftCap ? sm_scale / soft_cap : sm_scale * kLog2e) * k_scale;
    float qr[kHeads][kVec];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      Vec<TQ, kVec> x;
      x.load(q + (static_cast<long long>(b) * kQoHeads + head0 + h) * kHeadDim + lane * kVec);
#pragma unroll
      for (int i = 0; i < kVec; ++i) qr[h][i] = to_float(x[i]) * q_scale;
    }

    // Softmax state of the owned scores' heads (every lane of a head's four has the same
    // m; l is this lane's part), and the output of every head.
    float m_owned[kOwned], l_owned[kOwned], acc[kHeads][kVec];
#pragma unroll
    for (int k = 0; k < kOwned; ++k) {
      m_owned[k] = -__int_as_float(0x7f800000);
      l_owned[k] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h)
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[h][i] = 0.f;

    // This thread's pieces: stage st, token u, K or V -> 16 bytes, consecutive threads adjacent.
    extern __shared__ __align__(16) unsigned char dynamic_shared[];
    auto piece = [&](int st, int u, int kv) {
      return reinterpret_cast<Vec<TKV, kVec>*>(dynamic_shared) + ((st * kUnroll + u) * 2 + kv) * kThreads + threadIdx.x;
    };
    const int steps = start < end ? (end - start + kTile - 1) / kTile : 0;
    int page[kUnroll];  // page of each token of the next step to copy
    auto load_pages = [&](int step) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = start + step * kTile + u * kSlots + slot;
        page[u] = step < steps && t < end ? kv_indices[first_page + t / kPageSize] : 0;
      }
    };
    // K and V are read once per launch, so their lines go first when L2 needs room (measured:
    // batch 1 x 32768 on an H200 41.3 -> 39.7 us back to back, batch 64 x 4096 -1%).
    const unsigned long long kv_policy = mma::l2_evict_first_policy();
    auto copy_step = [&](int step) {
      if (step < steps) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int t = start + step * kTile + u * kSlots + slot;
          const long long at = Cache::offset_in_page(page[u], t % kPageSize, kv_head) + lane * kVec;
          mma::copy_async<kPieceBytes>(piece(step % kStages, u, 0), k_cache + at, t < end, kv_policy);
          mma::copy_async<kPieceBytes>(piece(step % kStages, u, 1), v_cache + at, t < end, kv_policy);
        }
      }
      mma::copy_commit();  // one group per step, empty or not
      load_pages(step + 1);
    };
    load_pages(0);
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) copy_step(st);

    for (int step = 0; step < steps; ++step) {
      copy_step(step + kStages - 1);  // into the stage the previous step has finished reading
      mma::copy_wait<kStages - 1>();
      const int t0 = start + step * kTile;
      // Every K and V piece of the step is read from shared memory first (the loads overlap),
      // then each token's K and V are widened once for all heads (a pair per cvt for fp8):
      // widened per head they took 15% of the instructions (batch 1 x 32768: 34.7 M -> 29.5 M).
      Vec<TKV, kVec> kx[kUnroll], vx[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        kx[u] = *piece(step % kStages, u, 0);  // zero-filled past the end
        vx[u] = *piece(step % kStages, u, 1);
      }
      float score[kScores];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kf[kVec];
        to_floats(kx[u], kf);
#pragma unroll
        for (int h = 0; h < kHeadSlots; ++h) {
          float dot = 0.f;
          if (h < kHeads) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) dot = fmaf(qr[h][i], kf[i], dot);
          }
          score[u * kHeadSlots + h] = dot;
        }
      }
      reduce_transposed(score, lane);
      // Online softmax of the owned scores; they become p = 2^(s - m), 0 for masked tokens.
      const int u_owned = lane >> (kLaneBits - 2);
      const bool valid = t0 + u_owned * kSlots + slot < end;
      float rescale[kOwned];
      bool rescaled = false;
#pragma unroll
      for (int k = 0; k < kOwned; ++k) {
        float s = score[k];
        if constexpr (kSoftCap) s = soft_cap * kLog2e * tanhf(s);
        s = valid ? s : -__int_as_float(0x7f800000);
        const float m_new = fmaxf(m_owned[k], max_over_tokens(s));
        const float m_finite = m_new == -__int_as_float(0x7f800000) ? 0.f : m_new;  // no token yet: every p is 0
        rescale[k] = exp2f(m_owned[k] - m_finite);                                   // 0 while m is -inf
        score[k] = exp2f(s - m_finite);
        l_owned[k] = fmaf(l_owned[k], rescale[k], score[k]);
        m_owned[k] = m_new;
        rescaled = rescaled || rescale[k] != 1.f;
      }
      // Once the maximum settles, most steps leave the outputs' scale alone.
      if (__any_sync(0xffffffffu, rescaled)) {
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          const float r = __shfl_sync(0xffffffffu, rescale[owner_slot(h)], owner_lane(h), kLanes);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[h][i] *= r;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float vf[kVec];
        to_floats(vx[u], vf);
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          const int e = u * kHeadSlots + h;
          const float p = __shfl_sync(0xffffffffu, score[owner_slot(e)], owner_lane(e), kLanes);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[h][i] = fmaf(p, vf[i], acc[h][i]);
        }
      }
    }

    // A split's merge_states may take free slots now; it waits for this grid to finish.
    allow_next_grid();

    // Every head's m and l (summed over the four token lanes) on every lane, for the merge.
    float m[kHeads], l[kHeads];
#pragma unroll
    for (int k = 0; k < kOwned; ++k) l_owned[k] = sum_over_tokens(l_owned[k]);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      m[h] = __shfl_sync(0xffffffffu, m_owned[owner_slot(h)], owner_lane(h), kLanes);
      l[h] = __shfl_sync(0xffffffffu, l_owned[owner_slot(h)], owner_lane(h), kLanes);
    }

    mma::copy_wait<0>();
    __syncthreads();  // the stages become the merge area

    // Merge the slots: every slot's (m, l, acc) through shared memory.
    Shared& shared = *reinterpret_cast<Shared*>(dynamic_shared);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      if (lane == 0) { shared.m[slot][h] = m[h]; shared.l[slot][h] = l[h]; }
#pragma unroll
      for (int i = 0; i < kVec; ++i) shared.acc[slot][h][lane * kVec + i] = acc[h][i];
    }
    __syncthreads();
    shared.template write_out<kThreads, kQoHeads, kLse>(b, chunk, head0, num_chunks, v_scale, o, lse, partial_o, partial_lse);
  }
};

}  // namespace kjit::attention
