// Prefill attention with tensor cores, FlashAttention-2's split: each warp owns 16 query
// rows of its warpgroup's 64 and keeps their scores, probabilities and output in
// registers. The GEMMs are mma.sync m16n8k16, or on sm_90a warpgroup wgmma reading K, V
// (and Q) straight from shared memory (wgmma.cuh); both give the same accumulator layout,
// so everything else is shared.
//
// Request b has queries [qo_indptr[b], qo_indptr[b + 1]) of q [tokens, qo_heads, dim]
// and its keys/values in ragged rows or a paged cache (Kv below). Causal masking is aligned to the end (query i of qo_len sees keys
// j <= i + kv_len - qo_len), as for chunked prefill; a sliding window W keeps keys
// j > i + kv_len - qo_len - W. Scores, soft cap and the base-2 lse are as in decode.
//
// Block (head, request, row tile): Q tile in shared memory, K/V tiles of kKeys keys
// double-buffered with cp.async. With kPackGqa, a block's rows are (query, head) pairs of
// one KV head's group, query-major: row p is query p / group of the group's head p % group,
// so the group shares every K/V tile and a request with few queries (append attention,
// speculative decoding) still fills the 64 rows; otherwise rows are queries of one head.
// Rows are swizzled (16-byte chunk c of row r stored at
// chunk c ^ (r % 8)) so ldmatrix reads 8 rows without bank conflicts; wgmma's layout keeps
// that swizzle over column blocks of 64 elements.
#pragma once

#include "kjit/mma.cuh"
#include "kjit/paged_kv.cuh"
#include "kjit/wgmma.cuh"

namespace kjit::attention {

// Where request b's keys and values live. Ragged: rows kv_indptr[b] .. kv_indptr[b + 1]
// of contiguous [tokens, kv_heads, dim] tensors. Paged: a paged KV cache (paged_kv.cuh),
// kv_indptr indexing pages; with the new tokens appended first, this is append attention.
// Built once per block, so the request's start is read once and kept in a register
// (the cp.async asm's memory clobber would otherwise reload it for every row); the
// page table is passed to each call, read from the kernel's parameters, not a register.
template <int kKvHeads, int kHeadDim>
struct RaggedKv {
  static constexpr long long kKeyStride = static_cast<long long>(kKvHeads) * kHeadDim;  // elements from key to key
  static constexpr int kPageSize = 0;                                                     // not paged
  int first, len;
  RaggedKv() = default;
  __device__ __forceinline__ RaggedKv(const int* kv_indptr, const int*, int b)
      : first(kv_indptr[b]), len(kv_indptr[b + 1] - kv_indptr[b]) {}
  __device__ __forceinline__ int length() const { return len; }
  __device__ __forceinline__ long long offset(const int*, int key, int head) const {
    return (static_cast<long long>(first + key) * kKvHeads + head) * kHeadDim;
  }
  // TMA coordinates in the launch's (dim, head, row) view of k or v [tokens, heads, dim].
  static __device__ __forceinline__ int map_head(int head) { return head; }
};
// kv_indices is passed to each call (a kernel parameter, so no register holds it).
template <int kKvHeads, int kHeadDim, paged_kv::Layout kLayout, int kPageSize_, bool kCombined = false>
struct PagedKvRows {
  using Cache = paged_kv::PagedKv<kLayout, kPageSize_, kKvHeads, kHeadDim, kCombined>;
  static constexpr long long kKeyStride = 0;  // keys are not evenly spaced (pages)
  static constexpr int kPageSize = kPageSize_;
  // Elements from a key to the next within a page.
  static constexpr long long kSlotStride = kLayout == paged_kv::Layout::NHD ? static_cast<long long>(kKvHeads) * kHeadDim : kHeadDim;
  int first_page, len;
  PagedKvRows() = default;
  __device__ __forceinline__ PagedKvRows(const int* kv_indptr, const int* kv_last_page_len, int b)
      : first_page(kv_indptr[b]), len(Cache::length(kv_indptr, kv_last_page_len, b)) {}
  __device__ __forceinline__ int length() const { return len; }
  __device__ __forceinline__ long long offset(const int* kv_indices, int key, int head) const {
    return Cache::offset_in_page(kv_indices[first_page + key / kPageSize], key % kPageSize, head);
  }
  // TMA coordinates in the launch's view of the cache as rows of head_dim: (dim, head, row)
  // with a page's slots as rows (NHD), or (dim, 0, row) with a page's head's slots as rows
  // (HND); a combined page holds K's rows, then V's.
  static __device__ __forceinline__ int map_head(int head) { return kLayout == paged_kv::Layout::NHD ? head : 0; }
  static __device__ __forceinline__ int map_row(int page, int slot, int head, bool value) {
    const int part = (kCombined ? 2 * page : page) + (kCombined && value ? 1 : 0);
    return kLayout == paged_kv::Layout::NHD ? part * kPageSize + slot : (part * kKvHeads + head) * kPageSize + slot;
  }
};

// Scores s of keys key0 + 8 n + 2 t + (e & 1) for this thread's rows g and g + 8 (e / 2):
// soft-capped (then in the log2 domain) and, where `masked`, -inf past the row's last key
// or before its window (last_key, first_key as the prefill forms keep them). Without a
// soft cap the scale is applied later inside the exponent (one FFMA), so the row maxima are
// of unscaled scores (scale > 0 keeps their order).
template <bool kCausal, bool kSoftCap, int kWindow, int kGroups>
__device__ __forceinline__ void cap_and_mask(float (&s)[kGroups][4], bool masked, int key0, int t, const int (&last_key)[2],
                                             const int (&first_key)[2], float scale, float soft_cap) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float kNegInf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int n = 0; n < kGroups; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[n][e];
      if constexpr (kSoftCap) x = soft_cap * kLog2e * tanhf(x * scale);
      if (masked) {
        const int key = key0 + n * 8 + 2 * t + (e & 1);
        bool ok = key <= last_key[e / 2];
        if constexpr (kWindow > 0) ok = ok && key >= (kCausal ? last_key[e / 2] - kWindow + 1 : first_key[e / 2]);
        if (!ok) x = kNegInf;
      }
      s[n][e] = x;
    }
}

// Transposes 4 x 4 words across a quad: lane t's word c becomes lane c's word t, in two
// butterfly steps (lanes 1 apart swap the words whose index differs from theirs in bit 0,
// then lanes 2 apart in bit 1), selects instead of indexing registers by lane.
__device__ __forceinline__ void transpose_quad(unsigned (&w)[4], int t) {
#pragma unroll
  for (int bit = 1; bit <= 2; bit *= 2) {
    const bool high = t & bit;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (c & bit) continue;  // the pair (c, c + bit): the low lane sends c + bit, the high lane c
      const unsigned received = __shfl_xor_sync(0xffffffffu, high ? w[c] : w[c + bit], bit);
      if (high) w[c] = received;
      else w[c + bit] = received;
    }
  }
}

// The prefill forms' epilogue for a thread's rows g and g + 8 (r = 0, 1): the row sums
// across the quad, then o / l and the base-2 lse. qo_index(r) is the row's (query, head)
// index into the output and lse, or -1 for a row past the request. A quad holds a row's
// 8-column chunks a word per lane; transposed 4 chunks at a time, each lane hands whole
// chunks to write(r, index, chunk, value), 16 bytes each.
template <typename T, int kHeadDim, bool kLse, typename QoIndex, typename WriteChunk>
__device__ __forceinline__ void finish_rows(const float (&o_acc)[kHeadDim / 8][4], const float (&m)[2], float (&l)[2], int t,
                                            QoIndex qo_index, float* __restrict__ lse, WriteChunk write) {
  static_assert(kHeadDim % 32 == 0, "whole groups of 4 chunks");
  const float kNegInf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const long long index = qo_index(r);
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int group = 0; group < kHeadDim / 32; ++group) {
      unsigned w[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int d = 4 * group + c;
        w[c] = mma::pack2<T>(o_acc[d][2 * r] * inv, o_acc[d][2 * r + 1] * inv);
      }
      transpose_quad(w, t);  // every lane: rows past the request too
      write(r, index, 4 * group + t, make_uint4(w[0], w[1], w[2], w[3]));
    }
    if constexpr (kLse)
      if (t == 0 && index >= 0) lse[index] = l[r] > 0.f ? m[r] + log2f(l[r]) : kNegInf;
  }
}

// finish_rows straight into the output (4-byte stores straight from the accumulators kept a
// 128-row tile's output in the load/store unit 2.1 us on an H200, delaying the producer's
// next copies; whole 16-byte chunks do not).
template <typename T, int kHeadDim, bool kLse, typename QoIndex>
__device__ __forceinline__ void store_rows(const float (&o_acc)[kHeadDim / 8][4], const float (&m)[2], float (&l)[2], int t,
                                           QoIndex qo_index, T* __restrict__ o, float* __restrict__ lse) {
  finish_rows<T, kHeadDim, kLse>(o_acc, m, l, t, qo_index, lse, [&](int, long long index, int chunk, uint4 value) {
    if (index >= 0) *reinterpret_cast<uint4*>(o + index * kHeadDim + chunk * 8) = value;
  });
}

template <typename T, int kHeadDim, int kQoHeads, int kKvHeads, bool kCausal, bool kSoftCap, int kWindow, bool kLse,
          int kKeys, typename KvSource = RaggedKv<kKvHeads, kHeadDim>, bool kPackGqa = false, bool kWarpgroupMma = true, int kWarpgroups = 1>
struct BatchPrefill {
  using Kv = KvSource;
  static constexpr int kWarps = 4 * kWarpgroups;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // query rows per block; kKeys: keys per tile
  static constexpr int kChunks = kHeadDim / 8;             // 16-byte chunks per row
  static constexpr int kGroup = kQoHeads / kKvHeads;
  static constexpr int kRowsPerQuery = kPackGqa ? kGroup : 1;  // rows of one query in a block
  // sm_90a: both GEMMs by warpgroup wgmma from shared memory (head_dim <= 128: the output
  // accumulators of m64n{head_dim} fit the registers); else mma.sync from ldmatrix fragments.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static constexpr bool kWgmma = kWarpgroupMma && kHeadDim <= 128;
#else
  static constexpr bool kWgmma = false;
#endif
  // mma.sync: Q as A fragments in registers (else reloaded from shared memory). wgmma
  // reads Q from shared memory: 32 fewer registers, 4 blocks per SM (454 against 422
  // TFLOP/s with Q in registers, causal 8192 on the H100).
  static constexpr bool kQInRegisters = !kWgmma && kHeadDim <= 128;
  // Tiles, plus 1 KB to align them to 1024 bytes (wgmma's swizzle works on address bits).
  static constexpr int kSharedBytes = (kRows + 4 * kKeys) * kHeadDim * 2 + 1024;
  // Blocks per SM the register budget targets, at most what shared memory holds: 4 with
  // wgmma and 32-key tiles (at most 128 registers: causal 8192 470 TFLOP/s, paged append
  // 377 us, against 464 and 445 with 3), else 3 (at most 168: with mma.sync measured
  // faster than 2 with more registers; wgmma's 64-key scores need more than 128). No
  // target for head_dim 256 and the soft cap's tanh: they need more (capped, they spill).
  static constexpr int kBlocksInSharedMemory = 227 * 1024 / kSharedBytes;
  static constexpr int kRegisterTarget = kHeadDim <= 128 && !kSoftCap ? (kWgmma && kKeys == 32 ? 4 : 3) / kWarpgroups : 1;
  static constexpr int kMinBlocksPerSm = kRegisterTarget < kBlocksInSharedMemory ? kRegisterTarget
                                         : kBlocksInSharedMemory > 1               ? kBlocksInSharedMemory
                                                                                   : 1;
  static constexpr float kLog2e = 1.4426950408889634f;
  static_assert(sizeof(T) == 2, "16-bit inputs");
  static_assert(kHeadDim % 64 == 0, "head_dim 64, 128 or 256");
  static_assert(kKeys % 16 == 0 && (kKeys * kChunks) % kThreads == 0, "whole tiles per copy round");

  // 16-byte chunk `chunk` of a tile's row `row`: rows of head_dim elements (mma.sync), or
  // wgmma's column blocks of 64 (wgmma.cuh); both swizzled by row % 8.
  static constexpr int kRowPitch = kWgmma ? 64 : kHeadDim;
  static __device__ __forceinline__ int swizzled(int row, int chunk) { return row * kHeadDim + ((chunk ^ (row % 8)) * 8); }
  template <int kTileRows>
  static __device__ __forceinline__ int tile_offset(int row, int chunk) {
    if constexpr (kWgmma) return wgmma::swizzled_offset<kTileRows>(row, chunk * 8);
    else return swizzled(row, chunk);
  }

  // Rows [first, first + kTileRows) of a tile, row r read at row_offset(r) (the start of its
  // head) and zero-filled past `valid`: issue(shared offset, global offset, valid) per row.
  // A thread copies chunk threadIdx.x % kChunks of rows threadIdx.x / kChunks + n * kRowStep.
  // Every row's offset is computed before the first copy, so page-table reads are all in
  // flight together (each cp.async's memory clobber would otherwise order them one by one).
  // With kRowStep a multiple of 8 the swizzle is the same for all rows, so the shared
  // offsets are compile-time steps from one per-thread base.
  static constexpr int kRowStep = kThreads / kChunks;
  template <int kTileRows, typename RowOffset, typename Issue>
  static __device__ __forceinline__ void for_tile_rows(RowOffset row_offset, int first, int valid, Issue issue) {
    constexpr int kSteps = kTileRows / kRowStep;
    const int chunk = threadIdx.x % kChunks, row0 = threadIdx.x / kChunks;
    long long offset[kSteps];
    bool ok[kSteps];
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      ok[n] = first + row0 + n * kRowStep < valid;
      offset[n] = ok[n] ? row_offset(first + row0 + n * kRowStep) + chunk * 8 : 0;
    }
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      const int dst = kRowStep % 8 == 0 ? tile_offset<kTileRows>(row0, chunk) + n * kRowStep * kRowPitch
                                        : tile_offset<kTileRows>(row0 + n * kRowStep, chunk);
      issue(dst, offset[n], ok[n]);
    }
  }
  template <int kTileRows, typename RowOffset>
  static __device__ __forceinline__ void copy_tile(T* tile, const T* base, RowOffset row_offset, int first, int valid) {
    for_tile_rows<kTileRows>(row_offset, first, valid,
                             [&](int dst, long long src, bool ok) { mma::copy_async(tile + dst, base + src, ok); });
  }
  // K and V rows share their offsets.
  static __device__ __forceinline__ void copy_kv_tiles(T* k_tile, T* v_tile, const T* k, const T* v,
                                                       const Kv& kv, const int* kv_indices, int kv_head, int first) {
    for_tile_rows<kKeys>([&](int key) { return kv.offset(kv_indices, key, kv_head); }, first, kv.length(),
                         [&](int dst, long long src, bool ok) {
                           mma::copy_async(k_tile + dst, k + src, ok);
                           mma::copy_async(v_tile + dst, v + src, ok);
                         });
  }

  // A barrier over this form's kThreads threads (barrier 1), so it also runs as the first
  // kThreads threads of a larger block whose other threads have left (the warp-specialized
  // form's fallback).
  static __device__ __forceinline__ void sync_threads() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }

  // Probabilities of keys 16 kk .. 16 kk + 15 (score groups 2 kk and 2 kk + 1) as the A
  // fragment of P V: the accumulator layout of S is the A layout of P (mma.cuh).
  static __device__ __forceinline__ void probability_fragment(const float (&s)[kKeys / 8][4], int kk, unsigned (&a)[4]) {
    a[0] = mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }

  // kv_indices and kv_last_page_len: paged K/V only (null for ragged).
  // Grid (head, request, row tile), row tiles slowest and last first: blocks start in
  // order of their linear index, so every request's longest causal tiles start first.
  static __device__ void run(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const int* __restrict__ qo_indptr, const int* __restrict__ kv_indptr,
                             const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                             T* __restrict__ o, float* __restrict__ lse, float sm_scale, float soft_cap) {
    run_block(blockIdx.x, blockIdx.y, gridDim.z - 1 - blockIdx.z, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, o,
              lse, sm_scale, soft_cap);
  }
  // One block's work: head block (a KV head's group when packed, else a query head),
  // request b, row tile `tile`.
  static __device__ __forceinline__ void run_block(int head_block, int b, int tile, const T* __restrict__ q,
                                                   const T* __restrict__ k, const T* __restrict__ v,
                                                   const int* __restrict__ qo_indptr, const int* __restrict__ kv_indptr,
                                                   const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                                                   T* __restrict__ o, float* __restrict__ lse, float sm_scale, float soft_cap) {
    const float kNegInf = -__int_as_float(0x7f800000);
    extern __shared__ __align__(128) unsigned char dynamic_shared[];
    T* q_tile = reinterpret_cast<T*>(dynamic_shared + (-mma::shared_address(dynamic_shared) & 1023u));
    T* k_tiles = q_tile + kRows * kHeadDim;      // 2 buffers of kKeys x kHeadDim (tile_offset's layout)
    T* v_tiles = k_tiles + 2 * kKeys * kHeadDim;  // 2 buffers of kKeys x kHeadDim

    const int kv_head = kPackGqa ? head_block : head_block / kGroup;
    const int head0 = kPackGqa ? head_block * kGroup : head_block;  // the head of row p is head0 + p % kRowsPerQuery
    const int q_begin = qo_indptr[b], qo_len = qo_indptr[b + 1] - q_begin;
    const Kv kv(kv_indptr, kv_last_page_len, b);
    const int kv_len = kv.length();
    const int rows = qo_len * kRowsPerQuery;
    const int row0 = tile * kRows;
    if (row0 >= rows) return;
    const int shift = kv_len - qo_len;
    const int first_query = row0 / kRowsPerQuery, last_query = (min(row0 + kRows, rows) - 1) / kRowsPerQuery;
    const int key_end = kCausal ? max(0, min(kv_len, last_query + shift + 1)) : kv_len;
    const int key_begin = kWindow > 0 ? max(0, first_query + shift - kWindow + 1) : 0;
    const int first_tile = key_begin / kKeys;
    const int end_tile = (key_end + kKeys - 1) / kKeys;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // (query, head) of a row, as the index of its q / output row and of its lse.
    auto qo_index = [&](int row) {
      return static_cast<long long>(q_begin + row / kRowsPerQuery) * kQoHeads + head0 + row % kRowsPerQuery;
    };
    auto q_row = [&](int row) { return qo_index(row) * kHeadDim; };

    copy_tile<kRows>(q_tile, q, q_row, row0, rows);
    if (first_tile < end_tile) {
      copy_kv_tiles(k_tiles, v_tiles, k, v, kv, kv_indices, kv_head, first_tile * kKeys);
    }
    mma::copy_commit();

    // This warp's query rows as A fragments, one per 16 dims.
    const int warp_row = warp * 16;
    unsigned qf[kQInRegisters ? kHeadDim / 16 : 1][4];
    auto q_fragment = [&](int kk, unsigned (&a)[4]) {
      mma::load_matrix_x4(a, q_tile + tile_offset<kRows>(warp_row + lane % 16, kk * 2 + lane / 16));
    };

    // ldmatrix row addresses: a lane's row within 8 is lane % 8, so its swizzle is fixed;
    // chunk (2j + c) ^ (lane % 8) for j = kk % 4 is precomputed, the rest are immediates.
    const int x = lane % 8;
    const int k_base = (x + (lane / 16) * 8) * kHeadDim, v_base = (x + ((lane / 8) % 2) * 8) * kHeadDim;
    int k_off[4], v_off[4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      k_off[jj] = k_base + ((2 * jj + (lane / 8) % 2) ^ x) * 8;
      v_off[jj] = v_base + ((2 * jj + lane / 16) ^ x) * 8;
    }

    // wgmma operands: Q (K-major; warpgroup w's rows start 64 rows on), K tiles (K-major),
    // V tiles (MN-major: [keys][dims], the next 64 dims kKeys * 128 bytes on); a buffer's or
    // k-step's offset is added in 16-byte units.
    const unsigned long long q_descriptor = wgmma::descriptor(q_tile, 16, 1024);
    const unsigned long long k_descriptor = wgmma::descriptor(k_tiles, 16, 1024);
    const unsigned long long v_descriptor = wgmma::descriptor(v_tiles, kKeys * 128, 1024);

    const float scale = kSoftCap ? sm_scale / soft_cap : sm_scale * kLog2e;
    float o_acc[kHeadDim / 8][4];
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
    float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp
    // Per row of this thread (warp rows g and g + 8): the last key it sees (-1 for a row past
    // the request's) and, with a window, the first; tiles that need no mask skip all this.
    int last_key[2], first_key[2];  // first_key: only with a window and no causal mask (else last_key - window + 1)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + warp_row + g + 8 * r, query_end = row / kRowsPerQuery + shift;
      last_key[r] = row >= rows ? -1 : kCausal ? query_end : kv_len - 1;
      first_key[r] = kWindow > 0 && !kCausal ? query_end - kWindow + 1 : 0;
    }
    const int mask_after = kCausal ? first_query + shift : kv_len - 1;  // keys past it need the mask
    const bool partial_rows = row0 + kRows > rows;

    for (int j = first_tile; j < end_tile; ++j) {
      const int buffer = (j - first_tile) % 2;
      if (j + 1 < end_tile) {
        copy_kv_tiles(k_tiles + (1 - buffer) * kKeys * kHeadDim, v_tiles + (1 - buffer) * kKeys * kHeadDim, k, v, kv,
                      kv_indices, kv_head, (j + 1) * kKeys);
      }
      mma::copy_commit();
      mma::copy_wait<1>();
      if constexpr (kWgmma) wgmma::fence_shared_for_async_reads();
      sync_threads();
      if constexpr (kQInRegisters) {
        if (j == first_tile) {
#pragma unroll
          for (int kk = 0; kk < kHeadDim / 16; ++kk) q_fragment(kk, qf[kk]);
        }
      }
      const T* kt = k_tiles + buffer * kKeys * kHeadDim;
      const T* vt = v_tiles + buffer * kKeys * kHeadDim;

      // S = Q K^T for this warp's 16 rows x kKeys keys.
      float s[kKeys / 8][4];
      if constexpr (kWgmma) {
        // The warpgroup's 64 rows at once; k-step kk is 16 dims of column block kk / 4.
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk)
          wgmma::mma_shared<T, kKeys>(s, q_descriptor + ((kk / 4) * kRows * 128 + (warp / 4) * 64 * 128 + (kk % 4) * 32) / 16,
                                      k_descriptor + (buffer * kKeys * kHeadDim * 2 + (kk / 4) * kKeys * 128 + (kk % 4) * 32) / 16,
                                      kk > 0);
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::hold(s);
      } else {
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        unsigned a_local[4];
        if constexpr (!kQInRegisters) q_fragment(kk, a_local);
        const unsigned (&a)[4] = kQInRegisters ? qf[kQInRegisters ? kk : 0] : a_local;
#pragma unroll
        for (int np = 0; np < kKeys / 16; ++np) {
          unsigned bk[4];
          mma::load_matrix_x4(bk, kt + k_off[kk % 4] + np * 16 * kHeadDim + (kk / 4) * 64);
          mma::mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
          mma::mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
        }
      }
      }

      // Scale (log2 domain), mask where this tile needs it, online softmax per row.
      const int key0 = j * kKeys;
      // (Causal: keys past the end lie past every row's diagonal, so kv_len needs no test.)
      const bool need_mask = key0 + kKeys - 1 > mask_after || (kWindow > 0 && key0 <= last_query + shift - kWindow) || partial_rows;
      cap_and_mask<kCausal, kSoftCap, kWindow>(s, need_mask, key0, t, last_key, first_key, scale, soft_cap);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // m is the reference the exponentials are taken against, not always the running
        // maximum: o and l are rescaled only when the maximum passes it by more than
        // kSlack, so after the first tiles a row rarely pays the 2 * head_dim / 8
        // multiplies. Weights stay below 2^kSlack, far inside fp32 and bf16 range, and o / l
        // and lse = m + log2(l) are exact whatever reference was used.
        constexpr float kSlack = 8.f;
        const float exp_scale = kSoftCap ? 1.f : scale;  // scores -> log2 domain
        const float m_max = fmaxf(m[r], mx * exp_scale);
        if (m_max > m[r] + kSlack) {  // also the first finite maximum (m = -inf)
          const float alpha = mma::fast_exp2(m[r] - m_max);
          m[r] = m_max;
          l[r] *= alpha;
#pragma unroll
          for (int d = 0; d < kHeadDim / 8; ++d) {
            o_acc[d][2 * r] *= alpha;
            o_acc[d][2 * r + 1] *= alpha;
          }
        }
        const float base = m[r] == kNegInf ? 0.f : m[r];  // a row with nothing yet: every p is 0
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
          s[n][2 * r] = mma::fast_exp2(fmaf(s[n][2 * r], exp_scale, -base));
          s[n][2 * r + 1] = mma::fast_exp2(fmaf(s[n][2 * r + 1], exp_scale, -base));
          l[r] += s[n][2 * r] + s[n][2 * r + 1];
        }
      }

      // O += P V: P's accumulators become A fragments, V is read transposed.
      if constexpr (kWgmma) {
        // All of P packed first: wgmma.fence must follow every write of its registers.
        unsigned p[kKeys / 16][4];
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) probability_fragment(s, kk, p[kk]);
        wgmma::accumulate_probabilities<T, kHeadDim>(o_acc, p, v_descriptor + buffer * kKeys * kHeadDim * 2 / 16);
        wgmma::wait<0>();
        wgmma::hold(o_acc);
      } else {
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        unsigned a[4];
        probability_fragment(s, kk, a);
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          unsigned bv[4];
          mma::load_matrix_x4_transposed(bv, vt + v_off[dp % 4] + kk * 16 * kHeadDim + (dp / 4) * 64);
          mma::mma_16816<T>(o_acc[2 * dp], a, bv[0], bv[1]);
          mma::mma_16816<T>(o_acc[2 * dp + 1], a, bv[2], bv[3]);
        }
      }
      }
      sync_threads();  // the buffer is refilled next iteration
    }
    mma::copy_wait<0>();

    const int rows_end = (qo_indptr[b + 1] - qo_indptr[b]) * kRowsPerQuery;  // read again: not kept live through the loop
    store_rows<T, kHeadDim, kLse>(o_acc, m, l, t, [&](int r) {
      const int row = row0 + warp_row + g + 8 * r;
      return row < rows_end ? qo_index(row) : -1ll;
    }, o, lse);
  }
};

}  // namespace kjit::attention
