// BatchDecode: plan (host, once per batch composition) and run (two launches at most).
#include "kjit/attention.hpp"

#include <algorithm>
#include <array>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "families/family.hpp"
#include "runtime/driver.hpp"
#include "spec/spec.hpp"

namespace kjit {
namespace {

constexpr std::size_t kAlign = 256;
std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Workspace: partial outputs [batch, chunk, head, dim], partial lse [batch, chunk, head],
// and the merged lse [batch, head] when the caller does not want it.
struct WorkspaceLayout {
  std::size_t partial_output = 0, partial_lse = 0, merged_lse = 0, total = 0;
};
WorkspaceLayout workspace_layout(const DecodePlan& plan, std::int64_t heads, std::int64_t head_dim) {
  WorkspaceLayout w;
  if (plan.num_chunks <= 1) return w;
  const auto rows = static_cast<std::size_t>(plan.batch_size * plan.num_chunks * heads);
  w.partial_lse = aligned(rows * static_cast<std::size_t>(head_dim) * 4);
  w.merged_lse = w.partial_lse + aligned(rows * 4);
  w.total = w.merged_lse + aligned(static_cast<std::size_t>(plan.batch_size * heads) * 4);
  return w;
}

std::int64_t longest_of(std::span<const std::int64_t> kv_lengths) {
  std::int64_t longest = 0;
  for (std::int64_t len : kv_lengths) longest = std::max(longest, len);
  return longest;
}

// Every request's KV in `chunks` chunks of the longest request's length / chunks (a
// shorter request's last chunks may be empty).
DecodePlan split_plan(std::span<const std::int64_t> kv_lengths, std::int64_t chunks, std::int64_t heads,
                      std::int64_t head_dim) {
  DecodePlan plan;
  plan.batch_size = static_cast<std::int64_t>(kv_lengths.size());
  plan.num_chunks = chunks;
  plan.chunk_size = (std::max<std::int64_t>(longest_of(kv_lengths), 1) + chunks - 1) / chunks;
  plan.workspace_bytes = workspace_layout(plan, heads, head_dim).total;
  return plan;
}

}  // namespace

DecodePlan plan_decode_split(std::span<const std::int64_t> kv_lengths, std::int64_t blocks_per_request,
                             std::int64_t num_qo_heads, std::int64_t head_dim, int num_sms, int blocks_per_sm) {
  const auto batch = static_cast<std::int64_t>(kv_lengths.size());
  const std::int64_t longest = longest_of(kv_lengths);
  // Blocks run in waves of `slots` (blocks_per_sm decode blocks fit an SM). Splitting every
  // request into c chunks gives batch * blocks_per_request * c blocks; take a c whose
  // last wave is full enough (uniform lengths make every block take the same time), with
  // chunks of at least 256 tokens (a chunk's partial state is written and read back).
  const double slots = static_cast<double>(std::max(blocks_per_sm, 1)) * std::max(num_sms, 1);
  auto fullness = [&](std::int64_t c) {
    const double waves = static_cast<double>(batch * blocks_per_request * c) / slots;
    return waves / std::ceil(waves);
  };
  const std::int64_t most = std::min<std::int64_t>(std::max<std::int64_t>(longest / 256, 1), 1024);
  // A batch that leaves slots idle: the most chunks that still fit one wave, when that wave
  // is at least 90% full (every block then runs from start to end; batch 1 x 32768 on the
  // H100: 33 chunks, 264 blocks of 264 slots, 62.5-63.0 us against 64.2-66.8 in 30).
  const auto per_chunk = static_cast<double>(batch * blocks_per_request);
  if (batch > 0 && per_chunk < slots) {
    const auto one_wave = std::min(static_cast<std::int64_t>(slots / per_chunk), most);
    if (one_wave > 1 && fullness(one_wave) >= 0.9) return split_plan(kv_lengths, one_wave, num_qo_heads, head_dim);
  }
  // Otherwise the fewest chunks whose last wave is at least 90% full, else the fullest.
  std::int64_t best = 1;
  for (std::int64_t c = 2; batch > 0 && fullness(best) < 0.9 && c <= most; ++c)
    if (fullness(c) > fullness(best)) best = c;
  return split_plan(kv_lengths, best, num_qo_heads, head_dim);
}

BatchDecode::BatchDecode(Engine& engine, std::string_view spec_json) {
  decode_ = engine.get(spec_json);
  const KernelInfo& info = decode_.info();
  if (info.op != "batch_decode")
    throw SpecError(fmt::format("BatchDecode needs a batch_decode spec, got op \"{}\"", info.op));
  const auto spec = nlohmann::json::parse(info.spec);
  num_qo_heads_ = spec["num_qo_heads"];
  head_dim_ = spec["head_dim"];
  page_size_ = spec["page_size"];
  window_ = spec.value("sliding_window", std::int64_t{0});
  return_lse_ = spec["return_lse"];
  combined_ = spec["kv_storage"] == "combined";
  scaled_ = spec["kv_dtype"] == "float8_e4m3";
  blocks_per_request_ = families::plan_spec(spec::parse_spec(info.spec)).launch.grid[2].constant;
  merge_ = engine.get(nlohmann::json{{"op", "merge_states"},
                                     {"num_heads", num_qo_heads_},
                                     {"head_dim", head_dim_},
                                     {"dtype", "float32"},
                                     {"out_dtype", spec["dtype"]}}
                          .dump());
  num_sms_ = runtime::multiprocessor_count(runtime::current_device());
  // Blocks per SM the split aims to fill. 16-bit KV: two already keep HBM saturated, and
  // each extra chunk costs a partial state written and merged (H100, batch 1 x 32768: 33
  // chunks 61.5 us against 67.9 for 60 filling all four slots; batch 32 x 4096 unsplit
  // 193.0 against 202.3 in two chunks). fp8 KV is instruction-bound and wants every slot
  // (batch 1 x 32768: 45 chunks 50.6 us against 66.1 for 22).
  blocks_per_sm_ = scaled_ ? decode_.max_blocks_per_sm() : std::min(decode_.max_blocks_per_sm(), 2);
}

DecodePlan BatchDecode::plan(std::span<const std::int32_t> kv_indptr, std::span<const std::int32_t> kv_last_page_len,
                             std::int64_t num_chunks) const {
  if (num_chunks < 0 || num_chunks > 65535)
    throw ArgumentError(fmt::format("BatchDecode::plan: num_chunks = {} is outside 0..65535 (0: the planner chooses)", num_chunks));
  if (kv_indptr.size() != kv_last_page_len.size() + 1)
    throw ArgumentError(fmt::format("BatchDecode::plan: kv_indptr has {} entries, kv_last_page_len {}; expected batch_size + 1 "
                                    "and batch_size", kv_indptr.size(), kv_last_page_len.size()));
  std::vector<std::int64_t> lengths(kv_last_page_len.size());
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const std::int64_t pages = kv_indptr[b + 1] - kv_indptr[b];
    if (pages < 0) throw ArgumentError(fmt::format("BatchDecode::plan: kv_indptr decreases at request {}", b));
    const std::int64_t last = kv_last_page_len[b];
    if (pages > 0 && (last < 1 || last > page_size_))
      throw ArgumentError(fmt::format("BatchDecode::plan: kv_last_page_len[{}] = {} is outside 1..{}", b, last, page_size_));
    lengths[b] = pages > 0 ? (pages - 1) * page_size_ + last : 0;
    if (window_ > 0) lengths[b] = std::min(lengths[b], window_);
  }
  if (num_chunks > 0) return split_plan(lengths, num_chunks, num_qo_heads_, head_dim_);
  return plan_decode_split(lengths, blocks_per_request_, num_qo_heads_, head_dim_, num_sms_, blocks_per_sm_);
}

void BatchDecode::run(const DecodePlan& plan, const DecodeBuffers& b, double sm_scale, void* stream) const {
  const WorkspaceLayout w = workspace_layout(plan, num_qo_heads_, head_dim_);
  if (w.total > 0 && !b.workspace)
    throw ArgumentError(fmt::format("BatchDecode::run: the plan splits the KV into {} chunks and needs a workspace of {} bytes",
                                    plan.num_chunks, w.total));
  char* ws = static_cast<char*>(b.workspace);
  void* partial_output = w.total ? ws + w.partial_output : nullptr;
  void* partial_lse = w.total ? ws + w.partial_lse : nullptr;
  if (combined_ && b.v_cache)
    throw ArgumentError("BatchDecode::run: the spec stores K and V in one tensor (kv_storage combined): pass it as k_cache "
                        "and leave v_cache null");
  // The kernel's arguments in its signature's order (see plan_decode in families/attention.cpp).
  std::array<Arg, 18> args;
  std::size_t n = 0;
  for (Arg a : {Arg(b.q), Arg(b.k_cache)}) args[n++] = a;
  if (!combined_) args[n++] = b.v_cache;
  for (Arg a : {Arg(b.kv_indptr), Arg(b.kv_indices), Arg(b.kv_last_page_len), Arg(b.output)}) args[n++] = a;
  if (return_lse_) args[n++] = b.lse;
  for (Arg a : {Arg(static_cast<const void*>(partial_output)), Arg(static_cast<const void*>(partial_lse)),
                Arg(plan.batch_size), Arg(plan.num_chunks), Arg(plan.chunk_size), Arg(sm_scale)})
    args[n++] = a;
  if (scaled_)
    for (Arg a : {Arg(b.k_scale), Arg(b.v_scale)}) args[n++] = a;
  decode_.launch(std::span<const Arg>(args.data(), n), stream);
  if (plan.num_chunks > 1) {
    void* merged_lse = return_lse_ ? static_cast<void*>(b.lse) : ws + w.merged_lse;
    merge_.launch({partial_output, partial_lse, b.output, merged_lse, plan.batch_size, plan.num_chunks}, stream);
  }
}

PrefillWorkPlanner::PrefillWorkPlanner(const KernelInfo& prefill) {
  // The kernel's items as its family planned them (the template asserts the same numbers):
  // rows of (query, head) pairs when packed, K/V tiles, and the launch's grid of (head
  // block, request, row tile).
  const families::KernelPlan plan = families::plan_spec(spec::parse_spec(prefill.spec));
  const nlohmann::json& spec = plan.spec;
  if (plan.op != "batch_prefill" || !spec.value("work_list", false))
    throw ArgumentError(fmt::format("plan_prefill_work needs a batch_prefill spec with \"work_list\": true, got {}", prefill.spec));
  const std::int64_t qo_heads = spec["num_qo_heads"];
  kv_heads_ = spec["num_kv_heads"];
  head_dim_ = spec["head_dim"];
  causal_ = spec["causal"];
  paged_ = spec.value("paged", false);
  window_ = spec.value("sliding_window", std::int64_t{0});
  page_size_ = spec.value("page_size", std::int64_t{0});
  const nlohmann::json& form = plan.template_params["forms"].back();  // the launch's own (a short form comes first)
  rows_per_item_ = form["rows"];
  keys_per_tile_ = form["keys_per_tile"];
  rows_per_query_ = plan.template_params["pack_gqa"].get<bool>() ? qo_heads / kv_heads_ : 1;
  head_blocks_ = plan.launch.grid[0].constant;
  queries_per_tile_ = plan.launch.grid[2].divisor;
  l2_group_bytes_ = plan.template_params["l2_group_bytes"];
}

std::vector<std::int32_t> plan_prefill_work(const KernelInfo& prefill, std::span<const std::int32_t> qo_indptr,
                                            std::span<const std::int32_t> kv_indptr,
                                            std::span<const std::int32_t> kv_last_page_len) {
  return PrefillWorkPlanner(prefill).plan(qo_indptr, kv_indptr, kv_last_page_len);
}

namespace {
// The queue's header (the kernel's ItemQueue): [items, next, finished], then the items.
constexpr std::size_t kQueueHeader = 3;
}  // namespace

std::size_t PrefillWorkPlanner::list_size(std::span<const std::int32_t> qo_indptr) const {
  if (qo_indptr.empty()) throw ArgumentError("plan_prefill_work: qo_indptr is empty; expected batch_size + 1 entries");
  std::int64_t listed = 0;  // items with rows (the kernel skips the others)
  for (std::size_t i = 0; i + 1 < qo_indptr.size(); ++i) {
    const std::int64_t qo_len = qo_indptr[i + 1] - qo_indptr[i];
    if (qo_len < 0) throw ArgumentError(fmt::format("plan_prefill_work: an indptr decreases at request {}", i));
    listed += head_blocks_ * ((qo_len * rows_per_query_ + rows_per_item_ - 1) / rows_per_item_);
  }
  return kQueueHeader + static_cast<std::size_t>(listed);
}

std::vector<std::int32_t> PrefillWorkPlanner::plan(std::span<const std::int32_t> qo_indptr,
                                                   std::span<const std::int32_t> kv_indptr,
                                                   std::span<const std::int32_t> kv_last_page_len) const {
  if (qo_indptr.empty() || kv_indptr.size() != qo_indptr.size())
    throw ArgumentError(fmt::format("plan_prefill_work: qo_indptr has {} entries, kv_indptr {}; expected batch_size + 1 each",
                                    qo_indptr.size(), kv_indptr.size()));
  const auto batch = static_cast<std::int64_t>(qo_indptr.size()) - 1;
  if (paged_ && kv_last_page_len.size() != static_cast<std::size_t>(batch))
    throw ArgumentError(fmt::format("plan_prefill_work: kv_last_page_len has {} entries, expected {}", kv_last_page_len.size(), batch));
  std::vector<std::int64_t> qo_len(static_cast<std::size_t>(batch)), kv_len(static_cast<std::size_t>(batch));
  std::int64_t max_qo_len = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto i = static_cast<std::size_t>(b);
    qo_len[i] = qo_indptr[i + 1] - qo_indptr[i];
    const std::int64_t kv = kv_indptr[i + 1] - kv_indptr[i];
    if (qo_len[i] < 0 || kv < 0) throw ArgumentError(fmt::format("plan_prefill_work: an indptr decreases at request {}", b));
    if (paged_ && kv > 0 && (kv_last_page_len[i] < 1 || kv_last_page_len[i] > page_size_))
      throw ArgumentError(fmt::format("plan_prefill_work: kv_last_page_len[{}] = {} is outside 1..{}", b, kv_last_page_len[i], page_size_));
    kv_len[i] = paged_ ? (kv > 0 ? (kv - 1) * page_size_ + kv_last_page_len[i] : 0) : kv;
    max_qo_len = std::max(max_qo_len, qo_len[i]);
  }
  const std::int64_t row_tiles = (max_qo_len + queries_per_tile_ - 1) / queries_per_tile_;

  // The kernel's groups of requests whose K/V fit l2_group_bytes of L2 at the batch's mean length.
  const std::int64_t keys = static_cast<std::int64_t>(kv_indptr.back()) * (paged_ ? page_size_ : 1);
  const std::int64_t request_bytes = std::max<std::int64_t>(1, keys / std::max<std::int64_t>(batch, 1) * kv_heads_ * head_dim_ * 2 * 2);
  const std::int64_t per_group = batch <= 1 ? 1 : std::min(batch, std::max<std::int64_t>(1, l2_group_bytes_ / request_bytes));

  // Blocks take the items in list order, so the longest go first within each group: by K/V
  // tiles, and of equal tiles those whose last tile is full before those where no row sees
  // past its first half (the kernel's half-width S and P V there).
  // A row tile of one request: its head blocks' items, which cost the same.
  struct RowTile {
    std::int64_t half_tiles;  // its K/V tiles in halves, one less for a half-width last tile
    std::int32_t first_id;
  };
  std::vector<RowTile> group_tiles;
  std::vector<std::int32_t> list(kQueueHeader, 0);
  list.reserve(kQueueHeader + static_cast<std::size_t>(head_blocks_ * batch * row_tiles));
  for (std::int64_t first = 0; first < batch; first += per_group) {
    group_tiles.clear();
    for (std::int64_t tile = row_tiles - 1; tile >= 0; --tile)
      for (std::int64_t b = first; b < std::min(batch, first + per_group); ++b) {
        const auto i = static_cast<std::size_t>(b);
        const std::int64_t rows = qo_len[i] * rows_per_query_, row0 = tile * rows_per_item_;
        if (row0 >= rows) continue;  // the kernel skips it
        const std::int64_t shift = kv_len[i] - qo_len[i];
        const std::int64_t first_query = row0 / rows_per_query_, last_query = (std::min(row0 + rows_per_item_, rows) - 1) / rows_per_query_;
        const std::int64_t key_end = causal_ ? std::max<std::int64_t>(0, std::min(kv_len[i], last_query + shift + 1)) : kv_len[i];
        const std::int64_t key_begin = window_ > 0 ? std::max<std::int64_t>(0, first_query + shift - window_ + 1) : 0;
        const std::int64_t end_tile = (key_end + keys_per_tile_ - 1) / keys_per_tile_;
        const std::int64_t tiles = std::max<std::int64_t>(0, end_tile - key_begin / keys_per_tile_);
        const bool short_last = tiles > 0 && key_end - (end_tile - 1) * keys_per_tile_ <= keys_per_tile_ / 2;
        group_tiles.push_back({2 * tiles - (short_last ? 1 : 0), static_cast<std::int32_t>((tile * batch + b) * head_blocks_)});
      }
    std::stable_sort(group_tiles.begin(), group_tiles.end(),
                     [](const RowTile& x, const RowTile& y) { return x.half_tiles > y.half_tiles; });
    for (const RowTile& row_tile : group_tiles)
      for (std::int64_t head_block = 0; head_block < head_blocks_; ++head_block)
        list.push_back(row_tile.first_id + static_cast<std::int32_t>(head_block));
  }
  list[0] = static_cast<std::int32_t>(list.size() - kQueueHeader);
  return list;
}

}  // namespace kjit
