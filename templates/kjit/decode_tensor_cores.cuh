// Batch decode on tensor cores: BatchDecode's function (decode.cuh) for 16-bit KV at head
// dims 64 and 128, with the dot products and the weighted sum of V as mma.sync.
//
// Block (chunk, request, head group) as in BatchDecode (up to 16 heads); its kWarps warps
// (three, as the family launches it) take turns over 16-token steps of the block's tokens
// (warp w: steps w, w + kWarps, ...), each with its own online softmax, merged through
// shared memory at the end. In a step a warp computes
//   S = Q K^T  (m16n8k16, A = Q from shared memory, B = K rows: 16 dims x 8 tokens)
//   O += P V   (m16n8k16, A = P, B = V by ldmatrix.trans: 16 tokens x 8 dims)
// With up to 8 heads the 16 rows of A are the heads twice: rows g and g + 8 are the same
// head g seen by two token slots, tokens 0-7 and 8-15 of the step. S is computed for both
// token halves; row g keeps the first half's scores, row g + 8 the second's, so P is
// block-diagonal ([P_0 0; 0 P_1]) and one k16 mma per 8 dims adds both slots' P V, every
// accumulator register holding a needed value (one slot of 16 rows would leave half of
// them to padding heads). The two slots merge in registers at the end. With 9 to 16 heads
// the rows are the heads, each over all 16 tokens.
//
// A warp's K and V tiles (16 token rows each) move through a ring of three tiles: K_s, V_s
// and K_{s+1} resident at a step's start; V_{s+1} goes into K_s's place once S is done and
// K_{s+2} into V_s's once P V is, so two tiles are in flight while a warp computes. Each
// lane copies its own 16-byte pieces (cp.async, L2 evict-first: KV is read once) to chunk
// positions XORed with the row (ldmatrix without bank conflicts). The page numbers of a
// step are read a step ahead.
#pragma once

#include "kjit/common.cuh"
#include "kjit/decode.cuh"  // SlotStates
#include "kjit/mma.cuh"
#include "kjit/paged_kv.cuh"

namespace kjit::attention {

template <typename T, int kHeadDim, int kQoHeads, int kKvHeads, int kHeads, paged_kv::Layout kLayout, int kPageSize,
          bool kCombined, bool kSoftCap, int kWindow, bool kLse, int kWarps, int kMinBlocksPerSm_>
struct BatchDecodeTensorCores {
  using Cache = paged_kv::PagedKv<kLayout, kPageSize, kKvHeads, kHeadDim, kCombined>;
  static constexpr int kGroup = kQoHeads / kKvHeads;
  static constexpr int kBlocksPerKvHead = kGroup / kHeads;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kStepTokens = 16;                          // a warp's tokens per step, 8 per slot
  static constexpr int kChunks = kHeadDim / 8;                    // 16-byte chunks of a token row
  // Token rows in shared memory are kHeadDim * 2 bytes, their 16-byte chunks XORed with the
  // row (row & 7), so that ldmatrix's eight row reads of a matrix hit eight different bank
  // groups while every 32-byte sector copied lands in an aligned 32 bytes. (Rows padded by
  // 16 bytes instead, conflict-free as well, ran 3.7% slower at batch 64 x 4096, H100; our
  // reading: half the sectors then straddled two.)
  static constexpr int kRowStride = kHeadDim * 2;
  static constexpr int kTileBytes = kStepTokens * kRowStride;     // a warp's K (or V) of one step
  static constexpr int kRing = 3;  // tiles a warp (K_s, V_s, K_{s+1})
  static constexpr int kRowsApart = 32 / kChunks;                 // between the rows one lane copies
  static constexpr int kLaneRows = kStepTokens / kRowsApart;      // rows a lane copies per tile
  static constexpr int kRingBytes = kWarps * kRing * kTileBytes;
  // Up to 8 heads: rows g and g + 8 of the A operand are one head g in two token slots (the
  // step's tokens 0-7 and 8-15). 9 to 16 heads: rows g and g + 8 are heads g and g + 8, each
  // over all 16 tokens (reading a KV head's tokens once for a group of 16).
  static constexpr bool kTwoSlots = kHeads <= 8;
  static constexpr int kQRows = kTwoSlots ? 8 : 16;
  using Shared = SlotStates<kWarps, kHeads, kHeadDim>;  // in the ring's room at the end
  static_assert(static_cast<int>(sizeof(Shared)) <= kRingBytes, "the merge fits the ring");
  static constexpr int kSharedBytes = kRingBytes + kQRows * kRowStride;  // the ring, Q
  static constexpr float kLog2e = 1.4426950408889634f;
  // A row's reference maximum moves only when a score passes it by this much (then P stays
  // below 2^8): most steps skip rescaling O.
  static constexpr float kSlack = 8.f;
  static_assert(sizeof(T) == 2, "16-bit KV (fp8 KV takes BatchDecode)");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128 (256 would need 128 accumulators a thread)");
  static_assert(kHeads <= 16 && kQoHeads % kKvHeads == 0 && kGroup % kHeads == 0, "up to 16 heads a block, dividing the group");

  // Byte offset of (row, 16-byte chunk c) in a tile.
  static __device__ __forceinline__ int chunk_at(int row, int c) { return row * kRowStride + ((c ^ (row & 7)) << 4); }

  static __device__ void run(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                             const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
                             const int* __restrict__ kv_last_page_len, T* __restrict__ o, float* __restrict__ lse,
                             float* __restrict__ partial_o, float* __restrict__ partial_lse, int num_chunks, int chunk_size,
                             float sm_scale, float soft_cap) {
    const float kNegInf = -__int_as_float(0x7f800000);
    const int chunk = blockIdx.x, b = blockIdx.y;
    const int kv_head = blockIdx.z / kBlocksPerKvHead;
    const int head0 = kv_head * kGroup + static_cast<int>(blockIdx.z % kBlocksPerKvHead) * kHeads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int len = Cache::length(kv_indptr, kv_last_page_len, b);
    const int first_page = kv_indptr[b];
    const int begin = kWindow > 0 ? max(0, len - kWindow) : 0;
    const int start = begin + chunk * chunk_size;
    const int end = chunk == num_chunks - 1 ? len : min(len, start + chunk_size);  // the last chunk runs to the end
    const int groups = start < end ? (end - start + kStepTokens - 1) / kStepTokens : 0;
    const int steps = groups > warp ? (groups - warp + kWarps - 1) / kWarps : 0;  // this warp's
    auto first_token = [&](int s) { return start + (s * kWarps + warp) * kStepTokens; };

    // Q as kQRows rows of the tile layout after the ring (heads past kHeads zero), read by
    // ldmatrix for each 16 dims (held in registers with rows g and g + 8 duplicated for the
    // A operand, it took 32 of them).
    extern __shared__ __align__(128) unsigned char dynamic_shared[];
    unsigned char* q_rows = dynamic_shared + kRingBytes;
    for (int piece = threadIdx.x; piece < kQRows * kChunks; piece += kThreads) {
      const int h = piece / kChunks, c = piece % kChunks;
      Vec<T, 8> x;
      if (h < kHeads) x.load(q + (static_cast<long long>(b) * kQoHeads + head0 + h) * kHeadDim + c * 8);
      else
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = from_float<T>(0.f);
      x.store(reinterpret_cast<T*>(q_rows + chunk_at(h, c)));
    }
    __syncthreads();

    unsigned char* ring = dynamic_shared + warp * kRing * kTileBytes;
    // Each copy instruction of a warp reads whole token rows (kChunks lanes a row, as
    // BatchDecode does): lanes taking alternate chunks of all 16 rows were 16% slower
    // (batch 64 x 4096, H100), one 32-byte sector per line and instruction. Lane r < 16
    // holds the page of row r of the next step to copy; a copying lane takes its rows'
    // pages by shuffles.
    const int lane_chunk = lane % kChunks, lane_row = lane / kChunks;
    int page = 0;
    auto load_page = [&](int s) {
      const int token = first_token(s) + lane % kStepTokens;
      page = s < steps && token < end ? kv_indices[first_page + token / kPageSize] : 0;
    };
    // Tile n of the warp: K (n even) or V (n odd) of step n / 2, into ring place n % kRing.
    // One copy group per tile, so the waits below count tiles; past the warp's last step the
    // copies read nothing and zero places no step reads (no branch: the shuffles stay
    // converged, where under one the compiler added a lane-by-lane fallback and a spill).
    auto copy_tile = [&](int n) {
      const int s = n >> 1;
      const T* base = ((n & 1) ? v_cache : k_cache) + lane_chunk * 8;
      unsigned char* tile = ring + (n % kRing) * kTileBytes;
      const int t0 = first_token(s);
      const bool in_steps = s < steps;
      const unsigned long long kv_policy = mma::l2_evict_first_policy();  // (made here: two registers fewer held)
#pragma unroll
      for (int i = 0; i < kLaneRows; ++i) {
        const int row = lane_row + i * kRowsApart;
        const unsigned token = static_cast<unsigned>(t0 + row);
        const int row_page = __shfl_sync(0xffffffffu, page, row);
        mma::copy_async(tile + chunk_at(row, lane_chunk),
                        base + Cache::offset_in_page(row_page, static_cast<int>(token % kPageSize), kv_head),
                        in_steps && token < static_cast<unsigned>(end), kv_policy);
      }
      mma::copy_commit();
    };
    // Each tile copied as soon as its place is free; once a step's V is issued, the page
    // numbers of the step after it are read.
    auto copy_next = [&](int n) {
      copy_tile(n);
      if (n & 1) load_page((n >> 1) + 1);
    };
    load_page(0);
#pragma unroll
    for (int n = 0; n < kRing; ++n) copy_next(n);

    float o_acc[kHeadDim / 8][4];
#pragma unroll
    for (int d = 0; d < kHeadDim / 8; ++d) o_acc[d][0] = o_acc[d][1] = o_acc[d][2] = o_acc[d][3] = 0.f;
    float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};  // rows g and g + 8
    // Scores in the log2 domain: log2(e) * sm_scale * q.k, or log2(e) * c * tanh(sm_scale * q.k / c).
    const float scale = kSoftCap ? sm_scale / soft_cap : sm_scale * kLog2e;
    const int matrix = lane / 8, matrix_row = lane % 8;  // the row address this lane gives ldmatrix
    for (int s = 0; s < steps; ++s) {
      const int t0 = first_token(s);
      mma::copy_wait<kRing - 1>();  // K_s landed (the kRing - 1 tiles after it may not have)
      __syncwarp();
      const unsigned char* k_tile = ring + ((2 * s) % kRing) * kTileBytes;
      float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};  // tokens 0-7, 8-15
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        unsigned a[4], kb[4];  // Q's A fragment; B fragments of tokens 0-7 (kb[0..1]) and 8-15 (kb[2..3])
        mma::load_matrix_x4(a, q_rows + chunk_at((kTwoSlots ? 0 : (matrix & 1) * 8) + matrix_row, 2 * kk + (matrix >> 1)));
        mma::load_matrix_x4(kb, k_tile + chunk_at((matrix >> 1) * 8 + matrix_row, 2 * kk + (matrix & 1)));
        mma::mma_16816<T>(s0, a, kb[0], kb[1]);
        mma::mma_16816<T>(s1, a, kb[2], kb[3]);
      }
      __syncwarp();  // every lane's reads of K_s done before its place is refilled
      copy_next(2 * s + kRing);

      // Row r's scores held by this lane: x[r][j] for token 8 (j / 2) + 2t + j % 2 of the
      // step; with two slots row g takes tokens 0-7 only and row g + 8 tokens 8-15.
      auto seen = [](int r, int j) { return !kTwoSlots || j / 2 == r; };
      float x[2][4];
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float top = kNegInf;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!seen(r, j)) continue;
          float v = (j < 2 ? s0 : s1)[2 * r + j % 2];
          if constexpr (kSoftCap) v = soft_cap * kLog2e * tanhf(v * scale);
          else v *= scale;
          x[r][j] = t0 + 8 * (j / 2) + 2 * t + j % 2 < end ? v : kNegInf;
          top = fmaxf(top, x[r][j]);
        }
        top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
        top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
        alpha[r] = 1.f;
        if (top > m[r] + kSlack) {  // (false while every score so far is masked)
          alpha[r] = mma::fast_exp2(m[r] - top);  // 0 from m = -inf
          m[r] = top;
          l[r] *= alpha[r];
        }
        const float reference = m[r] == kNegInf ? 0.f : m[r];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          x[r][j] = seen(r, j) ? mma::fast_exp2(x[r][j] - reference) : 0.f;
          l[r] += x[r][j];  // this lane's part of the row's sum
        }
      }
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int d = 0; d < kHeadDim / 8; ++d) {
          o_acc[d][0] *= alpha[0];
          o_acc[d][1] *= alpha[0];
          o_acc[d][2] *= alpha[1];
          o_acc[d][3] *= alpha[1];
        }
      }
      // P as the A operand (16 rows x 16 tokens); with two slots block-diagonal, the
      // off-diagonal registers 0.
      const unsigned pa[4] = {mma::pack2<T>(x[0][0], x[0][1]), mma::pack2<T>(x[1][0], x[1][1]),
                              mma::pack2<T>(x[0][2], x[0][3]), mma::pack2<T>(x[1][2], x[1][3])};

      mma::copy_wait<kRing - 1>();  // V_s landed
      __syncwarp();
      const unsigned char* v_tile = ring + ((2 * s + 1) % kRing) * kTileBytes;
#pragma unroll
      for (int d = 0; d < kHeadDim / 8; d += 2) {
        unsigned vb[4];  // B fragments of dims 8 d on (vb[0..1]) and 8 (d + 1) on (vb[2..3])
        mma::load_matrix_x4_transposed(vb, v_tile + chunk_at((matrix & 1) * 8 + matrix_row, d + (matrix >> 1)));
        mma::mma_16816<T>(o_acc[d], pa, vb[0], vb[1]);
        mma::mma_16816<T>(o_acc[d + 1], pa, vb[2], vb[3]);
      }
      __syncwarp();
      copy_next(2 * s + 1 + kRing);
    }

    // A split's merge_states may take free slots now; it waits for this grid to finish.
    allow_next_grid();

    // Each row's sum over its four lanes; with two slots, head g's two rows merged.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    float w[2] = {1.f, 1.f};
    if constexpr (kTwoSlots) {
      const float m_all = fmaxf(m[0], m[1]);
#pragma unroll
      for (int r = 0; r < 2; ++r) w[r] = m[r] == kNegInf ? 0.f : exp2f(m[r] - m_all);
      l[0] = fmaf(l[0], w[0], l[1] * w[1]);
      m[0] = m_all;
    }

    mma::copy_wait<0>();
    __syncthreads();  // the ring becomes the merge area
    Shared& shared = *reinterpret_cast<Shared*>(dynamic_shared);
#pragma unroll
    for (int r = 0; r < (kTwoSlots ? 1 : 2); ++r) {
      const int h = g + 8 * r;
      if (h >= kHeads) continue;
      if (t == 0) {
        shared.m[warp][h] = m[r];
        shared.l[warp][h] = l[r];
      }
#pragma unroll
      for (int d = 0; d < kHeadDim / 8; ++d) {
        shared.acc[warp][h][8 * d + 2 * t] = kTwoSlots ? fmaf(o_acc[d][0], w[0], o_acc[d][2] * w[1]) : o_acc[d][2 * r];
        shared.acc[warp][h][8 * d + 2 * t + 1] = kTwoSlots ? fmaf(o_acc[d][1], w[0], o_acc[d][3] * w[1]) : o_acc[d][2 * r + 1];
      }
    }
    __syncthreads();
    shared.template write_out<kThreads, kQoHeads, kLse>(b, chunk, head0, num_chunks, 1.f, o, lse, partial_o, partial_lse);
  }
};

}  // namespace kjit::attention
