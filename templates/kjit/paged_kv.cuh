// A paged KV cache as FlashInfer lays it out: request b owns pages
// kv_indices[kv_indptr[b] .. kv_indptr[b + 1]), all full except the last, which
// holds kv_last_page_len[b] tokens. A page of K (or V) is
//   NHD: [page_size, kv_heads, head_dim]      HND: [kv_heads, page_size, head_dim]
// inside a cache tensor of [pages, ...] such pages, or, with K and V combined in one
// tensor [pages, 2, ...], the K page followed by its V page (kCombined: pages are
// 2 * kPageElements apart and V starts kPageElements after K).
#pragma once

#include "kjit/common.cuh"

namespace kjit::paged_kv {

enum class Layout { NHD, HND };

template <Layout kLayout, int kPageSize, int kKvHeads, int kHeadDim, bool kCombined = false>
struct PagedKv {
  static constexpr long long kPageElements = static_cast<long long>(kPageSize) * kKvHeads * kHeadDim;
  static constexpr long long kPageStride = kCombined ? 2 * kPageElements : kPageElements;
  static constexpr long long kValueOffset = kCombined ? kPageElements : 0;  // V's start within the combined tensor

  // Tokens of request b (0 for a request without pages).
  static __device__ __forceinline__ int length(const int* kv_indptr, const int* kv_last_page_len, int b) {
    const int pages = kv_indptr[b + 1] - kv_indptr[b];
    return pages > 0 ? (pages - 1) * kPageSize + kv_last_page_len[b] : 0;
  }

  // Element offset of (page, slot in the page, kv head h, dim 0) in a cache tensor.
  static __device__ __forceinline__ long long offset_in_page(long long page, int slot, int h) {
    if constexpr (kLayout == Layout::NHD) return page * kPageStride + (static_cast<long long>(slot) * kKvHeads + h) * kHeadDim;
    else return page * kPageStride + (static_cast<long long>(h) * kPageSize + slot) * kHeadDim;
  }
  // The same for token t of a request whose pages start at kv_indices[first_page].
  static __device__ __forceinline__ long long offset(const int* kv_indices, int first_page, int t, int h) {
    return offset_in_page(kv_indices[first_page + t / kPageSize], t % kPageSize, h);
  }
};

}  // namespace kjit::paged_kv

namespace kjit::paged_kv {

// append_paged_kv_cache: token i of the ragged new K/V goes to request
// batch_indices[i] at position positions[i] (kv_last_page_len already counts it).
// One block per token, 16 bytes per thread. With a combined cache, k_cache and
// v_cache are the same tensor (v_cache = k_cache + Cache::kValueOffset). Tokens whose request or position lies
// outside the page table are skipped, so a bad index never writes out of bounds.
template <typename T, Layout kLayout, int kPageSize, int kKvHeads, int kHeadDim, bool kCombined = false>
struct AppendPagedKv {
  using Cache = PagedKv<kLayout, kPageSize, kKvHeads, kHeadDim, kCombined>;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kVecsPerHead = kHeadDim / kVec;

  static __device__ void run(const T* __restrict__ key, const T* __restrict__ value, const int* __restrict__ batch_indices,
                             const int* __restrict__ positions, T* __restrict__ k_cache, T* __restrict__ v_cache,
                             const int* __restrict__ kv_indices, const int* __restrict__ kv_indptr,
                             const int* __restrict__ kv_last_page_len, long long batch_size) {
    const long long i = blockIdx.x;
    const int b = batch_indices[i], pos = positions[i];
    if (b < 0 || b >= batch_size || pos < 0 || pos >= Cache::length(kv_indptr, kv_last_page_len, b)) return;
    for (int e = threadIdx.x; e < kKvHeads * kVecsPerHead; e += blockDim.x) {
      const int h = e / kVecsPerHead, lane = e % kVecsPerHead;
      const long long from = (i * kKvHeads + h) * kHeadDim + lane * kVec;
      const long long to = Cache::offset(kv_indices, kv_indptr[b], pos, h) + lane * kVec;
      Vec<T, kVec> x;
      x.load(key + from);
      x.store(k_cache + to);
      x.load(value + from);
      x.store(v_cache + to);
    }
  }
};

}  // namespace kjit::paged_kv
