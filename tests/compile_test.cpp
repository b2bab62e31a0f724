#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "codegen/template_store.hpp"
#include "compile/nvrtc.hpp"
#include "kjit/kjit.hpp"

using Catch::Contains;

namespace {
kjit::EngineOptions memory_only() {
  kjit::EngineOptions o;
  o.disk_cache = false;
  return o;
}

// Builds every spec for sm_90a on two threads; failures are "spec: message", including any
// kernel that spills, keeps an array in local memory, or has ptxas warn of a performance
// loss (serialized wgmma made the warp-specialized prefill 1.5x slower, seen only on a GPU).
std::pair<std::vector<kjit::Artifact>, std::vector<std::string>> build_all(const std::vector<std::string>& specs) {
  kjit::Engine engine(memory_only());
  std::mutex mutex;
  std::vector<kjit::Artifact> built;
  std::vector<std::string> failures;
  std::atomic<std::size_t> next{0};
  auto worker = [&] {
    for (std::size_t i; (i = next++) < specs.size();) {
      try {
        auto a = engine.build(specs[i], "sm_90a");
        std::lock_guard lock(mutex);
        if (a.info.spill_bytes != 0 || a.info.stack_bytes != 0)
          failures.push_back(fmt::format("{}: spills {} bytes, local memory {} bytes", specs[i], a.info.spill_bytes, a.info.stack_bytes));
        if (!a.info.performance_warnings.empty())
          failures.push_back(fmt::format("{}: ptxas: {}", specs[i], a.info.performance_warnings));
        built.push_back(std::move(a));
      } catch (const std::exception& e) {
        std::lock_guard lock(mutex);
        failures.push_back(specs[i] + ": " + e.what());
      }
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  return {std::move(built), std::move(failures)};
}

// Points KJIT_TEMPLATE_DIR at a directory holding one overriding template for a scope.
struct TemplateOverride {
  std::filesystem::path dir;
  TemplateOverride(const std::string& name, const std::string& text) {
    dir = std::filesystem::temp_directory_path() / fmt::format("kjit-templates-{}", ::getpid());
    std::filesystem::create_directories(dir);
    std::ofstream(dir / name) << text;
    ::setenv("KJIT_TEMPLATE_DIR", dir.c_str(), 1);
  }
  ~TemplateOverride() {
    ::unsetenv("KJIT_TEMPLATE_DIR");
    std::filesystem::remove_all(dir);
  }
};
}  // namespace

TEST_CASE("every normalization variant compiles for sm_90a", "[compile]") {
  std::vector<std::string> specs;
  for (const char* op : {"rmsnorm", "fused_add_rmsnorm", "rmsnorm_fp8_quant", "fused_add_rmsnorm_fp8_quant"})
    for (const char* dtype : {"float16", "bfloat16"})
      // Every FlashInfer-Bench hidden size, the largest, and awkward ones.
      for (int hidden : {128, 512, 1536, 2048, 4096, 7168, 16384, 1, 3, 100, 4097, 5120})
        specs.push_back(fmt::format(R"({{"op": "{}", "hidden_size": {}, "dtype": "{}"}})", op, hidden, dtype));
  auto [built, failures] = build_all(specs);
  for (const auto& f : failures) FAIL_CHECK(f);
  REQUIRE(built.size() == specs.size());
  for (const auto& art : built) {
    INFO(art.info.spec);
    CHECK(art.info.source == kjit::ArtifactSource::nvrtc);
    CHECK(art.cubin.size() > 1000);
    CHECK(art.cubin.compare(0, 4, "\x7f" "ELF") == 0);
    CHECK(art.cubin.find(art.info.entry) != std::string::npos);
    CHECK(art.info.registers > 0);
    CHECK(art.info.spill_bytes == 0);
    CHECK(art.info.stack_bytes == 0);
  }
}

TEST_CASE("every sampling variant compiles for sm_90a", "[compile][sampling]") {
  std::vector<std::string> specs;
  const char* ops[] = {"sampling_from_probs", "top_k_sampling_from_probs", "top_p_sampling_from_probs",
                       "min_p_sampling_from_probs", "top_k_top_p_sampling_from_probs", "top_k_renorm_probs",
                       "top_p_renorm_probs", "top_k_mask_logits", "sampling_from_logits", "top_k_sampling_from_logits",
                       "top_p_sampling_from_logits", "min_p_sampling_from_logits", "top_k_top_p_sampling_from_logits"};
  for (const char* op : ops) {
    for (int vocab : {32000, 128256, 129280, 151936, 152064, 1000, 17})
      specs.push_back(fmt::format(R"({{"op": "{}", "vocab_size": {}, "dtype": "float32"}})", op, vocab));
    for (const char* dtype : {"float16", "bfloat16"})
      specs.push_back(fmt::format(R"({{"op": "{}", "vocab_size": 128256, "dtype": "{}"}})", op, dtype));
    for (const char* dtype : {"float32", "bfloat16"})
      specs.push_back(fmt::format(R"({{"op": "{}", "vocab_size": 151936, "dtype": "{}", "per_row_params": true}})", op, dtype));
  }
  // Rows streamed from global memory, and clusters of every size.
  for (int blocks : {0, 2, 3, 5, 8})
    for (const char* order : {"top_k_first", "joint"})
      specs.push_back(fmt::format(
          R"({{"op": "top_k_top_p_sampling_from_logits", "vocab_size": 151936, "dtype": "bfloat16", "blocks_per_row": {}, "filter_apply_order": "{}"}})",
          blocks, order));
  specs.push_back(R"({"op": "top_k_top_p_sampling_from_probs", "vocab_size": 128256, "dtype": "float32", "filter_apply_order": "joint"})");
  for (const char* dtype : {"float32", "float16", "bfloat16"})
    for (int vocab : {128256, 17})
      specs.push_back(fmt::format(R"({{"op": "chain_speculative_sampling", "vocab_size": {}, "dtype": "{}"}})", vocab, dtype));
  auto [built, failures] = build_all(specs);
  for (const auto& f : failures) FAIL_CHECK(f);
}

TEST_CASE("every attention variant in a representative grid compiles for sm_90a", "[compile][attention]") {
  std::vector<std::string> specs;
  for (int head_dim : {64, 128, 256})
    for (int group : {1, 4, 8, 16})
      for (const char* layout : {"NHD", "HND"})
        for (int page_size : {1, 16})
          specs.push_back(fmt::format(
              R"({{"op": "batch_decode", "num_qo_heads": {}, "num_kv_heads": 2, "head_dim": {}, "page_size": {}, "dtype": "bfloat16", "kv_layout": "{}"}})",
              2 * group, head_dim, page_size, layout));
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 64, "dtype": "float16", "logits_soft_cap": 50, "sliding_window": 4096, "return_lse": false})");
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 40, "num_kv_heads": 8, "head_dim": 128, "page_size": 32, "dtype": "bfloat16"})");  // group 5
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 96, "num_kv_heads": 8, "head_dim": 128, "page_size": 16, "dtype": "bfloat16"})");  // group 12
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 128, "num_kv_heads": 4, "head_dim": 64, "page_size": 16, "dtype": "bfloat16"})");  // group 32
  // fp8 e4m3 KV, and K/V combined in one tensor.
  for (int head_dim : {64, 128, 256})
    for (int group : {1, 8, 16})
      for (const char* storage : {"separate", "combined"})
        specs.push_back(fmt::format(
            R"({{"op": "batch_decode", "num_qo_heads": {}, "num_kv_heads": 2, "head_dim": {}, "page_size": 16, "dtype": "bfloat16", "kv_dtype": "float8_e4m3", "kv_storage": "{}"}})",
            2 * group, head_dim, storage));
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 1, "dtype": "float16", "kv_layout": "HND", "kv_storage": "combined", "logits_soft_cap": 30})");
  // 16-bit KV at head_dim 64 and 128 takes tensor cores by default (above); the CUDA-core form.
  for (int head_dim : {64, 128})
    for (int group : {1, 4, 8, 16})
      for (int page_size : {1, 16})
        specs.push_back(fmt::format(
            R"({{"op": "batch_decode", "num_qo_heads": {}, "num_kv_heads": 2, "head_dim": {}, "page_size": {}, "dtype": "bfloat16", "tensor_cores": false}})",
            2 * group, head_dim, page_size));
  specs.push_back(R"({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 32, "dtype": "float16", "kv_layout": "HND", "kv_storage": "combined", "logits_soft_cap": 30, "sliding_window": 512, "return_lse": false, "tensor_cores": true})");
  for (const char* dtype : {"bfloat16", "float8_e4m3"})
    for (const char* storage : {"separate", "combined"})
      specs.push_back(fmt::format(R"({{"op": "append_paged_kv_cache", "num_kv_heads": 8, "head_dim": 64, "page_size": 16, "dtype": "{}", "kv_storage": "{}"}})",
                                  dtype, storage));
  for (const char* layout : {"NHD", "HND"})
    for (int page_size : {1, 16, 32, 64})
      specs.push_back(fmt::format(R"({{"op": "append_paged_kv_cache", "num_kv_heads": 8, "head_dim": 128, "page_size": {}, "dtype": "bfloat16", "kv_layout": "{}"}})",
                                  page_size, layout));
  for (const char* op : {"merge_state", "merge_states"})
    for (const char* dtype : {"float32", "float16", "bfloat16"})
      for (int head_dim : {64, 128, 256})
        specs.push_back(fmt::format(R"({{"op": "{}", "num_heads": 32, "head_dim": {}, "dtype": "{}"}})", op, head_dim, dtype));
  specs.push_back(R"({"op": "merge_states", "num_heads": 7, "head_dim": 256, "dtype": "float32", "out_dtype": "bfloat16"})");
  auto [built, failures] = build_all(specs);
  for (const auto& f : failures) FAIL_CHECK(f);
}

TEST_CASE("other archs compile, bad archs are refused", "[compile]") {
  kjit::Engine engine(memory_only());
  const std::string spec = R"({"op": "rmsnorm_fp8_quant", "hidden_size": 4096, "dtype": "bfloat16"})";
  for (const char* arch : {"sm_80", "sm_89", "sm_90a", "sm_100a"}) {
    INFO(arch);
    auto a = engine.build(spec, arch);
    CHECK(a.info.arch == arch);
    CHECK(a.cubin.size() > 1000);
  }
  CHECK(engine.build(spec, "sm_80").info.key != engine.build(spec, "sm_90a").info.key);
  CHECK_THROWS_WITH(engine.build(spec, "sm_75"), "arch \"sm_75\" is not supported: kjit targets sm_80 and newer");
  CHECK_THROWS_WITH(engine.build(spec, "hopper"), Contains("arch \"hopper\" is not an sm_XY[a] name"));
}

TEST_CASE("an NVRTC error shows the log and the generated source line", "[compile]") {
  const std::string source = "#include \"kjit/common.cuh\"\nextern \"C\" __global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n";
  try {
    kjit::compile::compile_cubin(source, "broken.cu", kjit::codegen::collect_headers(source),
                                 kjit::compile::compile_options("sm_90a"));
    FAIL("compiled");
  } catch (const kjit::CompileError& e) {
    std::string m = e.what();
    CHECK_THAT(m, Contains("NVRTC could not compile broken.cu"));
    CHECK_THAT(m, Contains("identifier \"undefined_name\" is undefined"));
    CHECK_THAT(m, Contains("--- broken.cu around line 3 ---"));
    CHECK_THAT(m, Contains(">    3 |   x[0] = undefined_name;"));
  }
}

TEST_CASE("ptxas' performance-loss notes are reported (serialized wgmma)", "[compile]") {
  // A wgmma issued on a divergent path: ptxas serializes the kernel's wgmma and says so.
  const std::string source = R"(#include "kjit/wgmma.cuh"
extern "C" __global__ void k(float* out, unsigned long long a, unsigned long long b, int n) {
  float d[8][4];
  for (int i = 0; i < 8; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = 0.f;
  for (int step = 0; step < n; ++step) {
    kjit::wgmma::fence();
    if (step % 3 == threadIdx.x / 128) kjit::wgmma::mma_shared<__nv_bfloat16, 64>(d, a, b + step, true);
    kjit::wgmma::commit();
    kjit::wgmma::wait<0>();
    kjit::wgmma::hold(d);
  }
  for (int i = 0; i < 8; ++i) out[threadIdx.x * 8 + i] = d[i][0] + d[i][1] + d[i][2] + d[i][3];
}
)";
  const kjit::compile::CompileResult r = kjit::compile::compile_cubin(
      source, "serialized.cu", kjit::codegen::collect_headers(source), kjit::compile::compile_options("sm_90a"));
  INFO(r.log);
  CHECK_THAT(r.performance_warnings, Contains("wgmma.mma_async instructions are serialized"));
  CHECK(kjit::compile::performance_warnings("ptxas info    : Used 168 registers").empty());
}

TEST_CASE("template overrides: template errors and compile errors point at their lines", "[compile][template]") {
  kjit::Engine engine(memory_only());
  const std::string spec = R"({"op": "rmsnorm", "hidden_size": 1024, "dtype": "float16"})";
  {
    TemplateOverride o("norm.cu.j2", "// ok\n{{ hidden_size }}\n{% if nope %}x{% endif %}\n");
    CHECK_THROWS_WITH(engine.render(spec), "norm.cu.j2:3:7: 'nope' is undefined");
  }
  {
    TemplateOverride o("norm.cu.j2", "#include \"kjit/norm.cuh\"\nextern \"C\" __global__ void {{ entry }}() {\n  int x = {{ hidden_size }} +;\n}\n");
    CHECK(engine.render(spec).find("int x = 1024 +;") != std::string::npos);
    try {
      engine.build(spec, "sm_90a");
      FAIL("compiled");
    } catch (const kjit::CompileError& e) {
      CHECK_THAT(e.what(), Contains(">    3 |   int x = 1024 +;"));
    }
  }
  // The override is gone: the embedded template is used again.
  CHECK(engine.render(spec).find("kjit::norm::RmsNorm") != std::string::npos);
}

TEST_CASE("every prefill variant in a representative grid compiles for sm_90a", "[compile][attention]") {
  std::vector<std::string> specs;
  for (int head_dim : {64, 128, 256})
    for (int group : {1, 4, 8})
      for (bool causal : {true, false})
        specs.push_back(fmt::format(
            R"({{"op": "batch_prefill", "num_qo_heads": {}, "num_kv_heads": 4, "head_dim": {}, "dtype": "bfloat16", "causal": {}}})",
            4 * group, head_dim, causal));
  specs.push_back(R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16", "logits_soft_cap": 50, "sliding_window": 4096, "return_lse": false})");
  for (int head_dim : {64, 128, 256})
    for (const char* layout : {"NHD", "HND"})
      specs.push_back(fmt::format(
          R"({{"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": {}, "dtype": "bfloat16", "paged": true, "page_size": 16, "kv_layout": "{}"}})",
          head_dim, layout));
  specs.push_back(R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "paged": true, "page_size": 16, "kv_storage": "combined"})");
  for (const char* pack : {"true", "false"})
    specs.push_back(fmt::format(R"({{"op": "batch_prefill", "num_qo_heads": 64, "num_kv_heads": 2, "head_dim": 128, "dtype": "bfloat16", "pack_gqa": {}}})", pack));
  // The warp-specialized form, every score option and K/V source.
  for (int head_dim : {64, 128})
    for (const char* more : {"", R"(, "causal": false, "pack_gqa": false)", R"(, "logits_soft_cap": 30, "sliding_window": 100)",
                             R"(, "paged": true, "page_size": 16, "kv_layout": "HND", "logits_soft_cap": 30, "sliding_window": 100)",
                             R"(, "paged": true, "page_size": 1, "kv_storage": "combined")",
                             R"(, "staged_output": true, "return_lse": false)",
                             R"(, "staged_output": true, "paged": true, "page_size": 64, "work_list": true, "pack_gqa": false)"})
      specs.push_back(fmt::format(
          R"({{"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": {}, "dtype": "float16", "warp_specialized": true{}}})",
          head_dim, more));
  // Both tensor-core forms (sm_90a's wgmma is the default), key tiles, warpgroups per block.
  for (const char* warpgroup_mma : {"true", "false"})
    for (int keys : {32, 64})
      for (int warpgroups : {1, 2})
        specs.push_back(fmt::format(
            R"({{"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "warpgroup_mma": {}, "keys_per_tile": {}, "warpgroups": {}}})",
            warpgroup_mma, keys, warpgroups));
  auto [built, failures] = build_all(specs);
  for (const auto& f : failures) FAIL_CHECK(f);
  // Without sm_90a the warp-specialized launch runs the mma.sync form on two warpgroups.
  kjit::Engine engine(memory_only());
  for (const char* arch : {"sm_80", "sm_90"}) {
    INFO(arch);
    auto a = engine.build(R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "paged": true, "page_size": 16, "warp_specialized": true})", arch);
    CHECK(a.info.stack_bytes == 0);
    CHECK(a.info.registers <= 168);
  }
}
