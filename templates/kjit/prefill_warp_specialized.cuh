// Prefill attention on sm_90a with warp specialization (FlashAttention-3's plan): one
// warpgroup only copies, two only multiply, and they hand K/V tiles over through mbarriers.
//
// Persistent: one block of 3 warpgroups per SM walks the work items (head block, request,
// 128-row tile) in ItemOrder's order, or takes them from the host plan's queue (work_list,
// ItemQueue), so the copies of its next item overlap the end of the current one.
// - warpgroup 0, the producer, gives most of its registers back (setmaxnreg) and copies
//   K_0, Q, then the K and V tiles of 128 keys (K_j before V_{j-1}, the order they are used) into
//   a ring of kStages stages with cp.async; each copy arrives on its stage's `full`
//   barrier when it lands (cp.async.mbarrier.arrive), so the producer never waits for its
//   own copies, only for a stage to be released. With tensor maps (ragged K/V, pages of 64
//   keys or more), whole Q, K and V tiles are one thread's TMA copies instead, which leave
//   the load/store unit to the consumers; cp.async by 128 threads fills the rest (a
//   request's last, partial tiles, zero-filled, and smaller pages).
// - warpgroups 1 and 2, the consumers, take 224 registers each and own 64 query rows; they
//   run both GEMMs as wgmma (S = Q K^T from shared memory, O += P V with P in registers)
//   with the softmax of tile j overlapped with P V of tile j - 1: S_j is issued, then
//   P_{j-1} V_{j-1}; S_j's softmax runs while P V is in flight, and O is rescaled after it.
//   They take turns issuing (named barriers). A consumer releases a K stage after its S, a
//   V stage after its P V, Q after the item's last S (one arrival a warp).
//
// Masks, the online softmax (a reference maximum moved only past a slack of 2^8), rows as
// (query, head) pairs with GQA packing, the lse and the output are BatchPrefill's
// (prefill.cuh), or with kStagedOutput the output goes out through shared memory and the
// bulk copy engine (store_output). Without sm_90a the block runs BatchPrefill's mma.sync
// form on 2 of its warpgroups (same 128-row items), so one launch shape serves every
// architecture.
#pragma once

#include "kjit/cluster.cuh"
#include "kjit/prefill.cuh"

namespace kjit::attention {

template <typename T, int kHeadDim, int kQoHeads, int kKvHeads, bool kCausal, bool kSoftCap, int kWindow, bool kLse,
          typename KvSource, bool kPackGqa, int kStages_ = 2, bool kTensorMaps = false, bool kWorkList = false,
          long long kGroupCacheBytes = 16ll << 20, bool kStagedOutput = false>
struct WarpSpecializedPrefill {
  using Kv = KvSource;
  static constexpr int kConsumers = 2;                 // warpgroups of 64 query rows
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kRows = 64 * kConsumers;        // query rows per block
  static constexpr int kKeys = 128;                    // keys per K/V tile
  // K/V tiles in the ring: as many as shared memory holds (the plan's choice: 3 at d128,
  // 4 at d64). With 2 the MMA warpgroups waited for K tiles (ncu: 22 polls of the barrier
  // per tile).
  static constexpr int kStages = kStages_;
  // V tiles: as many, or with kStagedOutput one stage fewer, whose room (kRows == kKeys rows)
  // stages the output for the bulk copy engine (store_output). V_j is used a tile after K_j,
  // so its copy has a tile's time more.
  static constexpr int kVStages = kStagedOutput ? kStages_ - 1 : kStages_;
  static constexpr int kStagingRows = kStagedOutput ? kRows : 0;
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr int kChunks = kHeadDim / 8;         // 16-byte chunks per row
  static constexpr int kGroup = kQoHeads / kKvHeads;
  static constexpr int kRowsPerQuery = kPackGqa ? kGroup : 1;
  static constexpr int kTileElements = kKeys * kHeadDim;
  // Q, the K and V rings, the output's staging tile (kStagedOutput), 1 KB to align them to
  // 1024 bytes (the wgmma swizzle works on address bits) and the barriers.
  static constexpr int kBarrierBytes = 256;
  static_assert(kVStages >= 2, "a V tile in flight while one is used");
  static_assert((6 + 4 * kStages) * 8 + 2 * 4 <= kBarrierBytes, "the barriers and the item slots fit");
  static constexpr int kSharedBytes = (kRows + kStagingRows + (kStages + kVStages) * kKeys) * kHeadDim * 2 + 1024 + kBarrierBytes;
  // 56 + 2 x 224 = 3 x 168 registers a thread: a consumer holds S (64 floats), P (32) and O
  // (head_dim / 2) at once (at 168 it spills, at 200 it does with a soft cap and a window).
  static constexpr int kProducerRegisters = 56, kConsumerRegisters = 224;
  // The block starts with 65536 / kThreads registers a thread, rounded down to 8; the
  // consumers' setmaxnreg.inc waits until the producer's decrease frees enough, forever if
  // it never can (32 / 240 hung an H100).
  static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= kThreads * (65536 / kThreads / 8 * 8),
                "the consumers' registers come from the producer's");
  static constexpr float kLog2e = 1.4426950408889634f;
  static_assert(sizeof(T) == 2, "16-bit inputs");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the consumers' O accumulators fit head_dim <= 128");
  // Tensor maps (the launch's, 128-byte swizzle, boxes of 64 dims): q [tokens, qo_heads, d]
  // in boxes of (64, kRowsPerQuery, kRows / kRowsPerQuery) where whole queries fill a tile,
  // k and v [tokens, kv_heads, d] in boxes of (64, 1, kKeys).
  // Paged, a box is a page's part of a tile: pages of at least 64 keys that divide a tile
  // or that tiles divide.
  static_assert(!kTensorMaps || KvSource::kPageSize == 0 ||
                    (KvSource::kPageSize >= 64 && (kKeys % KvSource::kPageSize == 0 || KvSource::kPageSize % kKeys == 0)),
                "tensor maps for ragged K/V or pages of whole boxes");
  static constexpr bool kTensorMapQ = kTensorMaps && kRows % kRowsPerQuery == 0;

  // Without sm_90a: the FlashAttention-2 form with mma.sync on the first 2 warpgroups.
  using Fallback = BatchPrefill<T, kHeadDim, kQoHeads, kKvHeads, kCausal, kSoftCap, kWindow, kLse, /*keys=*/32, KvSource,
                                kPackGqa, /*warpgroup_mma=*/false, /*warpgroups=*/kConsumers>;
  static_assert(Fallback::kRows == kRows && Fallback::kSharedBytes <= kSharedBytes && Fallback::kThreads <= kThreads,
                "the fallback fits the launch");

  // Producer: rows [first, first + kTileRows) of a tile in the wgmma layout, row r read at
  // row_offset(r), zero-filled from `valid` on. Thread p copies chunk p % kChunks of rows
  // p / kChunks + n * kRowStep (a multiple of 8, so one swizzle for all of them); offsets
  // are computed 4 rows at a time before their copies, so page-table reads overlap (a
  // loop, not unrolled: unrolled, the offsets of every row were kept live and spilled).
  static constexpr int kRowStep = 128 / kChunks;
  template <int kTileRows, typename RowOffset>
  static __device__ __forceinline__ void copy_rows(T* tile, const T* base, RowOffset row_offset, int first, int valid) {
    constexpr int kSteps = kTileRows / kRowStep, kBatch = 4;
    static_assert(kRowStep % 8 == 0 && kSteps % kBatch == 0, "whole batches of rows");
    const int p = threadIdx.x, chunk = p % kChunks, row = p / kChunks;
    T* dst = tile + wgmma::swizzled_offset<kTileRows>(row, chunk * 8);
#pragma unroll 1
    for (int n0 = 0; n0 < kSteps; n0 += kBatch) {
      long long offset[kBatch];
      bool ok[kBatch];
#pragma unroll
      for (int n = 0; n < kBatch; ++n) {
        const int r = first + row + (n0 + n) * kRowStep;
        ok[n] = r < valid;
        offset[n] = ok[n] ? row_offset(r) + chunk * 8 : 0;
      }
#pragma unroll
      for (int n = 0; n < kBatch; ++n) mma::copy_async(dst + (n0 + n) * kRowStep * 64, base + offset[n], ok[n]);
    }
  }

  // The fallback's item, not inlined: inlined into the item loop it spilled on sm_80.
  static __device__ __noinline__ void fallback_block(int head_block, int b, int tile, const T* __restrict__ q,
                                                     const T* __restrict__ k, const T* __restrict__ v,
                                                     const int* __restrict__ qo_indptr, const int* __restrict__ kv_indptr,
                                                     const int* __restrict__ kv_indices,
                                                     const int* __restrict__ kv_last_page_len, T* __restrict__ o,
                                                     float* __restrict__ lse, float sm_scale, float soft_cap) {
    Fallback::run_block(head_block, b, tile, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, o, lse, sm_scale,
                        soft_cap);
  }

  template <bool kValue>
  struct Flag {
    static constexpr bool value = kValue;
  };
  // A short tile's scores or a full one's, by a Flag.
  template <bool kShort, typename Full, typename Short>
  static __device__ __forceinline__ auto& pick(Flag<kShort>, Full& full, Short& short_tile) {
    if constexpr (kShort)
      return short_tile;
    else
      return full;
  }
  // The consumers take turns issuing their GEMMs (named barriers 2 and 3, 256 threads: the
  // waiting warpgroup and the one passing the turn), so one's softmax runs under the
  // other's GEMMs instead of both competing for the tensor cores, then both idling them.
  static __device__ __forceinline__ void wait_turn(int consumer) {
    asm volatile("bar.sync %0, 256;" ::"r"(2 + consumer) : "memory");
  }
  static __device__ __forceinline__ void pass_turn(int consumer) {
    asm volatile("bar.arrive %0, 256;" ::"r"(2 + (1 - consumer)) : "memory");
  }
  // kStagedOutput's epilogue of a consumer's 64 rows, by warp (a warp holds rows 16w..16w+15
  // of them): finish_rows into the warp's rows of the staging tile (row-major, a row's
  // head_dim values contiguous), then lane 0 sends them to the output as bulk copies, which
  // the copy engine writes while the warpgroup goes on to its next item. A copy takes a
  // query's packed rows at once where they fill the warp's rows evenly (its heads are
  // adjacent in the output), else one row. One lane issues them: the copy's addresses are
  // uniform registers, so copies from every lane ran as a loop over the lanes. Stored from
  // registers (store_rows), the output's 16 KB cost 1.1-1.5 us an item (ablation, H100:
  // causal 8 x 1024 11% faster without the stores); staged, it was 3% slower there, so
  // it is a knob, off by default. qo_index(row) is a row's (query, head) index into the
  // output and lse, or -1 past the request.
  static constexpr int kRowsPerCopy = kPackGqa && 16 % kRowsPerQuery == 0 ? kRowsPerQuery : 1;
  template <typename QoIndex>
  static __device__ __forceinline__ void store_output(const float (&o_acc)[kHeadDim / 8][4], const float (&m)[2], float (&l)[2],
                                                      int warp, int lane, T* staging, QoIndex qo_index, T* __restrict__ o,
                                                      float* __restrict__ lse) {
    auto warp_row = [&](int r) { return warp * 16 + lane / 4 + 8 * r; };
    if (lane == 0) bulk::store_wait_read();  // the previous item's copies have read the warp's rows
    __syncwarp();
    finish_rows<T, kHeadDim, kLse>(o_acc, m, l, lane % 4, [&](int r) { return qo_index(warp_row(r)); }, lse,
                                   [&](int r, long long, int chunk, uint4 value) {
                                     *reinterpret_cast<uint4*>(staging + warp_row(r) * kHeadDim + chunk * 8) = value;
                                   });
    wgmma::fence_shared_for_async_reads();  // the copy engine reads what this thread wrote
    __syncwarp();
    if (lane == 0) {
      // Rows past the request are whole queries too (rows = queries x kRowsPerQuery), so a
      // copy's rows are all in it or all past it.
#pragma unroll
      for (int copy = 0; copy < 16 / kRowsPerCopy; ++copy) {
        const int row = warp * 16 + copy * kRowsPerCopy;
        const long long index = qo_index(row);
        if (index >= 0) bulk::store(o + index * kHeadDim, staging + row * kHeadDim, kRowsPerCopy * kHeadDim * sizeof(T));
      }
      bulk::store_commit();
    }
  }

  static constexpr int kHeadBlocks = kPackGqa ? kKvHeads : kQoHeads;
  static constexpr int kQueriesPerTile = kPackGqa ? kRows / kGroup : kRows;  // the plan's grid z divisor
  // The order of the work items (head block, request, row tile): requests in groups whose
  // K/V, at the batch's mean length, fit kGroupCacheBytes of L2 (the family's
  // l2_group_bytes, which plan_prefill_work reads too); within a group heads
  // fastest, then requests, then row tiles from the last (every request's longest causal
  // tiles first, which balances the blocks); then the next group. All requests as one group
  // (16 requests of 256 queries over 4096 keys: 128 caches streamed at once, past L2) took
  // 741 us on an H100, these groups (here one request each) 497; one request at a time for
  // every batch also lost causal 8 x 1024 (334 -> 312 TFLOP/s: the longest tiles no longer
  // first across requests), which stays one group.
  struct ItemOrder {
    int batch, row_tiles, group;  // requests per group
    __device__ __forceinline__ ItemOrder(int batch_, int row_tiles_, const int* kv_indptr)
        : batch(batch_), row_tiles(row_tiles_), group(1) {
      if (batch <= 1) return;
      const long long keys = static_cast<long long>(kv_indptr[batch]) * (Kv::kPageSize > 0 ? Kv::kPageSize : 1);
      const long long request_bytes = max(1ll, keys / batch * kKvHeads * kHeadDim * 2 * static_cast<long long>(sizeof(T)));
      group = static_cast<int>(min(static_cast<long long>(batch), max(1ll, kGroupCacheBytes / request_bytes)));
    }
    __device__ __forceinline__ void item(int index, int& head_block, int& b, int& tile) const {
      const int group_items = kHeadBlocks * row_tiles * group;
      const int first = index / group_items * group, in_group = index % group_items;
      const int requests = min(group, batch - first);  // the last group may be smaller
      head_block = in_group % kHeadBlocks;
      b = first + in_group / kHeadBlocks % requests;
      tile = row_tiles - 1 - in_group / (kHeadBlocks * requests);
    }
  };
  // A block's item in its round-th turn: position blockIdx.x of the round-th run of gridDim.x
  // items, counted from the other end in odd rounds. Items come longest first, so a block that
  // took a long item takes a short one next (blockIdx.x + k * gridDim.x gave block 0 the
  // longest item of every run: 6% over the mean for causal 1 x 8192). Past the last item the
  // index only grows, so a loop can stop at the first one out of range.
  static __device__ __forceinline__ int block_item(int round) {
    const int position = (round & 1) ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
    return round * static_cast<int>(gridDim.x) + position;
  }
  // With a work list (kWorkList; the host's plan_prefill_work) the blocks take items from it
  // as a queue instead, each its next one when its producer is ready for it, so no block
  // waits at the end for another's longer share (static per-block shares, planned from
  // fitted item costs, left 2-4% of the blocks' time idle at causal 8 x 1024; the queue is
  // 0.7-2.0% faster at 2 x 4096 to 8 x 1024, H100). The list is [items, next, finished, the
  // items longest first], an item as (tile * batch + request) * kHeadBlocks + head block;
  // `next` and `finished` are 0 before a launch and again after it (the last block out resets
  // them), so a list serves any grid and repeated launches, one at a time.
  struct ItemQueue {
    static constexpr int kItems = 0, kNext = 1, kFinished = 2, kHeader = 3;
    // Thread 0 of the producer: the next item, or -1 once the list is done.
    static __device__ __forceinline__ int take(int* work_list) {
      const int position = atomicAdd(&work_list[kNext], 1);
      return position < work_list[kItems] ? work_list[kHeader + position] : -1;
    }
    // Thread 0 of the producer, after its last take: the last block out resets the queue.
    static __device__ __forceinline__ void finish(int* work_list) {
      __threadfence();  // this block's takes come before its count
      if (atomicAdd(&work_list[kFinished], 1) == static_cast<int>(gridDim.x) - 1) {
        work_list[kNext] = 0;
        work_list[kFinished] = 0;
      }
    }
  };
  // Both roles build the same items, so they walk the same tiles.
  struct WorkItem {
    int b, kv_head, head0, q_begin, rows, row0, shift, first_tile = 0, end_tile = 0;
    Kv kv;
    __device__ __forceinline__ WorkItem(int head_block, int b_, int tile, const int* qo_indptr, const int* kv_indptr,
                                        const int* kv_last_page_len)
        : b(b_), kv(kv_indptr, kv_last_page_len, b_) {
      kv_head = kPackGqa ? head_block : head_block / kGroup;
      head0 = kPackGqa ? head_block * kGroup : head_block;
      q_begin = qo_indptr[b];
      const int qo_len = qo_indptr[b + 1] - q_begin, kv_len = kv.length();
      rows = qo_len * kRowsPerQuery;
      row0 = tile * kRows;
      shift = kv_len - qo_len;
      if (row0 >= rows) return;
      const int first_query = row0 / kRowsPerQuery, last_query = (min(row0 + kRows, rows) - 1) / kRowsPerQuery;
      const int key_end = kCausal ? max(0, min(kv_len, last_query + shift + 1)) : kv_len;
      const int key_begin = kWindow > 0 ? max(0, first_query + shift - kWindow + 1) : 0;
      first_tile = key_begin / kKeys;
      end_tile = (key_end + kKeys - 1) / kKeys;
    }
    __device__ __forceinline__ bool has_tiles() const { return first_tile < end_tile; }
    WorkItem() = default;
  };

  // A K or V tile of keys [first, first + kKeys). Tiles all inside the request take a
  // fast path: ragged, one offset, then rows a constant stride apart (copies with
  // immediate offsets, no predicates); the general path's per-row address arithmetic made
  // the producer 31% of the kernel's instructions and cost 15% (causal 8192: 485 -> 558
  // TFLOP/s with this path).
  static __device__ __forceinline__ void copy_kv_rows(T* tile, const T* base, const Kv& kv, const int* kv_indices,
                                                      int kv_head, int first, int valid) {
    if constexpr (Kv::kKeyStride > 0) {
      if (first + kKeys <= valid) {
        const int p = threadIdx.x, chunk = p % kChunks, row = p / kChunks;
        T* dst = tile + wgmma::swizzled_offset<kKeys>(row, chunk * 8);
        const T* src = base + kv.offset(kv_indices, first + row, kv_head) + chunk * 8;
#pragma unroll
        for (int n = 0; n < kKeys / kRowStep; ++n)
          mma::copy_async(dst + n * kRowStep * 64, src + n * kRowStep * Kv::kKeyStride, true);
        return;
      }
    }
    // Paged, pages of whole row steps dividing the tile: a thread's rows share a page
    // kPageSize / kRowStep at a time; the tile's page numbers are read before any copy.
    if constexpr (Kv::kPageSize > 0 && Kv::kPageSize % kRowStep == 0 && kKeys % Kv::kPageSize == 0 &&
                  kKeys / Kv::kPageSize <= 16) {
      if (first + kKeys <= valid) {
        constexpr int kPages = kKeys / Kv::kPageSize, kStepsPerPage = Kv::kPageSize / kRowStep;
        const int p = threadIdx.x, chunk = p % kChunks, row = p / kChunks;
        T* dst = tile + wgmma::swizzled_offset<kKeys>(row, chunk * 8);
        int page[kPages];
#pragma unroll
        for (int i = 0; i < kPages; ++i) page[i] = kv_indices[kv.first_page + first / Kv::kPageSize + i];
#pragma unroll
        for (int i = 0; i < kPages; ++i) {
          const T* src = base + Kv::Cache::offset_in_page(page[i], row, kv_head) + chunk * 8;
#pragma unroll
          for (int n = 0; n < kStepsPerPage; ++n)
            mma::copy_async(dst + (i * kStepsPerPage + n) * kRowStep * 64, src + n * kRowStep * Kv::kSlotStride, true);
        }
        return;
      }
    }
    copy_rows<kKeys>(tile, base, [&](int key) { return kv.offset(kv_indices, key, kv_head); }, first, valid);
  }
  // Paged TMA: the boxes of a tile are its pages (or its part of one page).
  static constexpr bool kPagedMaps = kTensorMaps && Kv::kPageSize > 0;
  static constexpr int kBoxRows = kPagedMaps && Kv::kPageSize < kKeys ? Kv::kPageSize : kKeys;
  // The tile (V's where `value`), landing on `full`: by TMA where it lies inside the
  // request, else copy_kv_rows.
  static __device__ __forceinline__ void load_kv_tile(T* tile, const T* base, const bulk::TensorMap* map, const Kv& kv,
                                                      const int* kv_indices, int kv_head, int first, int valid, bool value,
                                                      unsigned long long* full) {
    if constexpr (kTensorMaps) {
      if (first + kKeys <= valid) {
        if (threadIdx.x == 0) {
          bulk::barrier_expect_bytes(full, kTileElements * sizeof(T));
          if constexpr (Kv::kPageSize == 0) {
#pragma unroll
            for (int half = 0; half < kHeadDim / 64; ++half)
              bulk::copy_tile(tile + half * kKeys * 64, map, half * 64, kv_head, kv.first + first, full);
          } else {
            int page[kKeys / kBoxRows];  // all page numbers first, so their loads overlap
#pragma unroll
            for (int i = 0; i < kKeys / kBoxRows; ++i) page[i] = kv_indices[kv.first_page + (first + i * kBoxRows) / Kv::kPageSize];
#pragma unroll
            for (int i = 0; i < kKeys / kBoxRows; ++i) {
              const int row = Kv::map_row(page[i], (first + i * kBoxRows) % Kv::kPageSize, kv_head, value);
#pragma unroll
              for (int half = 0; half < kHeadDim / 64; ++half)
                bulk::copy_tile(tile + half * kKeys * 64 + i * kBoxRows * 64, map, half * 64, Kv::map_head(kv_head), row, full);
            }
          }
        } else {
          bulk::barrier_arrive(full);
        }
        return;
      }
    }
    copy_kv_rows(tile, base, kv, kv_indices, kv_head, first, valid);
    mma::copy_arrive(full);
  }

  static __device__ void run(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const int* __restrict__ qo_indptr, const int* __restrict__ kv_indptr,
                             const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                             T* __restrict__ o, float* __restrict__ lse, float sm_scale, float soft_cap, long long batch_size,
                             long long max_qo_len, const bulk::TensorMap* q_map = nullptr,
                             const bulk::TensorMap* k_map = nullptr, const bulk::TensorMap* v_map = nullptr,
                             int* __restrict__ work_list = nullptr) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (threadIdx.x >= Fallback::kThreads) return;
#pragma unroll 1
    const int fallback_row_tiles = static_cast<int>((max_qo_len + kQueriesPerTile - 1) / kQueriesPerTile);
    const int fallback_items = kHeadBlocks * static_cast<int>(batch_size) * fallback_row_tiles;
    for (int round = 0, index; (index = block_item(round)) < fallback_items; ++round) {
      int head_block, b, tile;  // (the order rebuilt per item: kept across the call, it went to the stack)
      ItemOrder(static_cast<int>(batch_size), fallback_row_tiles, kv_indptr).item(index, head_block, b, tile);
      fallback_block(head_block, b, tile, q, k, v, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, o, lse, sm_scale,
                     soft_cap);
      Fallback::sync_threads();  // shared memory is reused by the next item
    }
#else
    const int batch = static_cast<int>(batch_size);
    const int row_tiles = static_cast<int>((max_qo_len + kQueriesPerTile - 1) / kQueriesPerTile);
    const int items = kHeadBlocks * batch * row_tiles;
    const bool queued = kWorkList && work_list != nullptr;
    // An item's WorkItem; false for -1, the end of the block's items.
    auto make_item = [&](int item, WorkItem& w) {
      if (item < 0) return false;
      w = WorkItem(item % kHeadBlocks, item / kHeadBlocks % batch, item / kHeadBlocks / batch, qo_indptr, kv_indptr,
                   kv_last_page_len);
      return true;
    };
    const float kNegInf = -__int_as_float(0x7f800000);
    extern __shared__ __align__(128) unsigned char dynamic_shared[];
    T* q_tile = reinterpret_cast<T*>(dynamic_shared + (-mma::shared_address(dynamic_shared) & 1023u));
    T* k_tiles = q_tile + kRows * kHeadDim;
    T* v_tiles = k_tiles + kStages * kTileElements;
    T* o_staging = v_tiles + kVStages * kTileElements;
    // Barriers: Q landed / released; per stage K and V landed (128 producer arrivals: each
    // thread's cp.async, or for a TMA tile one arrival with its bytes and 127 plain ones) and
    // released (one arrival per consumer warp).
    unsigned long long* q_full = reinterpret_cast<unsigned long long*>(o_staging + kStagingRows * kHeadDim);
    unsigned long long* q_empty = q_full + 1;
    unsigned long long* k_full = q_empty + 1;
    unsigned long long* v_full = k_full + kStages;
    unsigned long long* k_empty = v_full + kStages;
    unsigned long long* v_empty = k_empty + kStages;
    // The producer hands each round's item to the consumers through two slots (round % 2),
    // each with a barrier for written (thread 0 of the producer) and read (a consumer warp).
    unsigned long long* item_full = v_empty + kStages;
    unsigned long long* item_empty = item_full + 2;
    volatile int* item_slot = reinterpret_cast<volatile int*>(item_empty + 2);
    if (threadIdx.x == 0) {
      bulk::barrier_init(q_full, 128);
      bulk::barrier_init(q_empty, 4 * kConsumers);
      for (int slot = 0; slot < 2; ++slot) {
        bulk::barrier_init(&item_full[slot], 1);
        bulk::barrier_init(&item_empty[slot], 4 * kConsumers);
      }
      for (int s = 0; s < kStages; ++s) {
        bulk::barrier_init(&k_full[s], 128);
        bulk::barrier_init(&v_full[s], 128);
        bulk::barrier_init(&k_empty[s], 4 * kConsumers);
        bulk::barrier_init(&v_empty[s], 4 * kConsumers);
      }
    }
    __syncthreads();
    const int warpgroup = threadIdx.x / 128;

    // Ring positions run on across items: tile n of the block uses K stage n % kStages in
    // round n / kStages (a barrier's phase parity), V stage n % kVStages in round
    // n / kVStages; Q's round is the item's count.
    if (warpgroup == 0) {
      wgmma::lower_registers<kProducerRegisters>();
      int tile_count = 0, q_round = 0;
      const ItemOrder order(batch, row_tiles, kv_indptr);
      for (int round = 0;; ++round) {
        // Thread 0 takes the round's item (from the queue, else the static order) and
        // publishes it; the warpgroup reads it after a barrier of its own.
        if (threadIdx.x == 0) {
          int item = -1;
          if (queued) {
            item = ItemQueue::take(work_list);
          } else if (block_item(round) < items) {
            int head_block, b, tile;
            order.item(block_item(round), head_block, b, tile);
            item = (tile * batch + b) * kHeadBlocks + head_block;
          }
          bulk::barrier_wait(&item_empty[round & 1], ((round >> 1) & 1) ^ 1);
          item_slot[round & 1] = item;
          bulk::barrier_arrive(&item_full[round & 1]);
        }
        asm volatile("bar.sync 4, 128;" ::: "memory");  // (ids 2 and 3 are the consumers' turns)
        WorkItem w;
        if (!make_item(item_slot[round & 1], w)) break;
        if (!w.has_tiles()) continue;
        const int kv_len = w.kv.length();
        // In the order the consumers use them: K_0, Q, then K_j before V_{j-1}. K_0 goes
        // before Q because its stage is free earlier (the consumers release K stages as each
        // S lands, Q only after the item's last S), so only Q is left to copy then.
        {
          const int stage = tile_count % kStages;
          bulk::barrier_wait(&k_empty[stage], ((tile_count / kStages) & 1) ^ 1);  // a fresh barrier's "previous" phase has completed
          load_kv_tile(k_tiles + stage * kTileElements, k, k_map, w.kv, kv_indices, w.kv_head, w.first_tile * kKeys, kv_len,
                       false, &k_full[stage]);
        }
        bulk::barrier_wait(q_empty, (q_round++ & 1) ^ 1);
        if (kTensorMapQ && w.row0 + kRows <= w.rows) {
          if (threadIdx.x == 0) {
            bulk::barrier_expect_bytes(q_full, kRows * kHeadDim * sizeof(T));
#pragma unroll
            for (int half = 0; half < kHeadDim / 64; ++half)
              bulk::copy_tile(q_tile + half * kRows * 64, q_map, half * 64, w.head0, w.q_begin + w.row0 / kRowsPerQuery, q_full);
          } else {
            bulk::barrier_arrive(q_full);
          }
        } else {
          copy_rows<kRows>(q_tile, q, [&](int row) {
            return (static_cast<long long>(w.q_begin + row / kRowsPerQuery) * kQoHeads + w.head0 + row % kRowsPerQuery) * kHeadDim;
          }, w.row0, w.rows);
          mma::copy_arrive(q_full);
        }
        for (int j = w.first_tile + 1; j <= w.end_tile; ++j) {
          if (j < w.end_tile) {
            const int n = tile_count + (j - w.first_tile), stage = n % kStages;
            bulk::barrier_wait(&k_empty[stage], ((n / kStages) & 1) ^ 1);
            load_kv_tile(k_tiles + stage * kTileElements, k, k_map, w.kv, kv_indices, w.kv_head, j * kKeys, kv_len, false,
                         &k_full[stage]);
          }
          {
            const int n = tile_count + (j - 1 - w.first_tile), stage = n % kVStages;
            bulk::barrier_wait(&v_empty[stage], ((n / kVStages) & 1) ^ 1);
            load_kv_tile(v_tiles + stage * kTileElements, v, v_map, w.kv, kv_indices, w.kv_head, (j - 1) * kKeys, kv_len,
                         true, &v_full[stage]);
          }
        }
        tile_count += w.end_tile - w.first_tile;
      }
      mma::copy_wait_all();  // nothing in flight into shared memory when the warpgroup leaves
      if (queued && threadIdx.x == 0) ItemQueue::finish(work_list);
      return;
    }

    wgmma::raise_registers<kConsumerRegisters>();
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // wgmma operands (BatchPrefill's layout): Q K-major, this warpgroup's rows 64 on; K
    // tiles K-major; V tiles MN-major, the next 64 dims kKeys * 128 bytes on.
    const unsigned long long q_descriptor = wgmma::advance(wgmma::descriptor(q_tile, 16, 1024), consumer * 64 * 128);
    const unsigned long long k_descriptor = wgmma::descriptor(k_tiles, 16, 1024);
    const unsigned long long v_descriptor = wgmma::descriptor(v_tiles, kKeys * 128, 1024);
    const float scale = kSoftCap ? sm_scale / soft_cap : sm_scale * kLog2e;
    auto release = [&](unsigned long long* barrier) {
      __syncwarp();
      if (lane == 0) bulk::barrier_arrive(barrier);
    };
    int tile_count = 0, q_round = 0;
    if (consumer == 1) pass_turn(consumer);  // consumer 0 issues first
    // The next item, read while this one's last P V runs: read at the item's start, its
    // request bounds took 0.4-0.7 us of every item boundary, their loads queued behind the
    // output's stores (H200 traces). Here: causal 8 x 1024 +8%, 1 x 8192 -1%; read after
    // the P V has landed, +5% and -0.3%.
    // The round's item from the producer's slot (the slot released for its next use).
    auto published_item = [&](int round) {
      bulk::barrier_wait(&item_full[round & 1], (round >> 1) & 1);
      const int item = item_slot[round & 1];
      release(&item_empty[round & 1]);
      return item;
    };
    WorkItem next;
    bool have_next = false, next_valid = false;
    for (int round = 0;; ++round) {
      WorkItem w;
      if (have_next ? !next_valid : !make_item(published_item(round), w)) break;
      if (have_next) w = next;
      have_next = false;
      if (w.row0 >= w.rows) continue;
      const int kv_len = w.kv.length();
      const int rows = w.rows, shift = w.shift;
      const int wg_row0 = w.row0 + consumer * 64;  // this warpgroup's rows
      const int wg_first_query = wg_row0 / kRowsPerQuery;
      const int wg_last_query = (min(wg_row0 + 64, rows) - 1) / kRowsPerQuery;  // (past the request: all rows masked)
      const bool partial_rows = wg_row0 + 64 > rows;
      const int mask_after = kCausal ? wg_first_query + shift : kv_len - 1;  // keys past it need the mask
      int last_key[2], first_key[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = wg_row0 + warp * 16 + g + 8 * r, query_end = row / kRowsPerQuery + shift;
        last_key[r] = row >= rows ? -1 : kCausal ? query_end : kv_len - 1;
        first_key[r] = kWindow > 0 && !kCausal ? query_end - kWindow + 1 : 0;
      }

      // S of the first N keys of a tile (s as N / 8 groups: 128 keys, or 64 for a short last tile).
      auto issue_scores = [&](auto& s, int stage) {
        constexpr int kWidth = static_cast<int>(sizeof(s) / sizeof(s[0])) * 8;
        const unsigned long long k_tile = wgmma::advance(k_descriptor, stage * kTileElements * 2);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk)
          wgmma::mma_shared<T, kWidth>(s, wgmma::advance(q_descriptor, (kk / 4) * kRows * 128 + (kk % 4) * 32),
                                       wgmma::advance(k_tile, (kk / 4) * kKeys * 128 + (kk % 4) * 32), kk > 0);
        wgmma::commit();
      };
      float o_acc[kHeadDim / 8][4];
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
      unsigned p[kKeys / 16][4];  // probabilities of the tile whose P V is next, as A fragments
      auto issue_accumulate = [&](auto short_tile, int stage) {
        constexpr int kSteps = decltype(short_tile)::value ? kKeys / 32 : kKeys / 16;
        wgmma::accumulate_probabilities<T, kHeadDim, kKeys / 16, kSteps>(
            o_acc, p, wgmma::advance(v_descriptor, stage * kTileElements * 2));
      };

      float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
      // Masks tile j's scores, moves the reference maxima (l rescaled now, O by the returned
      // alpha once its P V has landed) and turns the scores into probabilities.
      // Two copies, with and without the mask: as one, the compiler computed the mask for
      // every tile (predicated selects), which was a third of the softmax's instructions.
      auto softmax_tile = [&](auto masked, auto& s, int j, float (&alpha)[2]) {
        constexpr int kGroups = static_cast<int>(sizeof(s) / sizeof(s[0]));
        cap_and_mask<kCausal, kSoftCap, kWindow>(s, decltype(masked)::value, j * kKeys, t, last_key, first_key, scale, soft_cap);
        // Row maxima and sums as trees over the row's values (a chain of 32 dependent
        // fmaxf / adds per row was the softmax's critical path).
        constexpr int kPairs = kGroups / 2;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float part[kPairs];
#pragma unroll
          for (int i = 0; i < kPairs; ++i)
            part[i] = fmaxf(fmaxf(s[2 * i][2 * r], s[2 * i][2 * r + 1]), fmaxf(s[2 * i + 1][2 * r], s[2 * i + 1][2 * r + 1]));
#pragma unroll
          for (int width = kPairs / 2; width >= 1; width /= 2)
#pragma unroll
            for (int i = 0; i < width; ++i) part[i] = fmaxf(part[i], part[i + width]);
          float mx = part[0];
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          constexpr float kSlack = 8.f;
          const float exp_scale = kSoftCap ? 1.f : scale;
          const float m_max = fmaxf(m[r], mx * exp_scale);
          alpha[r] = 1.f;
          if (m_max > m[r] + kSlack) {
            alpha[r] = mma::fast_exp2(m[r] - m_max);
            m[r] = m_max;
            l[r] *= alpha[r];
          }
          const float base = m[r] == kNegInf ? 0.f : m[r];
#pragma unroll
          for (int n = 0; n < kGroups; ++n) {
            s[n][2 * r] = mma::fast_exp2(fmaf(s[n][2 * r], exp_scale, -base));
            s[n][2 * r + 1] = mma::fast_exp2(fmaf(s[n][2 * r + 1], exp_scale, -base));
          }
#pragma unroll
          for (int i = 0; i < kPairs; ++i)
            part[i] = (s[2 * i][2 * r] + s[2 * i][2 * r + 1]) + (s[2 * i + 1][2 * r] + s[2 * i + 1][2 * r + 1]);
#pragma unroll
          for (int width = kPairs / 2; width >= 1; width /= 2)
#pragma unroll
            for (int i = 0; i < width; ++i) part[i] += part[i + width];
          l[r] += part[0];
        }
      };
      auto softmax = [&](auto& s, int j, float (&alpha)[2]) {
        constexpr int kWidth = static_cast<int>(sizeof(s) / sizeof(s[0])) * 8;
        const int key0 = j * kKeys;
        // A short tile is a last one, masked in practice: no copy without the mask (code size
        // counts at item boundaries).
        if (kWidth < kKeys || key0 + kWidth - 1 > mask_after || (kWindow > 0 && key0 <= wg_last_query + shift - kWindow) || partial_rows)
          softmax_tile(Flag<true>{}, s, j, alpha);
        else
          softmax_tile(Flag<false>{}, s, j, alpha);
      };
      // P from the probabilities (the accumulator layout of S is the A layout of P); only
      // once the previous P V has landed: wgmma reads its A registers until then.
      auto pack_probabilities = [&](const auto& s) {
#pragma unroll
        for (int kk = 0; kk < static_cast<int>(sizeof(s) / sizeof(s[0])) / 2; ++kk) {
          p[kk][0] = mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          p[kk][1] = mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          p[kk][2] = mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          p[kk][3] = mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
      };

      if (w.has_tiles()) {
        // A short last tile: where no row of this warpgroup sees past the first 64 keys of
        // the item's last tile (half the causal items at 32 queries an item), its S is
        // m64n64 and its P V takes half the steps. Every shape runs from issue to wait in
        // its own copy of the code: a wgmma in flight where two paths merge makes ptxas
        // serialize every wgmma of the kernel. (The host's work-list plan costs such items
        // by the same rule, on the item's last row: PrefillWorkPlanner::plan.)
        const int wg_key_end = kCausal ? min(kv_len, wg_last_query + shift + 1) : kv_len;
        const bool short_last = wg_key_end - (w.end_tile - 1) * kKeys <= kKeys / 2;
        bulk::barrier_wait(q_full, q_round++ & 1);
        float s_full[kKeys / 8][4], s_short[kKeys / 16][4];
        float alpha[2];
        int stage = tile_count % kStages;
        auto first_scores = [&](auto short_tile) {
          auto& s = pick(short_tile, s_full, s_short);
          wait_turn(consumer);
          bulk::barrier_wait(&k_full[stage], (tile_count / kStages) & 1);
          wgmma::fence_shared_for_async_reads();  // cp.async wrote through the generic proxy
          issue_scores(s, stage);
          pass_turn(consumer);
          wgmma::wait<0>();
          wgmma::hold(s);
          release(&k_empty[stage]);
          // Q is free once the item's last S has landed (released after the last softmax
          // instead, the next item's Q came 0.6 us after the consumers were ready for it).
          if (w.first_tile + 1 == w.end_tile) release(q_empty);
          softmax(s, w.first_tile, alpha);  // O is still 0: nothing to rescale
          pack_probabilities(s);
        };
        auto next_tile = [&](auto short_tile, int j) {
          auto& s = pick(short_tile, s_full, s_short);
          // V's own ring position, also where the rings match (reusing the K stage there made
          // the tile loop 1046 instructions instead of 1016)
          const int previous = tile_count % kVStages;
          const int previous_round = (tile_count / kVStages) & 1;
          ++tile_count;
          stage = tile_count % kStages;
          wait_turn(consumer);
          bulk::barrier_wait(&k_full[stage], (tile_count / kStages) & 1);
          wgmma::fence_shared_for_async_reads();
          issue_scores(s, stage);
          bulk::barrier_wait(&v_full[previous], previous_round);
          wgmma::fence_shared_for_async_reads();
          issue_accumulate(Flag<false>{}, previous);
          pass_turn(consumer);
          wgmma::wait<1>();  // S_j landed; P_{j-1} V_{j-1} may still run
          wgmma::hold(s);
          release(&k_empty[stage]);
          if (j + 1 == w.end_tile) release(q_empty);
          softmax(s, j, alpha);
          wgmma::wait<0>();
          wgmma::hold(o_acc);
          release(&v_empty[previous]);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (alpha[r] != 1.f)
#pragma unroll
              for (int d = 0; d < kHeadDim / 8; ++d) {
                o_acc[d][2 * r] *= alpha[r];
                o_acc[d][2 * r + 1] *= alpha[r];
              }
          pack_probabilities(s);
        };
        auto last_accumulate = [&](auto short_tile) {
          // (taken before the P V is issued: a wgmma in flight across the barrier wait's loop
          // would make ptxas serialize the wgmmas)
          const int next_item = published_item(round + 1);
          wait_turn(consumer);
          const int v_stage = tile_count % kVStages;
          bulk::barrier_wait(&v_full[v_stage], (tile_count / kVStages) & 1);
          wgmma::fence_shared_for_async_reads();
          issue_accumulate(short_tile, v_stage);
          pass_turn(consumer);
          next_valid = make_item(next_item, next);
          have_next = true;
          wgmma::wait<0>();
          wgmma::hold(o_acc);
          release(&v_empty[v_stage]);
          ++tile_count;
        };
        const bool one_tile = w.first_tile + 1 == w.end_tile;
        if (one_tile && short_last)
          first_scores(Flag<true>{});
        else
          first_scores(Flag<false>{});
        const int full_end = short_last ? w.end_tile - 1 : w.end_tile;
        for (int j = w.first_tile + 1; j < full_end; ++j) next_tile(Flag<false>{}, j);
        if (short_last && !one_tile) next_tile(Flag<true>{}, w.end_tile - 1);
        if (short_last)
          last_accumulate(Flag<true>{});
        else
          last_accumulate(Flag<false>{});
      }

      auto qo_index = [&](int wg_row) {  // a row of this warpgroup's 64
        const int row = wg_row0 + wg_row;
        return row < rows ? static_cast<long long>(w.q_begin + row / kRowsPerQuery) * kQoHeads + w.head0 + row % kRowsPerQuery
                          : -1ll;
      };
      if constexpr (kStagedOutput)
        store_output(o_acc, m, l, warp, lane, o_staging + consumer * 64 * kHeadDim, qo_index, o, lse);
      else
        store_rows<T, kHeadDim, kLse>(o_acc, m, l, t, [&](int r) { return qo_index(warp * 16 + g + 8 * r); }, o, lse);
    }
    if (kStagedOutput && lane == 0) bulk::store_wait();  // the last item's rows written before the block leaves
#endif
  }
};

}  // namespace kjit::attention
