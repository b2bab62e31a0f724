// Batch decode over a paged KV cache, with FlashInfer's plan/run split.
//
//   kjit::BatchDecode decode(engine, R"({"op": "batch_decode", "num_qo_heads": 32,
//       "num_kv_heads": 8, "head_dim": 128, "page_size": 16, "dtype": "bfloat16"})");
//   // Once per batch composition, from host copies of the page table:
//   kjit::DecodePlan plan = decode.plan(kv_indptr_host, kv_last_page_len_host);
//   // Every step: no host work beyond the launches' argument checks.
//   decode.run(plan, {q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
//                     output, lse, workspace}, sm_scale, stream);
//
// A plan splits each request's KV into chunks when the batch alone would leave the
// GPU idle (few requests, long KV); the chunks' partial states are then merged by
// a merge_states kernel. The workspace (plan.workspace_bytes of device memory, may
// be null when 0) holds those partial states.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kjit/kjit.hpp"

#pragma GCC visibility push(default)

namespace kjit {

struct DecodePlan {
  std::int64_t batch_size = 0;
  std::int64_t num_chunks = 1;  // KV chunks per request, one block each
  std::int64_t chunk_size = 1;  // tokens per chunk
  std::size_t workspace_bytes = 0;
};

// Device pointers for one step; lse is null when the spec says "return_lse": false.
// With "kv_storage": "combined", k_cache is the [pages, 2, ...] tensor and v_cache null.
// k_scale, v_scale: the dequantization factors of an fp8 KV cache (ignored otherwise).
struct DecodeBuffers {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const std::int32_t* kv_indptr;
  const std::int32_t* kv_indices;
  const std::int32_t* kv_last_page_len;
  void* output;
  float* lse;
  void* workspace;
  float k_scale = 1.f;
  float v_scale = 1.f;
};

// The split rule by itself: requests of kv_lengths tokens (after any sliding window),
// blocks_per_request blocks per chunk of one request, on a GPU of num_sms SMs that each
// hold blocks_per_sm decode blocks at once.
DecodePlan plan_decode_split(std::span<const std::int64_t> kv_lengths, std::int64_t blocks_per_request,
                             std::int64_t num_qo_heads, std::int64_t head_dim, int num_sms, int blocks_per_sm = 3);

class BatchDecode {
 public:
  // A batch_decode spec; builds its decode kernel and the merge kernel it needs.
  BatchDecode(Engine& engine, std::string_view spec_json);

  // kv_indptr has batch_size + 1 entries, kv_last_page_len batch_size. num_chunks > 0
  // fixes the KV split instead of the planner's choice (variant sweeps).
  DecodePlan plan(std::span<const std::int32_t> kv_indptr, std::span<const std::int32_t> kv_last_page_len,
                  std::int64_t num_chunks = 0) const;
  void run(const DecodePlan& plan, const DecodeBuffers& buffers, double sm_scale, void* stream = nullptr) const;

  const Kernel& decode_kernel() const { return decode_; }
  const Kernel& merge_kernel() const { return merge_; }

 private:
  Kernel decode_, merge_;
  std::int64_t num_qo_heads_ = 0, head_dim_ = 0, page_size_ = 0, window_ = 0, blocks_per_request_ = 0;
  bool return_lse_ = true, combined_ = false, scaled_ = false;
  int num_sms_ = 0, blocks_per_sm_ = 0;
};

// The work queue of the warp-specialized batch_prefill with "work_list": true. Its blocks
// (one per SM) otherwise walk the work items (128 rows of a request, for one head block) in
// a static order that can leave an SM 5-12% more tiles than the mean (causal batches of 2-8
// equal requests). With the list they take the items one at a time as they finish, longest
// first within the kernel's groups of requests that share L2. From host copies of qo_indptr
// and kv_indptr (and kv_last_page_len for a paged spec); copy the result to the device and
// pass it as the kernel's work_list argument, launched with max_qo_len = the longest
// request's queries. The kernel keeps its queue position in the list and resets it as its
// last block leaves, so one device copy serves every launch for these lengths (CUDA graph
// replays too), one launch at a time: launches that may overlap (other streams) each need
// their own copy.
std::vector<std::int32_t> plan_prefill_work(const KernelInfo& prefill, std::span<const std::int32_t> qo_indptr,
                                            std::span<const std::int32_t> kv_indptr,
                                            std::span<const std::int32_t> kv_last_page_len = {});

// The same, with the kernel's geometry (items, tiles, L2 groups) read from its spec once:
// a server that plans every step builds one per kernel and calls plan() (the function
// above re-reads the spec).
class PrefillWorkPlanner {
 public:
  explicit PrefillWorkPlanner(const KernelInfo& prefill);
  std::vector<std::int32_t> plan(std::span<const std::int32_t> qo_indptr, std::span<const std::int32_t> kv_indptr,
                                 std::span<const std::int32_t> kv_last_page_len = {}) const;
  // plan(...).size() for these queries, without planning (the keys do not change it).
  std::size_t list_size(std::span<const std::int32_t> qo_indptr) const;

 private:
  std::int64_t kv_heads_ = 0, head_dim_ = 0, window_ = 0, page_size_ = 0;
  std::int64_t rows_per_item_ = 0, keys_per_tile_ = 0, rows_per_query_ = 1, head_blocks_ = 0, queries_per_tile_ = 0;
  std::int64_t l2_group_bytes_ = 0;
  bool causal_ = true, paged_ = false;
};

}  // namespace kjit

#pragma GCC visibility pop
