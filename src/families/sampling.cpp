// Sorting-free sampling from probabilities (templates/kjit/sampling.cuh).
//
//   {"op": "top_p_sampling_from_probs", "vocab_size": 128256, "dtype": "float32"}
//   ops: sampling_from_probs, top_k_sampling_from_probs, top_p_sampling_from_probs,
//        min_p_sampling_from_probs, top_k_top_p_sampling_from_probs; the same *_from_logits (softmax fused, a
//        temperature argument after the filter's); top_k_renorm_probs, top_p_renorm_probs and
//        top_k_mask_logits rewrite the row (templates/kjit/renorm.cuh)
//   fields: vocab_size (1..16777216), dtype (float32 | float16 | bfloat16),
//           per_row_params (false: top_k / top_p / min_p are scalars; true: one per row),
//           filter_apply_order (top_k_top_p ops: "top_k_first", the default as in FlashInfer:
//           top-p over the renormalized top-k tokens; "joint": a token passes both filters
//           on the original distribution),
//           tuning, sampling ops only: blocks_per_row (1..8: small batches keep each row
//           in the shared memory of that many blocks of a cluster; 0: never; by default
//           the fewest blocks with <= 64 KB each, else 8 blocks of <= 200 KB, else 0),
//           resident_max_batch (the largest batch launched that way, default 256 blocks'
//           worth; larger batches stream each row from global memory with one block)
//
// Arguments: probs [batch_size, vocab], samples int32 [batch_size] (written), the
// filter's parameters, batch_size, seed, offset; the rewriting ops take input, output
// (same shape and dtype), the parameter, batch_size. The same (seed, offset) gives the
// same samples. Scalars are checked on the host (top_k in 1..vocab, top_p in (0, 1],
// min_p in [0, 1]); per-row values are clamped into those ranges on the GPU (NaN top_p
// acts as the smallest p: the most likely token(s)).
#include <algorithm>
#include <limits>

#include <fmt/format.h>

#include "families/family.hpp"

namespace kjit::families {
namespace {

constexpr std::int64_t kMaxVocab = 1 << 24;
constexpr std::int64_t kMaxSliceBytes = 200 * 1024;  // + the Sampler's static shared memory < 227 KB

// Bytes of one block's slice when a row of `vectors` vectors of `vector_bytes`
// is split over `blocks`, rounded up to the 16 bytes the bulk copy works in.
std::int64_t slice_bytes(std::int64_t vectors, std::int64_t vector_bytes, std::int64_t blocks) {
  return ((vectors + blocks - 1) / blocks * vector_bytes + 15) / 16 * 16;
}

// The fewest blocks whose slices fit 64 KB (three blocks per SM), else 8 blocks
// of up to 200 KB, else 0: the row is streamed.
int default_blocks_per_row(std::int64_t vectors, std::int64_t vector_bytes) {
  for (int blocks : {1, 2, 4, 8})
    if (blocks <= vectors && slice_bytes(vectors, vector_bytes, blocks) <= 64 * 1024) return blocks;
  return slice_bytes(vectors, vector_bytes, 8) <= kMaxSliceBytes ? 8 : 0;
}
constexpr DType kDTypes[] = {DType::float32, DType::float16, DType::bfloat16};
constexpr std::string_view kFilterOrders[] = {"top_k_first", "joint"};

struct Variant {
  std::string_view op;
  std::string_view filter;  // sampling: the Filter; renorm: the Mode
  bool top_k, top_p, min_p;
  bool renorm = false;      // rewrites the row instead of drawing a token
};
constexpr Variant kVariants[] = {
    {"sampling_from_probs", "none", false, false, false},
    {"top_k_sampling_from_probs", "top_k", true, false, false},
    {"top_p_sampling_from_probs", "top_p", false, true, false},
    {"min_p_sampling_from_probs", "min_p", false, false, true},
    {"top_k_top_p_sampling_from_probs", "top_k_top_p", true, true, false},
    {"sampling_from_logits", "none", false, false, false},
    {"top_k_sampling_from_logits", "top_k", true, false, false},
    {"top_p_sampling_from_logits", "top_p", false, true, false},
    {"min_p_sampling_from_logits", "min_p", false, false, true},
    {"top_k_top_p_sampling_from_logits", "top_k_top_p", true, true, false},
    {"top_k_renorm_probs", "top_k_probs", true, false, false, true},
    {"top_p_renorm_probs", "top_p_probs", false, true, false, true},
    {"top_k_mask_logits", "top_k_logits", true, false, false, true},
};

class SamplingFamily final : public Family {
 public:
  std::string_view name() const override { return "sampling"; }
  std::vector<std::string_view> ops() const override {
    std::vector<std::string_view> out;
    for (const auto& v : kVariants) out.push_back(v.op);
    out.push_back("chain_speculative_sampling");
    return out;
  }
  std::vector<std::string_view> definition_op_types() const override { return {"sampling"}; }

  // FlashInfer-Bench "sampling" definitions: probs [batch, vocab] with per-row top_k
  // and/or top_p inputs. (Their samples are int64; kjit writes int32 token ids.)
  nlohmann::json spec_from_definition(const spec::Definition& d) const override {
    if (!d.input("probs"))
      throw SpecError(fmt::format("definition \"{}\": a sampling definition needs a \"probs\" input", d.name));
    const bool k = d.input("top_k") != nullptr, p = d.input("top_p") != nullptr;
    const char* op = k && p ? "top_k_top_p_sampling_from_probs" : k ? "top_k_sampling_from_probs"
                     : p    ? "top_p_sampling_from_probs"        : "sampling_from_probs";
    nlohmann::json spec = {{"op", op}, {"vocab_size", d.const_axis("vocab_size")},
                           {"dtype", dtype_name(d.tensor_dtype("probs"))}};
    if (k || p) spec["per_row_params"] = true;
    return spec;
  }

  // draft_probs [batch, n, vocab], draft_token_ids int32 [batch, n], target_probs
  // [batch, n + 1, vocab] -> output_token_ids int32 [batch, n + 1] (-1 after the last
  // emitted token), accepted_num int32 [batch]; n = num_draft_tokens at run time.
  KernelPlan plan_speculative(const spec::Spec& s) const {
    spec::FieldReader fields(s);
    const std::int64_t vocab = fields.integer("vocab_size", 1, kMaxVocab);
    const DType dtype = fields.dtype("dtype", kDTypes);
    fields.finish();
    KernelPlan plan;
    plan.op = s.op;
    plan.spec = {{"op", plan.op}, {"vocab_size", vocab}, {"dtype", dtype_name(dtype)}};
    plan.template_name = "speculative.cu.j2";
    plan.entry = "kjit_chain_speculative_sampling";
    const std::string v = std::to_string(vocab);
    auto& p = plan.params;
    p.push_back(tensor_param("draft_probs", dtype, {"batch_size", "num_draft_tokens", v}));
    p.push_back(tensor_param("draft_token_ids", DType::int32, {"batch_size", "num_draft_tokens"}));
    p.push_back(tensor_param("target_probs", dtype, {"batch_size", "num_draft_tokens_plus_one", v}));  // n + 1: unchecked
    p.push_back(tensor_param("output_token_ids", DType::int32, {"batch_size", "num_draft_tokens_plus_one"}, Param::Access::write));
    p.push_back(tensor_param("accepted_num", DType::int32, {"batch_size"}, Param::Access::write));
    p.push_back(integer_param("batch_size"));
    p.push_back(integer_param("num_draft_tokens", 0, 1 << 20));
    p.push_back(integer_param("seed", -std::numeric_limits<double>::infinity()));
    p.push_back(integer_param("offset", -std::numeric_limits<double>::infinity()));
    const int vec = widest_vector(dtype, vocab);
    plan.template_params = {{"vocab_size", vocab}, {"dtype", dtype_name(dtype)}, {"ctype", cuda_type(dtype)},
                            {"vec", vec}, {"threads", 512}};
    plan.launch.block[0] = 512;
    plan.launch.grid[0] = GridDim{param_index(p, "batch_size"), 1};
    return plan;
  }

  KernelPlan plan(const spec::Spec& s) const override {
    if (s.op == "chain_speculative_sampling") return plan_speculative(s);
    const Variant* variant = nullptr;
    for (const auto& v : kVariants)
      if (v.op == s.op) variant = &v;
    spec::FieldReader fields(s);
    const std::int64_t vocab = fields.integer("vocab_size", 1, kMaxVocab);
    const DType dtype = fields.dtype("dtype", kDTypes);
    const bool per_row = fields.boolean("per_row_params", false);
    std::string_view filter = variant->filter;
    std::string order;
    if (variant->top_k && variant->top_p && !variant->renorm) {
      order = fields.choice("filter_apply_order", kFilterOrders, "top_k_first");
      if (order == "top_k_first") filter = "top_k_then_top_p";
    }
    const int vec = widest_vector(dtype, vocab);
    const std::int64_t vectors = vocab / vec, vector_bytes = vec * static_cast<std::int64_t>(dtype_size(dtype));
    int blocks_per_row = 0, default_blocks = 0;
    std::int64_t resident_max_batch = 0, default_max_batch = 0;
    if (!variant->renorm) {
      default_blocks = default_blocks_per_row(vectors, vector_bytes);
      blocks_per_row = static_cast<int>(fields.integer("blocks_per_row", 0, 8, default_blocks));
      if (blocks_per_row > 0) {
        const std::int64_t per_block = (vectors + blocks_per_row - 1) / blocks_per_row;
        if (per_block * (blocks_per_row - 1) >= vectors)
          fields.fail("blocks_per_row", fmt::format("= {} leaves a block without a slice of the {}-vector row; use at most {}",
                                                    blocks_per_row, vectors, (vectors + per_block - 1) / per_block));
        if (slice_bytes(vectors, vector_bytes, blocks_per_row) > kMaxSliceBytes)
          fields.fail("blocks_per_row", fmt::format("= {} gives slices of {} bytes, more than the {} bytes of shared memory a block may use; "
                                                    "use more blocks, or 0 to stream the row", blocks_per_row,
                                                    slice_bytes(vectors, vector_bytes, blocks_per_row), kMaxSliceBytes));
        // One wave of an H100 at two blocks per SM: beyond it, clusters of a row wait
        // on each other while one block per row streams at full bandwidth.
        default_max_batch = std::max(1, 256 / blocks_per_row);
        resident_max_batch = fields.integer("resident_max_batch", 0, std::numeric_limits<std::int32_t>::max(), default_max_batch);
      }
    }
    fields.finish();

    // Streaming: 512 threads, a thread may use 128 registers, which four loads in
    // flight (and, for the tested filters, four candidates) need. Resident rows:
    // 256 threads per block, two blocks per SM.
    const int threads = 512, resident_threads = 256;
    const std::int64_t slice = blocks_per_row > 0 ? slice_bytes(vectors, vector_bytes, blocks_per_row) : 0;

    KernelPlan plan;
    plan.op = std::string(variant->op);
    plan.spec = {{"op", plan.op}, {"vocab_size", vocab}, {"dtype", dtype_name(dtype)}};
    if (per_row) plan.spec["per_row_params"] = true;
    if (!order.empty()) plan.spec["filter_apply_order"] = order;
    if (blocks_per_row != default_blocks) plan.spec["blocks_per_row"] = blocks_per_row;
    if (resident_max_batch != default_max_batch) plan.spec["resident_max_batch"] = resident_max_batch;
    plan.template_name = variant->renorm ? "renorm.cu.j2" : "sampling.cu.j2";
    plan.entry = fmt::format("kjit_{}", variant->op);

    const std::string v = std::to_string(vocab);
    const bool logits = variant->op.ends_with("_from_logits");
    auto& p = plan.params;
    const int row_vector_bytes = static_cast<int>(vector_bytes);  // rows are read (and written) in vectors
    if (variant->renorm) {
      const bool logits = variant->filter == "top_k_logits";
      p.push_back(vector_param(logits ? "logits" : "probs", dtype, {"batch_size", v}, row_vector_bytes));
      p.push_back(vector_param("output", dtype, {"batch_size", v}, row_vector_bytes, Param::Access::write));
    } else {
      p.push_back(vector_param(logits ? "logits" : "probs", dtype, {"batch_size", v}, row_vector_bytes));
      p.push_back(tensor_param("samples", DType::int32, {"batch_size"}, Param::Access::write));
    }
    nlohmann::json entry_params = nlohmann::json::array();
    std::string top_k = "0", top_p = "1.f", min_p = "0.f";
    const std::string row = "[row]";
    if (variant->top_k) {
      if (per_row) {
        p.push_back(tensor_param("top_k", DType::int32, {"batch_size"}));
        entry_params.push_back({"top_k", "const int*"});
        top_k = fmt::format("min(max(static_cast<long long>(top_k{}), 1LL), {}LL)", row, vocab);
      } else {
        p.push_back(integer_param("top_k", 1, static_cast<double>(vocab)));
        entry_params.push_back({"top_k", "long long"});
        top_k = "top_k";
      }
    }
    if (variant->top_p) {
      if (per_row) {
        p.push_back(tensor_param("top_p", DType::float32, {"batch_size"}));
        entry_params.push_back({"top_p", "const float*"});
        top_p = fmt::format("fminf(fmaxf(top_p{}, 1e-30f), 1.f)", row);
      } else {
        p.push_back(real_param("top_p", 0.0, 1.0, /*min_exclusive=*/true));
        entry_params.push_back({"top_p", "float"});
        top_p = "top_p";
      }
    }
    if (variant->min_p) {
      if (per_row) {
        p.push_back(tensor_param("min_p", DType::float32, {"batch_size"}));
        entry_params.push_back({"min_p", "const float*"});
        min_p = fmt::format("fminf(fmaxf(min_p{}, 0.f), 1.f)", row);
      } else {
        p.push_back(real_param("min_p", 0.0, 1.0));
        entry_params.push_back({"min_p", "float"});
        min_p = "min_p";
      }
    }
    if (logits) p.push_back(real_param("temperature", 0.0, std::numeric_limits<double>::infinity(), /*min_exclusive=*/true));
    p.push_back(integer_param("batch_size"));
    if (!variant->renorm) {
      // Any 64-bit pattern: the kernel reads them as unsigned.
      p.push_back(integer_param("seed", -std::numeric_limits<double>::infinity()));
      p.push_back(integer_param("offset", -std::numeric_limits<double>::infinity()));
    }

    plan.template_params = {{"op", plan.op},
                            {"vocab_size", vocab},
                            {"dtype", dtype_name(dtype)},
                            {"ctype", cuda_type(dtype)},
                            {"vec", vec},
                            {"threads", threads},
                            {"filter", filter},
                            {"mode", variant->filter},
                            {"logits", logits},
                            {"per_row", per_row},
                            {"params", entry_params},
                            {"top_k_expr", top_k},
                            {"top_p_expr", top_p},
                            {"min_p_expr", min_p}};
    plan.launch.block[0] = threads;
    plan.launch.grid[0] = GridDim{param_index(p, "batch_size"), 1};
    if (!variant->renorm) {
      nlohmann::json forms = nlohmann::json::array();
      // Streamed rows of 16-byte vectors that are read more than once go through a ring of
      // six stages of four vectors per thread (Sampler::kRingBytes): a pass does not copy
      // again what the last one left there. Measured at 128 x 128256 fp32, register loads
      // against the ring: top-p 76 vs 72 us, min-p 55 vs 48, top-k first 158 vs 115; the
      // one-pass draw streams faster into registers (35 vs 38). (Twelve stages of two
      // vectors: top-p 57.7 us against 53.7, the warps waited on each other twice as often.)
      // Top-k: the ring 77.5 us against 84.6 in registers for fp32, but 200.5 against 193.4
      // for bf16 (vocabulary 151936: eight entries a vector, and four vectors a stage).
      const bool multi_pass = filter != "none" || logits;
      const bool ring_helps = multi_pass && (filter != "top_k" || dtype == DType::float32);
      const int ring_stages = vector_bytes == 16 && ring_helps ? 6 : 0;
      const std::int64_t ring = ring_stages * threads * 4 * 16;
      plan.launch.dynamic_shared_bytes = static_cast<std::uint32_t>(ring);
      forms.push_back({{"entry", plan.entry}, {"blocks_per_row", 0}, {"threads", threads}, {"min_blocks", 1},
                       {"shared_bytes", ring}, {"ring_stages", ring_stages}});
      if (blocks_per_row > 0) {
        LaunchRule resident;
        resident.entry = plan.entry + "_resident";
        resident.when_param = param_index(p, "batch_size");
        resident.at_most = resident_max_batch;
        resident.block[0] = resident_threads;
        resident.grid[0] = GridDim{resident.when_param, 1, 1, blocks_per_row};
        resident.dynamic_shared_bytes = static_cast<std::uint32_t>(slice);
        plan.conditional_launches.push_back(resident);
        forms.push_back({{"entry", resident.entry}, {"blocks_per_row", blocks_per_row}, {"threads", resident_threads},
                         {"min_blocks", 2}, {"shared_bytes", slice}, {"ring_stages", 0}});
      }
      plan.template_params["forms"] = forms;
    }
    return plan;
  }
};

}  // namespace

std::unique_ptr<Family> make_sampling_family() { return std::make_unique<SamplingFamily>(); }

}  // namespace kjit::families
