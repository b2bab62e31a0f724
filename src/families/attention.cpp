// Attention over a paged KV cache (templates/kjit/decode.cuh, decode_tensor_cores.cuh, merge.cuh, paged_kv.cuh).
//
//   {"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128,
//    "page_size": 16, "dtype": "bfloat16"}
//     fields: num_qo_heads (1..256), num_kv_heads (divides num_qo_heads), head_dim (64 |
//     128 | 256), page_size (1..1024), dtype (float16 | bfloat16, q, KV and output),
//     kv_layout (NHD | HND, default NHD), kv_storage (separate: k_cache and v_cache
//     tensors, default; combined: one kv_cache [pages, 2, ...] with K then V in each
//     page), kv_dtype (default dtype, or float8_e4m3: then the kernel takes k_scale and
//     v_scale, the dequantization factors), return_lse (default true), logits_soft_cap
//     (>= 0, 0: none), sliding_window (tokens attended from the end, 0: all);
//     tensor_cores (the dot products on mma.sync, decode_tensor_cores.cuh; default true
//     where it applies: 16-bit KV at head_dim 64 or 128, no pipeline_stages); tuning of
//     the other form: pipeline_stages (2..4, steps of K/V in flight per thread)
//   {"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128,
//    "dtype": "bfloat16"}    ragged queries and contiguous K/V by qo_indptr / kv_indptr (a
//     single request is a batch of 1); causal (default true, aligned to the last key),
//     return_lse, logits_soft_cap, sliding_window as for decode; "paged": true reads K/V
//     from a paged cache (page_size, kv_layout, kv_storage; kv_indptr then indexes pages, and
//     kv_indices, kv_last_page_len follow it): append attention, after append_paged_kv_cache;
//     tuning: keys_per_tile (32 | 64), pack_gqa (default true where the group is <= 64:
//     a block's rows are (query, head) pairs of one KV head's group), warpgroup_mma
//     (default true: sm_90a's wgmma where head_dim <= 128, else mma.sync), warpgroups
//     (1 | 2: blocks of 64 or 128 query rows sharing each K/V tile), warp_specialized
//     (a persistent kernel, one block per SM, in which a warpgroup copies K/V tiles of 128
//     keys for two wgmma warpgroups of 64 rows; default true at head_dim 128 unless
//     keys_per_tile or warpgroups is given; needs warpgroup_mma and head_dim <= 128; without
//     sm_90a the block runs the mma.sync form on two of its warpgroups), short_form_max_qo_len
//     (warp-specialized: launches with max_qo_len up to it run the other form, default 16,
//     0: never), work_list (warp-specialized, default false: the kernel takes a work_list
//     argument, kjit::plan_prefill_work's queue of work items, which blocks take from as
//     they finish their last),
//     staged_output (warp-specialized, default false: the output is written through shared
//     memory by the bulk copy engine, in the room of one V stage; measured 2-3% slower on
//     causal batches, a knob for sweeps)
//   {"op": "append_paged_kv_cache", "num_kv_heads": 8, "head_dim": 128, "page_size": 16,
//    "dtype": "bfloat16"}    (kv_layout, kv_storage as above; dtype may be float8_e4m3)
//   {"op": "merge_states" | "merge_state", "num_heads": 32, "head_dim": 128,
//    "dtype": "float32"}     (out_dtype: default dtype)
//
// batch_decode's split of long KV over several blocks is chosen at run time
// (num_chunks, chunk_size; see kjit/attention.hpp for the planner): with more than one
// chunk it writes float partial states that merge_states combines. FlashInfer-Bench
// definitions of op type "gqa" at the decode stage build batch_decode.
#include <fmt/format.h>

#include "families/family.hpp"

namespace kjit::families {
namespace {

constexpr DType kAttentionDTypes[] = {DType::float16, DType::bfloat16};
constexpr DType kStateDTypes[] = {DType::float32, DType::float16, DType::bfloat16};
constexpr std::int64_t kHeadDims[] = {64, 128, 256};
constexpr std::int64_t kKeysPerTile[] = {32, 64};
constexpr std::string_view kLayouts[] = {"NHD", "HND"};
constexpr std::string_view kStorages[] = {"separate", "combined"};
// What a paged cache may hold (decode reads fp8 with scales; append writes it).
constexpr DType kCacheDTypes[] = {DType::float16, DType::bfloat16, DType::float8_e4m3};
// Query heads whose q and accumulators a thread holds (2 * 8 floats each). At
// head_dim 256, 4 heads per block (two blocks per KV head) measured slower than 8
// (49.8% vs 55.7% of copy bandwidth): the second read of the KV missed L2.
constexpr int kMaxHeadsPerBlock = 8;

std::vector<std::string> page_shape(const std::string& layout, std::int64_t page_size, std::int64_t kv_heads,
                                    std::int64_t head_dim, bool combined = false) {
  const std::string ps = std::to_string(page_size), h = std::to_string(kv_heads), d = std::to_string(head_dim);
  std::vector<std::string> shape = layout == "NHD" ? std::vector<std::string>{"num_pages", ps, h, d}
                                                   : std::vector<std::string>{"num_pages", h, ps, d};
  if (combined) shape.insert(shape.begin() + 1, "2");
  return shape;
}

// merge_states' vector: a row's lane group is a power of two <= 32 threads, each moving
// this many elements (at most 16 bytes of the wider dtype, more for rows over 512 elements).
std::int64_t merge_vector(DType dtype, DType out_dtype, std::int64_t head_dim) {
  const std::int64_t widest = std::max(dtype_size(dtype), dtype_size(out_dtype));
  return std::max<std::int64_t>(16 / widest, (head_dim + 31) / 32);
}

// The paged cache's tensors: k_cache and v_cache, or one combined kv_cache, which the
// kernel moves in pieces of `piece` bytes.
void push_cache_params(std::vector<Param>& p, DType dtype, const std::string& layout, std::int64_t page_size,
                       std::int64_t kv_heads, std::int64_t head_dim, bool combined, Param::Access access, int piece) {
  if (combined) {
    p.push_back(vector_param("kv_cache", dtype, page_shape(layout, page_size, kv_heads, head_dim, true), piece, access));
  } else {
    p.push_back(vector_param("k_cache", dtype, page_shape(layout, page_size, kv_heads, head_dim), piece, access));
    p.push_back(vector_param("v_cache", dtype, page_shape(layout, page_size, kv_heads, head_dim), piece, access));
  }
}

// The fields decode and prefill share: heads, head_dim, dtype and the score options.
struct AttentionFields {
  std::int64_t qo_heads, kv_heads, head_dim;
  DType dtype;
  bool return_lse;
  double soft_cap;
  std::int64_t window;

  static AttentionFields read(spec::FieldReader& fields) {
    AttentionFields a;
    a.qo_heads = fields.integer("num_qo_heads", 1, 256);
    a.kv_heads = fields.integer("num_kv_heads", 1, a.qo_heads);
    if (a.qo_heads % a.kv_heads != 0)
      fields.fail("num_kv_heads", fmt::format("= {} does not divide num_qo_heads = {}", a.kv_heads, a.qo_heads));
    a.head_dim = fields.integer_of("head_dim", kHeadDims);
    a.dtype = fields.dtype("dtype", kAttentionDTypes);
    a.return_lse = fields.boolean("return_lse", true);
    a.soft_cap = fields.number("logits_soft_cap", 0, 1e6, 0.0);
    a.window = fields.integer("sliding_window", 0, std::numeric_limits<std::int32_t>::max(), 0);
    return a;
  }
  // Into the canonical spec (options only when set) and the template context.
  void describe(nlohmann::json& spec, nlohmann::json& context) const {
    spec.update({{"num_qo_heads", qo_heads}, {"num_kv_heads", kv_heads}, {"head_dim", head_dim},
                 {"dtype", dtype_name(dtype)}, {"return_lse", return_lse}});
    if (soft_cap > 0) spec["logits_soft_cap"] = soft_cap;
    if (window > 0) spec["sliding_window"] = window;
    context.update({{"num_qo_heads", qo_heads}, {"num_kv_heads", kv_heads}, {"head_dim", head_dim},
                    {"dtype", dtype_name(dtype)}, {"ctype", cuda_type(dtype)}, {"return_lse", return_lse},
                    {"soft_cap", soft_cap}, {"soft_cap_literal", fmt::format("{:.9e}f", soft_cap)}, {"window", window}});
  }
};

class AttentionFamily final : public Family {
 public:
  std::string_view name() const override { return "attention"; }
  std::vector<std::string_view> ops() const override {
    return {"batch_decode", "batch_prefill", "append_paged_kv_cache", "merge_state", "merge_states"};
  }
  std::vector<std::string_view> definition_op_types() const override { return {"gqa"}; }

  // gqa definitions: paged decode (q [batch, heads, dim], k_cache/v_cache [pages,
  // page_size, kv_heads, dim] in NHD) builds batch_decode; ragged or paged prefill
  // (qo_indptr) builds batch_prefill, causal when the name says so (their references
  // align the mask to the last key, as kjit does). Outputs: output and a base-2 lse.
  nlohmann::json spec_from_definition(const spec::Definition& d) const override {
    if (d.input("qo_indptr")) {
      const bool paged = d.input("k_cache") != nullptr;
      if (!paged && !d.input("k"))
        throw SpecError(fmt::format("definition \"{}\": a gqa prefill definition needs inputs k/v or k_cache/v_cache", d.name));
      nlohmann::json spec = {{"op", "batch_prefill"},
                             {"num_qo_heads", d.const_axis("num_qo_heads")},
                             {"num_kv_heads", d.const_axis("num_kv_heads")},
                             {"head_dim", d.const_axis("head_dim")},
                             {"dtype", dtype_name(d.tensor_dtype("q"))},
                             {"causal", d.name.find("causal") != std::string::npos},
                             {"return_lse", d.output("lse") != nullptr}};
      if (paged) spec.update({{"paged", true}, {"page_size", d.const_axis("page_size")}, {"kv_layout", "NHD"}});
      return spec;
    }
    if (!d.input("kv_indices"))
      throw SpecError(fmt::format("definition \"{}\": a gqa decode definition needs a paged KV cache (kv_indices)", d.name));
    return {{"op", "batch_decode"},
            {"num_qo_heads", d.const_axis("num_qo_heads")},
            {"num_kv_heads", d.const_axis("num_kv_heads")},
            {"head_dim", d.const_axis("head_dim")},
            {"page_size", d.const_axis("page_size")},
            {"dtype", dtype_name(d.tensor_dtype("q"))},
            {"return_lse", d.output("lse") != nullptr}};
  }

  KernelPlan plan(const spec::Spec& s) const override {
    if (s.op == "batch_decode") return plan_decode(s);
    if (s.op == "batch_prefill") return plan_prefill(s);
    if (s.op == "append_paged_kv_cache") return plan_append(s);
    return plan_merge(s);
  }

 private:
  KernelPlan plan_prefill(const spec::Spec& s) const {
    spec::FieldReader fields(s);
    const AttentionFields a = AttentionFields::read(fields);
    const bool causal = fields.boolean("causal", true);
    // Paged K/V (append attention: the new tokens appended to the cache first).
    const bool paged = fields.boolean("paged", false);
    const std::int64_t page_size = paged ? fields.integer("page_size", 1, 1024) : 0;
    const std::string layout = paged ? fields.choice("kv_layout", kLayouts, "NHD") : "";
    const bool combined = paged && fields.choice("kv_storage", kStorages, "separate") == "combined";
    // Tuning: keys per K/V tile. At head_dim 128, 32 keys (48 KB of shared memory, three
    // blocks per SM) measured 269 TFLOP/s against 249 for 64 keys with mma.sync, and 464
    // against 413 with wgmma (causal 8192, H100).
    // (Paged tiles at head_dim 64 spill with 64 keys: the page lookups need registers too.)
    const std::int64_t default_keys = a.head_dim <= 64 && !paged ? 64 : 32;
    const std::int64_t keys = fields.integer_of("keys_per_tile", kKeysPerTile, default_keys);
    // A block's 64 rows: (query, head) pairs of one KV head's group, so the group shares
    // every K/V tile (needs group <= 64), or 64 queries of one head.
    const bool can_pack = a.qo_heads / a.kv_heads <= 64;
    const bool pack_gqa = fields.boolean("pack_gqa", can_pack);
    if (pack_gqa && !can_pack)
      fields.fail("pack_gqa", fmt::format("needs a GQA group of at most 64 query heads, got {}", a.qo_heads / a.kv_heads));
    // Warpgroup MMA (wgmma from shared memory) where the target has it (sm_90a) and the
    // output accumulators fit the registers (head_dim <= 128); mma.sync otherwise.
    const bool warpgroup_mma = fields.boolean("warpgroup_mma", true);
    // Warpgroups (64 query rows each) per block, sharing every K/V tile.
    const std::int64_t default_warpgroups = 1;
    const std::int64_t warpgroups = fields.integer("warpgroups", 1, 2, default_warpgroups);
    // The warp-specialized form (a copying warpgroup feeding two wgmma warpgroups, 128-key
    // tiles; prefill_warp_specialized.cuh), the default at head_dim 128: causal 8192 562
    // against 457 TFLOP/s, paged 535 against 411, non-causal 599 against 454, ragged 8 x 1024
    // equal, append attention 385 against 375 us (H100; such short batches now run the other
    // form, short_form_max_qo_len). At head_dim 64 it is slower (366 against 411), so there it
    // is on request. keys_per_tile and warpgroups tune the other form.
    const bool can_specialize = warpgroup_mma && a.head_dim <= 128;
    const bool specialized_by_default = can_specialize && a.head_dim == 128;
    const bool tunes_other_form = fields.has("keys_per_tile") || fields.has("warpgroups");
    const bool warp_specialized = fields.boolean("warp_specialized", specialized_by_default && !tunes_other_form);
    if (warp_specialized && !can_specialize)
      fields.fail("warp_specialized", warpgroup_mma ? fmt::format("needs head_dim <= 128, got {}", a.head_dim)
                                                    : std::string("needs warpgroup_mma"));
    if (warp_specialized && tunes_other_form)
      fields.fail(fields.has("keys_per_tile") ? "keys_per_tile" : "warpgroups",
                  "tunes the form without warp specialization (\"warp_specialized\": false)");
    // Warp-specialized: launches with max_qo_len up to this run the other form (0: never).
    const std::int64_t default_short_form = 16;
    const std::int64_t short_form_max_qo_len =
        fields.integer("short_form_max_qo_len", 0, std::numeric_limits<std::int32_t>::max(), default_short_form);
    if (fields.has("short_form_max_qo_len") && !warp_specialized)
      fields.fail("short_form_max_qo_len", "chooses between forms of the warp-specialized kernel (\"warp_specialized\": true)");
    // Warp-specialized: blocks take their items from a host plan's queue (plan_prefill_work),
    // longest first, instead of walking the kernel's static order.
    const bool work_list = fields.boolean("work_list", false);
    if (work_list && !warp_specialized) fields.fail("work_list", "needs the warp-specialized form (\"warp_specialized\": true)");
    // Warp-specialized: the output staged in shared memory and written by the bulk copy engine
    // (WarpSpecializedPrefill::store_output) instead of stored from registers. Off by default:
    // 2-3% slower on causal batches on the H100 (docs/benchmarks.md, prefill).
    const bool staged_output = fields.boolean("staged_output", false);
    if (staged_output && !warp_specialized)
      fields.fail("staged_output", "needs the warp-specialized form (\"warp_specialized\": true)");
    fields.finish();
    const auto [qo_heads, kv_heads, head_dim, dtype, return_lse, soft_cap, window] = a;

    KernelPlan plan;
    plan.op = s.op;
    plan.spec = {{"op", plan.op}, {"causal", causal}};
    if (keys != default_keys) plan.spec["keys_per_tile"] = keys;
    if (pack_gqa != can_pack) plan.spec["pack_gqa"] = pack_gqa;
    if (!warpgroup_mma) plan.spec["warpgroup_mma"] = false;
    if (warpgroups != default_warpgroups) plan.spec["warpgroups"] = warpgroups;
    if (warp_specialized != specialized_by_default) plan.spec["warp_specialized"] = warp_specialized;
    if (warp_specialized && short_form_max_qo_len != default_short_form) plan.spec["short_form_max_qo_len"] = short_form_max_qo_len;
    if (work_list) plan.spec["work_list"] = true;
    if (staged_output) plan.spec["staged_output"] = true;
    if (paged)
      plan.spec.update({{"paged", true}, {"page_size", page_size}, {"kv_layout", layout},
                        {"kv_storage", combined ? "combined" : "separate"}});
    a.describe(plan.spec, plan.template_params);
    plan.template_name = "batch_prefill.cu.j2";
    plan.entry = "kjit_batch_prefill";
    const std::string hq = std::to_string(qo_heads), hk = std::to_string(kv_heads), d = std::to_string(head_dim);
    auto& p = plan.params;
    p.push_back(vector_param("q", dtype, {"total_q", hq, d}, 16));
    if (paged) {
      push_cache_params(p, dtype, layout, page_size, kv_heads, head_dim, combined, Param::Access::read, 16);
    } else {
      p.push_back(vector_param("k", dtype, {"total_kv", hk, d}, 16));
      p.push_back(vector_param("v", dtype, {"total_kv", hk, d}, 16));
    }
    p.push_back(tensor_param("qo_indptr", DType::int32, {"batch_size_plus_one"}));
    p.push_back(tensor_param("kv_indptr", DType::int32, {"batch_size_plus_one"}));
    if (paged) {
      p.push_back(tensor_param("kv_indices", DType::int32, {"num_kv_indices"}));
      p.push_back(tensor_param("kv_last_page_len", DType::int32, {"batch_size"}));
    }
    p.push_back(vector_param("output", dtype, {"total_q", hq, d}, 16, Param::Access::write));  // 8-column chunks
    if (return_lse) p.push_back(tensor_param("lse", DType::float32, {"total_q", hq}, Param::Access::write));
    // (the kernel takes its items from the list as a queue, and leaves the queue reset)
    if (work_list) p.push_back(tensor_param("work_list", DType::int32, {"work_list_size"}, Param::Access::read_write));
    p.push_back(integer_param("batch_size", 0, 65535));
    p.push_back(integer_param("max_qo_len", 0, std::numeric_limits<std::int32_t>::max()));  // the longest request's queries
    p.push_back(real_param("sm_scale"));

    plan.template_params.update({{"causal", causal}, {"paged", paged}, {"page_size", page_size}, {"kv_layout", layout},
                                 {"combined", combined}, {"pack_gqa", pack_gqa}, {"warpgroup_mma", warpgroup_mma},
                                 {"warp_specialized", warp_specialized}, {"work_list", work_list},
                                 {"staged_output", staged_output}});
    // Warp-specialized: requests are taken in groups whose K/V fit this much L2 (the kernel's
    // ItemOrder, where the choice is measured; plan_prefill_work reads it from here too).
    plan.template_params["l2_group_bytes"] = std::int64_t{16} << 20;
    // One entry point per form: its template parameters and its launch. 64 query rows per MMA
    // warpgroup; K/V tiles double-buffered (Q, 2 K and 2 V tiles, 1 KB to align them);
    // warp-specialized: two MMA warpgroups, a copying one, 128-key tiles and 256 bytes of
    // mbarriers, as many K/V stages (a K and a V tile each) as the 227 KB an SM gives a block
    // holds, at most 4 (3 at head_dim 128); with staged_output the last V tile's room stages
    // the output instead (its 128 rows are a tile's size: the same bytes).
    const std::int64_t group = qo_heads / kv_heads;
    nlohmann::json forms = nlohmann::json::array();
    auto add_form = [&](LaunchRule& launch, const std::string& entry, bool specialized, std::int64_t form_keys,
                        std::int64_t form_warpgroups) {
      const std::int64_t rows = specialized ? 128 : 64 * form_warpgroups;
      const std::int64_t tile_keys = specialized ? 128 : form_keys;
      const std::int64_t threads = specialized ? 384 : 128 * form_warpgroups;
      const std::int64_t stages =
          specialized ? std::min<std::int64_t>(4, (227 * 1024 - rows * head_dim * 2 - 1024 - 256) / (2 * tile_keys * head_dim * 2)) : 2;
      const std::int64_t shared_bytes = (rows + 2 * stages * tile_keys) * head_dim * 2 + 1024 + (specialized ? 256 : 0);
      // Warp-specialized: whole tiles are TMA copies (one thread's, leaving the load/store
      // unit to the consumers), so the launch passes tensor maps of q, k and v: ragged K/V,
      // or pages of at least 64 keys that hold whole tiles or whole numbers of them. H200,
      // paged causal 1 x 8192, TFLOP/s, cp.async against TMA: page 16 587 / 546 (16 copies of
      // 2 KB a tile), page 64 597 / 632, page 256 417 / 633.
      const bool paged_boxes = page_size >= 64 && (tile_keys % page_size == 0 || page_size % tile_keys == 0);
      const bool tensor_maps = specialized && (!paged || paged_boxes);
      forms.push_back({{"entry", entry}, {"warp_specialized", specialized}, {"rows", rows}, {"keys_per_tile", tile_keys},
                       {"warpgroups", form_warpgroups}, {"threads", threads}, {"stages", stages}, {"shared_bytes", shared_bytes},
                       {"tensor_maps", tensor_maps}});
      if (tensor_maps) {
        // Q [tokens, heads, d] in boxes of whole queries' rows where they fill a tile (the
        // kernel's kTensorMapQ), else of one head's.
        const std::int64_t rows_per_query = pack_gqa ? group : 1;
        const std::uint32_t q_heads = rows % rows_per_query == 0 ? static_cast<std::uint32_t>(rows_per_query) : 1u;
        launch.tensor_maps.push_back(
            {param_index(p, "q"), {head_dim, qo_heads, 0}, {64, q_heads, static_cast<std::uint32_t>(rows) / q_heads}});
        // K and V as rows of head_dim: ragged [tokens, heads, d] and NHD pages [pages, (2,)
        // slots, heads, d] by (dim, head, row); HND pages [pages, (2,) heads, slots, d] by
        // (dim, 1, row). A box is a tile or, paged, one page's part of it.
        const std::uint32_t box_rows = static_cast<std::uint32_t>(paged ? std::min(page_size, tile_keys) : tile_keys);
        const std::int64_t heads_axis = paged && layout == "HND" ? 1 : kv_heads;
        const char* k_name = !paged ? "k" : combined ? "kv_cache" : "k_cache";
        const char* v_name = !paged ? "v" : combined ? "kv_cache" : "v_cache";
        for (const char* name : {k_name, v_name})
          launch.tensor_maps.push_back({param_index(p, name), {head_dim, heads_axis, 0}, {64, 1, box_rows}});
      }
      launch.entry = entry;
      launch.block[0] = static_cast<std::uint32_t>(threads);
      launch.dynamic_shared_bytes = static_cast<std::uint32_t>(shared_bytes);
      // (heads, requests, row tiles): tiles slowest, so the longest causal tiles of every
      // request start first (8 x 1024 causal: 322.8 -> 330.8-339.5 TFLOP/s with wgmma, H100).
      // Packed: ceil(max_qo_len * group / 64) tiles, as ceil(max_qo_len / (64 / group)) (a few
      // idle blocks when group does not divide 64); one block row per KV head.
      launch.grid[0] = GridDim{-1, 1, static_cast<std::uint32_t>(pack_gqa ? kv_heads : qo_heads)};
      launch.grid[1] = GridDim{param_index(p, "batch_size"), 1};
      launch.grid[2] = GridDim{param_index(p, "max_qo_len"), pack_gqa ? rows / group : rows};
      // Warp-specialized: persistent, one block per SM walking the grid above, so a block's
      // copies of its next item overlap the end of its current one.
      if (specialized) launch.persistent_blocks_per_sm = 1;
    };
    // Warp-specialized: launches whose requests have at most short_form_max_qo_len queries
    // (speculative decoding, append attention) run the other form, whose blocks of 64 rows
    // (16 queries of a group of 4) are full there. H100, 64 requests of 16 queries over 4096
    // keys: 372.4 against 385.2 us. Not further: its blocks are slower per key, and with 64
    // queries over 4096 keys it took 1449 against 766 us (with 32 over 32 keys, 85.8 against
    // 110.2; the rule sees max_qo_len, not the keys).
    if (warp_specialized && short_form_max_qo_len > 0) {
      LaunchRule short_form;
      short_form.when_param = param_index(p, "max_qo_len");
      short_form.at_most = short_form_max_qo_len;
      add_form(short_form, plan.entry + "_short", false, default_keys, default_warpgroups);
      plan.conditional_launches.push_back(short_form);
    }
    add_form(plan.launch, plan.entry, warp_specialized, keys, warpgroups);
    plan.template_params["forms"] = forms;
    return plan;
  }

  KernelPlan plan_decode(const spec::Spec& s) const {
    spec::FieldReader fields(s);
    const AttentionFields a = AttentionFields::read(fields);
    const std::int64_t page_size = fields.integer("page_size", 1, 1024);
    const std::string layout = fields.choice("kv_layout", kLayouts, "NHD");
    const bool combined = fields.choice("kv_storage", kStorages, "separate") == "combined";
    const DType kv_dtype = fields.dtype("kv_dtype", kCacheDTypes, a.dtype);
    if (kv_dtype != a.dtype && kv_dtype != DType::float8_e4m3)
      fields.fail("kv_dtype", fmt::format("= {} must be dtype ({}) or float8_e4m3", dtype_name(kv_dtype), dtype_name(a.dtype)));
    const bool scaled = kv_dtype == DType::float8_e4m3;
    // Two stages (one step in flight while one is used) keep 32 KB of shared memory, so four
    // blocks fit an SM: batch 64 x 4096 needs no KV split (378.8 us against 392.3 with four
    // stages and three blocks per SM, which split in 3 chunks and merge; H100).
    const std::int64_t default_stages = 2;
    const std::int64_t stages = fields.integer("pipeline_stages", 2, 4, default_stages);
    // Tensor cores by default where they apply (H100, back to back): batch 64 x 4096 (32/8
    // heads, d128, page 16) 346.6-347.1 us against 350.1-350.3, 64/4 heads 180.9 against
    // 369.5 (one block reads a group of 16 once), level where the KV is split (16 x 8192).
    const bool tensor_cores_apply = !scaled && a.head_dim <= 128 && stages == default_stages;
    const bool tensor_cores = fields.boolean("tensor_cores", tensor_cores_apply);
    if (tensor_cores) {
      if (scaled) fields.fail("tensor_cores", "needs 16-bit KV (kv_dtype float8_e4m3 takes the default form)");
      if (a.head_dim > 128) fields.fail("tensor_cores", fmt::format("needs head_dim 64 or 128, got {}", a.head_dim));
      if (stages != default_stages) fields.fail("tensor_cores", "has its own copy ring; leave pipeline_stages out");
    }
    fields.finish();
    const auto [qo_heads, kv_heads, head_dim, dtype, return_lse, soft_cap, window] = a;

    const std::int64_t group = qo_heads / kv_heads;
    std::int64_t heads_per_block = 1;
    // (tensor cores: up to 16, the rows of an mma)
    for (std::int64_t h = 1; h <= std::min<std::int64_t>(group, tensor_cores ? 16 : kMaxHeadsPerBlock); ++h)
      if (group % h == 0) heads_per_block = h;

    KernelPlan plan;
    plan.op = s.op;
    plan.spec = {{"op", plan.op}, {"page_size", page_size}, {"kv_layout", layout},
                 {"kv_storage", combined ? "combined" : "separate"}, {"kv_dtype", dtype_name(kv_dtype)}};
    if (stages != default_stages) plan.spec["pipeline_stages"] = stages;
    plan.spec["tensor_cores"] = tensor_cores;
    a.describe(plan.spec, plan.template_params);
    plan.template_name = "batch_decode.cu.j2";
    plan.entry = "kjit_batch_decode";

    const std::string hq = std::to_string(qo_heads), d = std::to_string(head_dim);
    auto& p = plan.params;
    p.push_back(vector_param("q", dtype, {"batch_size", hq, d}, 16));
    // 8 elements per thread per token: 16 bytes, 8 of fp8.
    push_cache_params(p, kv_dtype, layout, page_size, kv_heads, head_dim, combined, Param::Access::read,
                      8 * static_cast<int>(dtype_size(kv_dtype)));
    p.push_back(tensor_param("kv_indptr", DType::int32, {"batch_size_plus_one"}));
    p.push_back(tensor_param("kv_indices", DType::int32, {"num_kv_indices"}));
    p.push_back(tensor_param("kv_last_page_len", DType::int32, {"batch_size"}));
    // A split's merge_states (float states -> dtype) writes the output in its vectors.
    const int merge_vector_bytes = static_cast<int>(merge_vector(DType::float32, dtype, head_dim) * dtype_size(dtype));
    p.push_back(vector_param("output", dtype, {"batch_size", hq, d}, merge_vector_bytes, Param::Access::write));
    if (return_lse) p.push_back(tensor_param("lse", DType::float32, {"batch_size", hq}, Param::Access::write));
    // Workspace for split KV, [batch, chunk, head(, dim)]; unused (may be null) with one chunk.
    p.push_back(vector_param("partial_output", DType::float32, {"batch_size", "num_chunks", hq, d}, 16, Param::Access::write));
    p.push_back(tensor_param("partial_lse", DType::float32, {"batch_size", "num_chunks", hq}, Param::Access::write));
    p.push_back(integer_param("batch_size", 0, 65535));
    p.push_back(integer_param("num_chunks", 1, 65535));
    p.push_back(integer_param("chunk_size", 1, std::numeric_limits<std::int32_t>::max()));
    p.push_back(real_param("sm_scale"));
    if (scaled) {
      p.push_back(real_param("k_scale"));
      p.push_back(real_param("v_scale"));
    }

    plan.template_params.update({{"page_size", page_size}, {"kv_layout", layout}, {"heads_per_block", heads_per_block},
                                 {"combined", combined}, {"kv_dtype", dtype_name(kv_dtype)},
                                 {"kv_ctype", cuda_type(kv_dtype)}, {"scaled", scaled}, {"stages", stages},
                                 {"tensor_cores", tensor_cores}});
    // The tensor-core form: three warps a block, registers fitted to four blocks an SM (168
    // a thread, no spills; batch 64 x 4096 on an H100 346 us back to back, against 348 for
    // four warps that spilled at 128 registers).
    constexpr int kTensorCoreWarps = 3, kTensorCoreBlocksPerSm = 4;
    plan.template_params["warps"] = kTensorCoreWarps;
    plan.template_params["min_blocks_per_sm"] = kTensorCoreBlocksPerSm;
    plan.launch.block[0] = tensor_cores ? 32 * kTensorCoreWarps : 128;
    // Decode::kSharedBytes (asserted in the template): the cp.async stages (stages x 4
    // tokens x K and V x 128 threads x 8 elements; tensor cores: 3 warps x a ring of 3
    // tiles of 16 token rows, and 8 or 16 rows of Q), reused to merge the token slots (tensor
    // cores: one a warp).
    constexpr int kTensorCoreRing = 3, kStepTokens = 16;  // BatchDecodeTensorCores::kRing, kStepTokens
    const std::int64_t q_rows = heads_per_block > 8 ? 16 : 8;
    const std::int64_t stage_bytes = tensor_cores ? (kTensorCoreWarps * kTensorCoreRing * kStepTokens + q_rows) * head_dim * 2
                                                  : stages * 4 * 2 * 128 * 8 * static_cast<std::int64_t>(dtype_size(kv_dtype));
    const std::int64_t slots = tensor_cores ? kTensorCoreWarps : 128 / (head_dim / 8);
    const std::int64_t merge_bytes = slots * heads_per_block * (2 + head_dim) * 4;
    plan.launch.dynamic_shared_bytes = static_cast<std::uint32_t>(std::max(stage_bytes, merge_bytes));
    plan.template_params["shared_bytes"] = plan.launch.dynamic_shared_bytes;
    plan.launch.grid[0] = GridDim{param_index(p, "num_chunks"), 1};
    plan.launch.grid[1] = GridDim{param_index(p, "batch_size"), 1};
    plan.launch.grid[2] = GridDim{-1, 1, static_cast<std::uint32_t>(kv_heads * (group / heads_per_block))};
    return plan;
  }

  KernelPlan plan_append(const spec::Spec& s) const {
    spec::FieldReader fields(s);
    const std::int64_t kv_heads = fields.integer("num_kv_heads", 1, 256);
    const std::int64_t head_dim = fields.integer_of("head_dim", kHeadDims);
    const std::int64_t page_size = fields.integer("page_size", 1, 1024);
    const DType dtype = fields.dtype("dtype", kCacheDTypes);
    const std::string layout = fields.choice("kv_layout", kLayouts, "NHD");
    const bool combined = fields.choice("kv_storage", kStorages, "separate") == "combined";
    fields.finish();

    KernelPlan plan;
    plan.op = s.op;
    plan.spec = {{"op", plan.op},          {"num_kv_heads", kv_heads},   {"head_dim", head_dim},
                 {"page_size", page_size}, {"dtype", dtype_name(dtype)}, {"kv_layout", layout},
                 {"kv_storage", combined ? "combined" : "separate"}};
    plan.template_name = "append_paged_kv_cache.cu.j2";
    plan.entry = "kjit_append_paged_kv_cache";
    const std::string hk = std::to_string(kv_heads), d = std::to_string(head_dim);
    auto& p = plan.params;
    p.push_back(vector_param("append_key", dtype, {"nnz", hk, d}, 16));
    p.push_back(vector_param("append_value", dtype, {"nnz", hk, d}, 16));
    p.push_back(tensor_param("batch_indices", DType::int32, {"nnz"}));
    p.push_back(tensor_param("positions", DType::int32, {"nnz"}));
    push_cache_params(p, dtype, layout, page_size, kv_heads, head_dim, combined, Param::Access::read_write, 16);
    p.push_back(tensor_param("kv_indices", DType::int32, {"num_kv_indices"}));
    p.push_back(tensor_param("kv_indptr", DType::int32, {"batch_size_plus_one"}));
    p.push_back(tensor_param("kv_last_page_len", DType::int32, {"batch_size"}));
    p.push_back(integer_param("nnz", 0, std::numeric_limits<std::int32_t>::max()));
    p.push_back(integer_param("batch_size"));
    const std::int64_t vectors = kv_heads * head_dim * static_cast<std::int64_t>(dtype_size(dtype)) / 16;
    const std::int64_t threads = std::min<std::int64_t>(256, (vectors + 31) / 32 * 32);
    plan.template_params = {{"num_kv_heads", kv_heads}, {"head_dim", head_dim}, {"page_size", page_size},
                            {"dtype", dtype_name(dtype)}, {"ctype", cuda_type(dtype)}, {"kv_layout", layout},
                            {"combined", combined}, {"threads", threads}};
    plan.launch.block[0] = static_cast<std::uint32_t>(threads);
    plan.launch.grid[0] = GridDim{param_index(p, "nnz"), 1};
    return plan;
  }

  KernelPlan plan_merge(const spec::Spec& s) const {
    spec::FieldReader fields(s);
    const std::int64_t heads = fields.integer("num_heads", 1, 1024);
    const std::int64_t head_dim = fields.integer("head_dim", 1, 1024);
    const DType dtype = fields.dtype("dtype", kStateDTypes);
    const DType out_dtype = fields.dtype("out_dtype", kStateDTypes, dtype);
    const std::int64_t vec = merge_vector(dtype, out_dtype, head_dim);
    const std::int64_t lanes = head_dim / vec;
    if (head_dim % vec != 0 || (lanes & (lanes - 1)) != 0)
      fields.fail("head_dim", fmt::format("= {} is not supported: head_dim / {} must be a power of two", head_dim, vec));
    fields.finish();

    std::int64_t rows_per_block = 128 / lanes;  // a power of two dividing num_heads, so blocks never straddle tokens
    while (heads % rows_per_block != 0) rows_per_block /= 2;

    KernelPlan plan;
    plan.op = s.op;
    plan.spec = {{"op", plan.op}, {"num_heads", heads}, {"head_dim", head_dim}, {"dtype", dtype_name(dtype)},
                 {"out_dtype", dtype_name(out_dtype)}};
    plan.template_name = "merge_states.cu.j2";
    plan.entry = fmt::format("kjit_{}", s.op);
    const std::string h = std::to_string(heads), d = std::to_string(head_dim);
    const int in_bytes = static_cast<int>(vec * dtype_size(dtype)), out_bytes = static_cast<int>(vec * dtype_size(out_dtype));
    auto& p = plan.params;
    if (s.op == "merge_state") {
      p.push_back(vector_param("v_a", dtype, {"seq_len", h, d}, in_bytes));
      p.push_back(tensor_param("s_a", DType::float32, {"seq_len", h}));
      p.push_back(vector_param("v_b", dtype, {"seq_len", h, d}, in_bytes));
      p.push_back(tensor_param("s_b", DType::float32, {"seq_len", h}));
    } else {
      p.push_back(vector_param("v", dtype, {"seq_len", "num_states", h, d}, in_bytes));
      p.push_back(tensor_param("s", DType::float32, {"seq_len", "num_states", h}));
    }
    p.push_back(vector_param("v_merged", out_dtype, {"seq_len", h, d}, out_bytes, Param::Access::write));
    p.push_back(tensor_param("s_merged", DType::float32, {"seq_len", h}, Param::Access::write));
    p.push_back(integer_param("seq_len"));
    if (s.op == "merge_states") p.push_back(integer_param("num_states", 0, std::numeric_limits<std::int32_t>::max()));
    plan.template_params = {{"op", s.op},        {"num_heads", heads},          {"head_dim", head_dim},
                            {"dtype", dtype_name(dtype)}, {"ctype", cuda_type(dtype)}, {"out_dtype", dtype_name(out_dtype)},
                            {"out_ctype", cuda_type(out_dtype)}, {"vec", vec},  {"rows_per_block", rows_per_block}};
    plan.launch.block[0] = static_cast<std::uint32_t>(rows_per_block * lanes);
    plan.launch.grid[0] = GridDim{param_index(p, "seq_len"), 1, 1, heads / rows_per_block};
    // The entries wait for the kernel before them (a split decode's, or a user's passes)
    // in the kernel, so their launch overlaps its tail.
    plan.launch.waits_for_previous_grid = true;
    // merge_states of few rows (a split decode's small batch, up to ~1024 rows): a block of
    // 512 threads per row, its lane groups sharing the states (batch 1 x 32768 decode: the
    // merge of 60 states of 32 rows took 16.5 us with a lane group per row).
    const std::int64_t split_threads = 512, split_max_seq_len = std::max<std::int64_t>(1, 1024 / heads);
    plan.template_params.update({{"split_threads", split_threads}, {"split_max_seq_len", split_max_seq_len}});
    if (s.op == "merge_states") {
      LaunchRule split;
      split.entry = plan.entry + "_split";
      split.when_param = param_index(p, "seq_len");
      split.at_most = split_max_seq_len;
      split.block[0] = static_cast<std::uint32_t>(split_threads);
      split.grid[0] = GridDim{split.when_param, 1, 1, heads};
      split.waits_for_previous_grid = true;
      plan.conditional_launches.push_back(split);
    }
    return plan;
  }
};

}  // namespace

std::unique_ptr<Family> make_attention_family() { return std::make_unique<AttentionFamily>(); }

}  // namespace kjit::families
