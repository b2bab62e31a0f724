#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "families/family.hpp"
#include "kjit/kjit.hpp"
#include "spec/config.hpp"
#include "spec/spec.hpp"

using Catch::Contains;

namespace {
kjit::families::KernelPlan plan(const std::string& json) { return kjit::families::plan_spec(kjit::spec::parse_spec(json)); }

std::string refusal(const std::string& json) {
  try {
    plan(json);
  } catch (const kjit::SpecError& e) {
    return e.what();
  }
  return "";
}

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}
const std::string kSource = KJIT_SOURCE_DIR;
}  // namespace

TEST_CASE("a valid spec plans a kernel", "[spec]") {
  auto p = plan(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})");
  CHECK(p.entry == "kjit_rmsnorm");
  CHECK(p.spec.dump() == R"({"dtype":"bfloat16","hidden_size":4096,"op":"rmsnorm"})");
  REQUIRE(p.params.size() == 5);
  CHECK(p.params[0].name == "input");
  CHECK(p.params[0].shape == std::vector<std::string>{"batch_size", "4096"});
  CHECK(p.params[3].kind == kjit::Param::Kind::integer);
  CHECK(p.params[4].kind == kjit::Param::Kind::real);
  CHECK(p.launch.block[0] * p.launch.block[1] <= 1024);
  // dtype aliases are accepted and canonicalized.
  CHECK(plan(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bf16"})").spec["dtype"] == "bfloat16");
  auto q = plan(R"({"op": "fused_add_rmsnorm_fp8_quant", "hidden_size": 7168, "dtype": "float16"})");
  CHECK(q.params[1].name == "residual");
  CHECK(q.params[1].access == kjit::Param::Access::read_write);
  CHECK(q.params[3].dtype == kjit::DType::float8_e4m3);
  CHECK(q.params[4].name == "scale");
}

TEST_CASE("sampling rows go to shared memory over as few blocks as fit", "[spec][sampling]") {
  auto layout = [](std::int64_t vocab, const char* dtype) {
    auto p = plan(fmt::format(R"({{"op": "top_p_sampling_from_probs", "vocab_size": {}, "dtype": "{}"}})", vocab, dtype));
    CHECK(p.launch.grid[0].multiplier == 1);  // large batches: one block streams each row
    // through a copy ring of 192 KB (a filter reads the row more than once) when the row is made of 16-byte vectors
    const std::int64_t row_bytes = vocab * (std::string_view(dtype) == "float32" ? 4 : 2);
    CHECK(p.launch.dynamic_shared_bytes == (row_bytes % 16 == 0 ? 196608u : 0u));
    if (p.conditional_launches.empty()) return std::pair<int, std::uint32_t>(0, 0);
    const auto& resident = p.conditional_launches[0];
    CHECK(resident.entry == p.entry + "_resident");
    CHECK(p.params[static_cast<std::size_t>(resident.when_param)].name == "batch_size");
    CHECK(resident.at_most == 256 / resident.grid[0].multiplier);
    return std::pair<int, std::uint32_t>(static_cast<int>(resident.grid[0].multiplier), resident.dynamic_shared_bytes);
  };
  CHECK(layout(128256, "float32") == std::pair<int, std::uint32_t>(8, 64128));  // 513 KB rows
  CHECK(layout(128256, "bfloat16") == std::pair<int, std::uint32_t>(4, 64128));
  CHECK(layout(152064, "float32") == std::pair<int, std::uint32_t>(8, 76032));  // > 64 KB at 8 blocks
  CHECK(layout(32000, "float32") == std::pair<int, std::uint32_t>(2, 64000));
  CHECK(layout(17, "float32") == std::pair<int, std::uint32_t>(1, 80));
  CHECK(layout(1 << 20, "float32") == std::pair<int, std::uint32_t>(0, 0));  // 4 MB rows: streamed
  // The streamed form's copy ring: for rows read more than once, not for the one-pass
  // draw nor 16-bit top-k (both stream faster into registers).
  auto ring_bytes = [](const char* op, const char* dtype = "float32") {
    return plan(fmt::format(R"({{"op": "{}", "vocab_size": 128256, "dtype": "{}"}})", op, dtype)).launch.dynamic_shared_bytes;
  };
  CHECK(ring_bytes("sampling_from_probs") == 0);
  CHECK(ring_bytes("top_k_sampling_from_probs") == 196608);
  CHECK(ring_bytes("top_k_sampling_from_probs", "bfloat16") == 0);
  CHECK(ring_bytes("top_p_sampling_from_probs", "bfloat16") == 196608);
  CHECK(ring_bytes("sampling_from_logits") == 196608);
  CHECK(ring_bytes("min_p_sampling_from_probs") == 196608);
  // The canonical spec names the field only when it is not the default.
  CHECK_FALSE(plan(R"({"op": "sampling_from_probs", "vocab_size": 1000, "dtype": "float32", "blocks_per_row": 1})").spec.contains("blocks_per_row"));
  CHECK(plan(R"({"op": "sampling_from_probs", "vocab_size": 1000, "dtype": "float32", "blocks_per_row": 0})").spec["blocks_per_row"] == 0);
}

TEST_CASE("attention plans: prefill blocks and the merge's few-row form", "[spec][attention]") {
  const std::string prefill = R"("op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16")";
  const auto one = plan("{" + prefill + "}");
  CHECK_FALSE(one.spec.contains("warpgroups"));  // defaults stay out of the canonical spec
  CHECK_FALSE(one.spec.contains("warpgroup_mma"));
  // head_dim 128: warp-specialized by default.
  CHECK_FALSE(one.spec.contains("warp_specialized"));
  CHECK(one.launch.block[0] == 384);  // a copying and two MMA warpgroups
  CHECK(one.launch.grid[2].divisor == 128 / 4);  // the work: 128 rows of 32 queries x 4 heads per item
  CHECK(one.launch.persistent_blocks_per_sm == 1);
  CHECK(one.launch.dynamic_shared_bytes == (128 + 2 * 3 * 128) * 128 * 2 + 1024 + 256);  // 3 K/V stages
  // Launches of short requests (max_qo_len <= 16) take the other form's entry point.
  REQUIRE(one.conditional_launches.size() == 1);
  CHECK(one.conditional_launches[0].entry == "kjit_batch_prefill_short");
  CHECK(one.conditional_launches[0].at_most == 16);
  CHECK(one.conditional_launches[0].block[0] == 128);
  CHECK(one.conditional_launches[0].persistent_blocks_per_sm == 0);
  CHECK(one.params[static_cast<std::size_t>(one.conditional_launches[0].when_param)].name == "max_qo_len");
  // Ragged K/V: q, k and v tensor maps (TMA boxes of 64 dims; q's rows whole queries of 4
  // heads), on the warp-specialized entry only.
  REQUIRE(one.launch.tensor_maps.size() == 3);
  CHECK(one.params[static_cast<std::size_t>(one.launch.tensor_maps[0].param)].name == "q");
  CHECK(one.launch.tensor_maps[0].dims == std::vector<std::int64_t>{128, 32, 0});
  CHECK(one.launch.tensor_maps[0].box == std::vector<std::uint32_t>{64, 4, 32});
  CHECK(one.params[static_cast<std::size_t>(one.launch.tensor_maps[2].param)].name == "v");
  CHECK(one.launch.tensor_maps[2].dims == std::vector<std::int64_t>{128, 8, 0});
  CHECK(one.launch.tensor_maps[2].box == std::vector<std::uint32_t>{64, 1, 128});
  CHECK(one.conditional_launches[0].tensor_maps.empty());
  // Pages: boxes of a page's slots (NHD: by head; HND: a head's slots are rows), none for
  // pages under 64 keys or not dividing / divided by the 128-key tile.
  const auto paged64 = plan("{" + prefill + R"(, "paged": true, "page_size": 64, "kv_layout": "HND", "kv_storage": "combined"})");
  REQUIRE(paged64.launch.tensor_maps.size() == 3);
  CHECK(paged64.params[static_cast<std::size_t>(paged64.launch.tensor_maps[1].param)].name == "kv_cache");
  CHECK(paged64.launch.tensor_maps[1].dims == std::vector<std::int64_t>{128, 1, 0});
  CHECK(paged64.launch.tensor_maps[1].box == std::vector<std::uint32_t>{64, 1, 64});
  CHECK(plan("{" + prefill + R"(, "paged": true, "page_size": 256})").launch.tensor_maps[2].box ==
        std::vector<std::uint32_t>{64, 1, 128});
  CHECK(plan("{" + prefill + R"(, "paged": true, "page_size": 16})").launch.tensor_maps.empty());
  CHECK(plan("{" + prefill + R"(, "paged": true, "page_size": 192})").launch.tensor_maps.empty());
  // "work_list": the kernel takes the host plan's list after lse; only the warp-specialized form.
  using kjit::families::param_index;
  const auto listed = plan("{" + prefill + R"(, "work_list": true})");
  CHECK(listed.spec["work_list"] == true);
  CHECK(listed.params[static_cast<std::size_t>(param_index(listed.params, "work_list"))].dtype == kjit::DType::int32);
  CHECK(param_index(listed.params, "work_list") == param_index(listed.params, "lse") + 1);
  CHECK_FALSE(one.spec.contains("work_list"));
  CHECK(param_index(one.params, "work_list") < 0);
  // "staged_output": the same launch and shared memory (one V stage's room stages the output).
  const auto staged = plan("{" + prefill + R"(, "staged_output": true})");
  CHECK(staged.spec["staged_output"] == true);
  CHECK(staged.launch.dynamic_shared_bytes == one.launch.dynamic_shared_bytes);
  CHECK(staged.template_params["staged_output"] == true);
  CHECK_FALSE(one.spec.contains("staged_output"));
  // A group that does not divide the 128 rows: q boxes of one head (the kernel copies Q itself).
  CHECK(plan(R"({"op": "batch_prefill", "num_qo_heads": 12, "num_kv_heads": 4, "head_dim": 128, "dtype": "bfloat16"})")
            .launch.tensor_maps[0].box == std::vector<std::uint32_t>{64, 1, 128});
  const auto alone = plan("{" + prefill + R"(, "short_form_max_qo_len": 0})");
  CHECK(alone.conditional_launches.empty());
  CHECK(alone.spec["short_form_max_qo_len"] == 0);
  CHECK(plan(alone.spec.dump()).conditional_launches.empty());
  const auto other = plan("{" + prefill + R"(, "warp_specialized": false})");
  CHECK(other.conditional_launches.empty());
  CHECK(other.spec["warp_specialized"] == false);
  CHECK(other.launch.block[0] == 128);
  CHECK(other.launch.grid[2].divisor == 64 / 4);  // 64 rows of 16 queries x 4 heads per block
  CHECK(other.launch.persistent_blocks_per_sm == 0);
  // The other form's tuning fields choose it, and the canonical spec says so even when
  // they are at their defaults (so it plans the same kernel again).
  const auto tuned = plan("{" + prefill + R"(, "keys_per_tile": 32})");
  CHECK(tuned.launch.block[0] == 128);
  CHECK(tuned.spec["warp_specialized"] == false);
  CHECK(plan(tuned.spec.dump()).launch.block[0] == 128);
  // head_dim 64: on request only.
  const std::string d64 = R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 64, "dtype": "bfloat16")";
  CHECK(plan(d64 + "}").launch.block[0] == 128);
  CHECK(plan(d64 + R"(, "warp_specialized": true})").spec["warp_specialized"] == true);
  CHECK(plan(d64 + R"(, "warp_specialized": true})").launch.block[0] == 384);
  const auto two = plan("{" + prefill + R"(, "warpgroups": 2, "warpgroup_mma": false})");
  CHECK(two.spec["warpgroups"] == 2);
  CHECK(two.spec["warpgroup_mma"] == false);
  CHECK(two.launch.block[0] == 256);
  CHECK(two.launch.grid[2].divisor == 128 / 4);
  CHECK(two.launch.dynamic_shared_bytes == (128 + 4 * 32) * 128 * 2 + 1024);

  // merge_states: a block per row (the "_split" entry) while seq_len <= 1024 / heads.
  const auto merge = plan(R"({"op": "merge_states", "num_heads": 32, "head_dim": 128, "dtype": "float32"})");
  REQUIRE(merge.conditional_launches.size() == 1);
  CHECK(merge.conditional_launches[0].entry == "kjit_merge_states_split");
  CHECK(merge.conditional_launches[0].at_most == 32);
  CHECK(merge.conditional_launches[0].grid[0].multiplier == 32);
  CHECK(plan(R"({"op": "merge_state", "num_heads": 32, "head_dim": 128, "dtype": "float32"})").conditional_launches.empty());

  // The merges are launched to overlap the kernel before them, so every entry of theirs must
  // wait for that kernel itself before its first read; other kernels launch plainly.
  CHECK(merge.launch.waits_for_previous_grid);
  CHECK(merge.conditional_launches[0].waits_for_previous_grid);
  CHECK_FALSE(one.launch.waits_for_previous_grid);
  kjit::EngineOptions options;
  options.disk_cache = false;
  kjit::Engine engine(options);
  for (const char* op : {"merge_state", "merge_states"}) {
    const std::string source = engine.render(fmt::format(R"({{"op": "{}", "num_heads": 32, "head_dim": 128, "dtype": "float32"}})", op));
    std::size_t entries = 0, waits = 0;
    for (std::size_t at = 0; (at = source.find("__global__", at)) != std::string::npos; ++at) ++entries;
    for (std::size_t at = 0; (at = source.find("kjit::wait_for_previous_grid();", at)) != std::string::npos; ++at) ++waits;
    INFO(op);
    CHECK(entries > 0);
    CHECK(waits == entries);
  }
}

TEST_CASE("launch geometry covers every row and element", "[spec]") {
  for (int hidden : {1, 2, 3, 8, 100, 128, 256, 264, 512, 1536, 2048, 4096, 4097, 5120, 7168, 8192, 16384}) {
    for (int vectors : {1, 2, 4, 8})
    for (const char* dtype : {"float16", "bfloat16"}) {
      auto p = plan(fmt::format(R"({{"op": "rmsnorm", "hidden_size": {}, "dtype": "{}", "vectors_per_thread": {}}})",
                                hidden, dtype, vectors));
      int vec = p.template_params["vec"];
      int threads = p.template_params["threads_per_row"];
      int rows = p.template_params["rows_per_block"];
      INFO("hidden " << hidden << " vec " << vec << " threads " << threads);
      CHECK(hidden % vec == 0);
      CHECK(vec * 2 <= 16);
      CHECK((threads <= 32 ? 32 % threads == 0 : threads % 32 == 0));
      CHECK(threads * rows <= 1024);
      CHECK(static_cast<std::int64_t>(threads) * vec * ((hidden / vec + threads - 1) / threads) >= hidden);
      CHECK(p.launch.grid[0].divisor == rows);
    }
  }
}

TEST_CASE("spec refusals name the field, the value and what is allowed", "[spec]") {
  CHECK(refusal(R"({"op": "rmsnorm_typo", "hidden_size": 4096, "dtype": "bfloat16"})") ==
        "unknown op \"rmsnorm_typo\"; known ops: rmsnorm, fused_add_rmsnorm, rmsnorm_fp8_quant, fused_add_rmsnorm_fp8_quant, "
        "sampling_from_probs, top_k_sampling_from_probs, top_p_sampling_from_probs, min_p_sampling_from_probs, "
        "top_k_top_p_sampling_from_probs, sampling_from_logits, top_k_sampling_from_logits, top_p_sampling_from_logits, "
        "min_p_sampling_from_logits, top_k_top_p_sampling_from_logits, top_k_renorm_probs, top_p_renorm_probs, "
        "top_k_mask_logits, "
        "chain_speculative_sampling, batch_decode, batch_prefill, append_paged_kv_cache, merge_state, merge_states");
  CHECK(refusal(R"({"op": "rmsnorm", "dtype": "bfloat16"})") == "spec for op \"rmsnorm\": field \"hidden_size\" is missing");
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16", "eps": 1e-6})") ==
        "spec for op \"rmsnorm\": unknown field \"eps\"; fields of this op: dtype, hidden_size, vectors_per_thread");
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": "4096", "dtype": "bfloat16"})") ==
        "spec for op \"rmsnorm\": field \"hidden_size\" must be an integer, got \"4096\"");
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": 40960, "dtype": "bfloat16"})") ==
        "spec for op \"rmsnorm\": field \"hidden_size\" = 40960 is out of range: allowed 1..16384");
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": 0, "dtype": "bfloat16"})").find("allowed 1..16384") != std::string::npos);
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": "float32"})") ==
        "spec for op \"rmsnorm\": field \"dtype\" = \"float32\" is not a supported dtype: allowed float16, bfloat16");
  CHECK(refusal(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": 16})") ==
        "spec for op \"rmsnorm\": field \"dtype\" must be a dtype string (float16, bfloat16), got 16");
  CHECK(refusal(R"({"op": 7})") == "spec field \"op\" must be a string");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 0, "dtype": "float32"})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"vocab_size\" = 0 is out of range: allowed 1..16777216");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 128256, "dtype": "int32"})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"dtype\" = \"int32\" is not a supported dtype: allowed "
        "float32, float16, bfloat16");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 128256, "dtype": "float32", "per_row_params": 1})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"per_row_params\" must be true or false, got 1");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 5, "dtype": "float32", "blocks_per_row": 4})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"blocks_per_row\" = 4 leaves a block without a slice of the "
        "5-vector row; use at most 3");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 152064, "dtype": "float32", "blocks_per_row": 2})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"blocks_per_row\" = 2 gives slices of 304128 bytes, more than "
        "the 204800 bytes of shared memory a block may use; use more blocks, or 0 to stream the row");
  CHECK(refusal(R"({"op": "top_p_sampling_from_probs", "vocab_size": 128256, "dtype": "float32", "blocks_per_row": 9})") ==
        "spec for op \"top_p_sampling_from_probs\": field \"blocks_per_row\" = 9 is out of range: allowed 0..8");
  const std::string decode = R"("op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "dtype": "bfloat16")";
  CHECK(refusal("{" + decode + R"(, "head_dim": 96, "page_size": 16})") ==
        "spec for op \"batch_decode\": field \"head_dim\" = 96 is not supported: allowed 64, 128, 256");
  CHECK(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 0})") ==
        "spec for op \"batch_decode\": field \"page_size\" = 0 is out of range: allowed 1..1024");
  CHECK(refusal(R"({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 6, "head_dim": 128, "page_size": 16, "dtype": "bfloat16"})") ==
        "spec for op \"batch_decode\": field \"num_kv_heads\" = 6 does not divide num_qo_heads = 32");
  CHECK(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "kv_dtype": "float16"})") ==
        "spec for op \"batch_decode\": field \"kv_dtype\" = float16 must be dtype (bfloat16) or float8_e4m3");
  CHECK_THAT(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "kv_dtype": "float8_e5m2"})"), Contains("field \"kv_dtype\""));
  CHECK_THAT(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "kv_storage": "interleaved"})"),
             Contains("field \"kv_storage\""));
  CHECK_THAT(refusal(R"({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 16, "dtype": "float32"})"),
             Contains("field \"dtype\""));
  CHECK_THAT(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "kv_layout": "NDH"})"), Contains("field \"kv_layout\""));
  CHECK(refusal("{" + decode + R"(, "head_dim": 256, "page_size": 16, "tensor_cores": true})") ==
        "spec for op \"batch_decode\": field \"tensor_cores\" needs head_dim 64 or 128, got 256");
  CHECK(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "kv_dtype": "float8_e4m3", "tensor_cores": true})") ==
        "spec for op \"batch_decode\": field \"tensor_cores\" needs 16-bit KV (kv_dtype float8_e4m3 takes the default form)");
  CHECK_THAT(refusal("{" + decode + R"(, "head_dim": 128, "page_size": 16, "pipeline_stages": 3, "tensor_cores": true})"),
             Contains("field \"tensor_cores\""));
  CHECK(refusal(R"({"op": "merge_states", "num_heads": 8, "head_dim": 96, "dtype": "float32"})") ==
        "spec for op \"merge_states\": field \"head_dim\" = 96 is not supported: head_dim / 4 must be a power of two");
  const std::string prefill = R"("op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16")";
  CHECK_THAT(refusal("{" + prefill + R"(, "warpgroups": 3})"), Contains("field \"warpgroups\" = 3"));
  CHECK_THAT(refusal("{" + prefill + R"(, "warpgroup_mma": "yes"})"), Contains("field \"warpgroup_mma\""));
  // The warp-specialized form: wgmma and head_dim <= 128 only; the other form's tuning
  // fields choose that form, and with the field set they are refused by name.
  CHECK_THAT(refusal(R"({"op": "batch_prefill", "num_qo_heads": 8, "num_kv_heads": 8, "head_dim": 256, "dtype": "bfloat16", "warp_specialized": true})"),
             Contains("field \"warp_specialized\"") && Contains("needs head_dim <= 128, got 256"));
  CHECK_THAT(refusal("{" + prefill + R"(, "warpgroup_mma": false, "warp_specialized": true})"),
             Contains("field \"warp_specialized\"") && Contains("needs warpgroup_mma"));
  CHECK_THAT(refusal("{" + prefill + R"(, "warp_specialized": true, "keys_per_tile": 64})"), Contains("field \"keys_per_tile\""));
  CHECK_THAT(refusal("{" + prefill + R"(, "warp_specialized": false, "short_form_max_qo_len": 64})"),
             Contains("field \"short_form_max_qo_len\"") && Contains("warp-specialized"));
  CHECK_THAT(refusal("{" + prefill + R"(, "short_form_max_qo_len": -1})"), Contains("field \"short_form_max_qo_len\""));
  CHECK_THAT(refusal("{" + prefill + R"(, "warp_specialized": false, "work_list": true})"),
             Contains("field \"work_list\"") && Contains("warp-specialized"));
  CHECK_THAT(refusal("{" + prefill + R"(, "warp_specialized": false, "staged_output": true})"),
             Contains("field \"staged_output\"") && Contains("warp-specialized"));
  CHECK(refusal(R"([1, 2])") == "spec must be a JSON object, got array");
  CHECK(refusal(R"({"hidden_size": 4096})").find("spec has no \"op\" field") == 0);
  CHECK(refusal("{\"op\": \"rmsnorm\",\n \"hidden_size\": 4096,,}").find("spec is not valid JSON: parse error at line 2, column 22") == 0);
}

TEST_CASE("FlashInfer-Bench definitions import", "[spec][definition]") {
  const std::string dir = kSource + "/tests/data/definitions/rmsnorm/";
  auto p = plan(read(dir + "rmsnorm_h7168.json"));
  CHECK(p.spec.dump() == R"({"dtype":"bfloat16","hidden_size":7168,"op":"rmsnorm"})");
  auto f = plan(read(dir + "fused_add_rmsnorm_h2048.json"));
  CHECK(f.spec.dump() == R"({"dtype":"bfloat16","hidden_size":2048,"op":"fused_add_rmsnorm"})");
  int count = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {  // rmsnorm/
    INFO(e.path());
    CHECK_NOTHROW(plan(read(e.path())));
    ++count;
  }
  CHECK(count >= 6);

  // The older "type" field is accepted as well as "op_type".
  auto j = nlohmann::json::parse(read(dir + "rmsnorm_h128.json"));
  j["type"] = j["op_type"];
  j.erase("op_type");
  CHECK(plan(j.dump()).spec["hidden_size"] == 128);

  // A var hidden size, a missing axis, or an op type no family supports are refused clearly.
  j["axes"]["hidden_size"] = {{"type", "var"}};
  CHECK(refusal(j.dump()) == "definition \"rmsnorm_h128\": axis \"hidden_size\" must be const for op type \"rmsnorm\"");
  j["axes"].erase("hidden_size");
  CHECK(refusal(j.dump()) == "definition \"rmsnorm_h128\": has no axis \"hidden_size\"");
  // FlashInfer-Bench's GQA definitions (where ../shared has them): paged decode builds
  // batch_decode; prefill is refused by name; MLA is not supported.
  const std::string shared = kSource + "/../shared/definitions/";
  if (std::string gqa = read(shared + "gqa_paged/gqa_paged_decode_h32_kv8_d128_ps1.json"); !gqa.empty())
    CHECK(plan(gqa).spec.dump() ==
          R"({"dtype":"bfloat16","head_dim":128,"kv_dtype":"bfloat16","kv_layout":"NHD","kv_storage":"separate","num_kv_heads":8,"num_qo_heads":32,"op":"batch_decode","page_size":1,"return_lse":true,"tensor_cores":true})");
  if (std::string prefill = read(shared + "gqa_paged/gqa_paged_prefill_causal_h32_kv8_d128_ps1.json"); !prefill.empty())
    CHECK(plan(prefill).spec.dump() ==
          R"({"causal":true,"dtype":"bfloat16","head_dim":128,"kv_layout":"NHD","kv_storage":"separate","num_kv_heads":8,"num_qo_heads":32,"op":"batch_prefill","page_size":1,"paged":true,"return_lse":true})");
  if (std::string ragged = read(shared + "gqa_ragged/gqa_ragged_prefill_causal_h32_kv8_d128.json"); !ragged.empty())
    CHECK(plan(ragged).spec.dump() ==
          R"({"causal":true,"dtype":"bfloat16","head_dim":128,"num_kv_heads":8,"num_qo_heads":32,"op":"batch_prefill","return_lse":true})");
  if (std::string mla = read(shared + "mla_paged/mla_paged_decode_h16_ckv512_kpe64_ps1.json"); !mla.empty())
    CHECK_THAT(refusal(mla), Contains("is not supported; supported op types: rmsnorm, sampling, gqa"));

  // Sampling definitions: per-row parameters, vocabulary from the const axis.
  const std::string sampling = kSource + "/tests/data/definitions/sampling/";
  CHECK(plan(read(sampling + "top_k_top_p_sampling_from_probs_v129280.json")).spec.dump() ==
        R"({"dtype":"float32","filter_apply_order":"top_k_first","op":"top_k_top_p_sampling_from_probs","per_row_params":true,"vocab_size":129280})");
  CHECK(plan(read(sampling + "top_p_sampling_from_probs_v151936.json")).spec["op"] == "top_p_sampling_from_probs");
  CHECK(plan(read(sampling + "top_k_sampling_from_probs_v128256.json")).params[2].dtype == kjit::DType::int32);
}

TEST_CASE("model configs expand grids and keep specs unique", "[spec][config]") {
  auto c = kjit::spec::parse_config(nlohmann::json::parse(R"({
    "name": "m", "arch": "sm_90a",
    "specs": [{"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"}],
    "grids": [{"op": ["rmsnorm", "fused_add_rmsnorm"], "hidden_size": [4096, 2048], "dtype": "bfloat16"}],
    "shapes": {"batch_size": [1, 16]}})"), "test");
  CHECK(c.archs == std::vector<std::string>{"sm_90a"});
  CHECK(c.specs.size() == 4);  // 1 explicit, 4 from the grid, one duplicate
  REQUIRE(c.shapes.size() == 1);
  CHECK(c.shapes[0].at("batch_size") == std::vector<std::int64_t>{1, 16});
  CHECK(c.shapes_of(0).size() == 1);  // no shapes of its own: the config's

  // Shapes of a spec or grid replace the config's for it, and are not a spec field.
  auto own = kjit::spec::parse_config(nlohmann::json::parse(R"({
    "specs": [{"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16", "shapes": [{"batch_size": 3}, {"batch_size": [5, 6]}]}],
    "grids": [{"op": "rmsnorm", "hidden_size": [128, 256], "dtype": "float16", "shapes": {"batch_size": 7}}],
    "shapes": {"batch_size": 1}})"), "test");
  REQUIRE(own.specs.size() == 3);
  CHECK_FALSE(own.specs[0].contains("shapes"));
  CHECK(own.shapes_of(0).size() == 2);
  CHECK(own.shapes_of(0)[1].at("batch_size") == std::vector<std::int64_t>{5, 6});
  CHECK(own.shapes_of(2).at(0).at("batch_size") == std::vector<std::int64_t>{7});
  CHECK_THROWS_WITH(kjit::spec::parse_config(nlohmann::json::parse(R"({"specs": [{"op": "rmsnorm", "shapes": 3}]})"), "x"),
                    Contains("\"shapes\" must be an object or a list of objects"));

  // The shipped default: every spec plans, and every one says what it is benchmarked on.
  auto shipped = kjit::spec::load_config(kSource + "/configs/llama-3.1-8b.json");
  CHECK(shipped.specs.size() == 14);
  for (std::size_t i = 0; i < shipped.specs.size(); ++i) {
    CHECK_NOTHROW(plan(shipped.specs[i].dump()));
    CHECK_FALSE(shipped.spec_shapes[i].empty());
  }
  CHECK_THROWS_WITH(kjit::spec::parse_config(nlohmann::json::parse("{}"), "x"), "config x: no specs (give \"specs\" or \"grids\")");
  CHECK_THROWS_AS(kjit::spec::load_config("/no/such/config.json"), kjit::SpecError);
}
