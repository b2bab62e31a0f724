#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <map>
#include <random>

#include "api/kernel_state.hpp"
#include "kjit/attention.hpp"
#include "kjit/kjit.hpp"
#include "runtime/driver.hpp"

using Catch::Contains;

namespace {
const std::string kSpec = R"({"op": "fused_add_rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})";

kjit::Kernel kernel_without_gpu() {
  kjit::EngineOptions o;
  o.disk_cache = false;
  kjit::Engine engine(o);
  kjit::Artifact a = engine.build(kSpec, "sm_90a");
  kjit::families::LaunchRule launch;
  launch.block[0] = 256;
  launch.grid[0] = {4, 1, 1};  // batch_size is parameter 4
  return kjit::Kernel(std::make_shared<kjit::detail::KernelState>(a.info, a.cubin, std::vector{launch}));
}

DLTensor tensor(std::vector<std::int64_t>& shape, kjit::DType dtype, void* data = reinterpret_cast<void*>(0x1000)) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCUDA, 0};
  t.ndim = static_cast<int>(shape.size());
  t.dtype = kjit::to_dlpack(dtype);
  t.shape = shape.data();
  return t;
}
}  // namespace

TEST_CASE("render and build need no GPU; get says what is missing", "[engine]") {
  kjit::EngineOptions o;
  o.disk_cache = false;
  kjit::Engine engine(o);
  CHECK_THAT(engine.render(kSpec), Contains("extern \"C\" __global__"));
  CHECK(engine.build(kSpec, "sm_90a").cubin.size() > 0);
  std::string why;
  if (!kjit::runtime::driver_available(&why)) {
    CHECK_THROWS_AS(engine.get(kSpec), kjit::UnavailableError);
    CHECK_THROWS_WITH(engine.get(kSpec), Contains("libcuda.so.1") || Contains("no GPU") || Contains("cuInit"));
    CHECK_THROWS_WITH(engine.build(kSpec), Contains("libcuda.so.1") || Contains("no GPU") || Contains("cuInit"));
  }
  // Engine options are validated when the engine is made.
  kjit::EngineOptions bad;
  bad.arch = "sm_7";
  CHECK_THROWS_AS(kjit::Engine(bad), kjit::SpecError);
}

TEST_CASE("launch checks arguments against the signature before touching the GPU", "[engine]") {
  kjit::Kernel k = kernel_without_gpu();
  REQUIRE(k.info().params.size() == 6);  // input, residual, weight, output, batch_size, eps
  std::vector<std::int64_t> rows{3, 4096}, weight_shape{4096}, wrong{3, 4095}, flat{3 * 4096};
  DLTensor x = tensor(rows, kjit::DType::bfloat16), r = tensor(rows, kjit::DType::bfloat16),
           w = tensor(weight_shape, kjit::DType::bfloat16), y = tensor(rows, kjit::DType::bfloat16);
  const void* p = reinterpret_cast<void*>(0x1000);
  std::string why_not;

  CHECK_THROWS_WITH(k.launch({p, p, p}), "kjit_fused_add_rmsnorm: expects 6 arguments, got 3");
  CHECK_THROWS_WITH(k.launch({p, p, p, p, 1.5, 1e-6}), "kjit_fused_add_rmsnorm: argument 4 (batch_size) expects an integer");
  CHECK_THROWS_WITH(k.launch({p, p, p, p, -1, 1e-6}), "kjit_fused_add_rmsnorm: argument 4 (batch_size) = -1 is out of range: allowed [0, inf]");
  CHECK_THROWS_WITH(k.launch({p, p, 7, p, 3, 1e-6}), "kjit_fused_add_rmsnorm: argument 2 (weight) expects a device pointer or a DLTensor");
  CHECK_THROWS_WITH(k.launch({p, p, p, p, 3, p}), "kjit_fused_add_rmsnorm: argument 5 (eps) expects a number");

  DLTensor fp16 = tensor(rows, kjit::DType::float16);
  CHECK_THROWS_WITH(k.launch({x, r, w, fp16, 3, 1e-6}),
                    "kjit_fused_add_rmsnorm: argument 3 (output) expects dtype bfloat16, got (code 2, bits 16, lanes 1)");
  DLTensor bad_dim = tensor(wrong, kjit::DType::bfloat16);
  CHECK_THROWS_WITH(k.launch({x, bad_dim, w, y, 3, 1e-6}),
                    "kjit_fused_add_rmsnorm: argument 1 (residual) dim 1 (4096) must be 4096, got 4095");
  CHECK_THROWS_WITH(k.launch({x, r, w, y, 5, 1e-6}),
                    "kjit_fused_add_rmsnorm: argument 0 (input) dim 0 (batch_size) must be 5, got 3");
  DLTensor bad_rank = tensor(flat, kjit::DType::bfloat16);
  CHECK_THROWS_WITH(k.launch({bad_rank, r, w, y, 3, 1e-6}), "kjit_fused_add_rmsnorm: argument 0 (input) expects rank 2, got 1");
  DLTensor on_cpu = x;
  on_cpu.device = {kDLCPU, 0};
  CHECK_THROWS_WITH(k.launch({on_cpu, r, w, y, 3, 1e-6}), Contains("argument 0 (input) must be on a CUDA device"));
  std::vector<std::int64_t> strides{1, 3};
  DLTensor transposed = x;
  transposed.strides = strides.data();
  CHECK_THROWS_WITH(k.launch({transposed, r, w, y, 3, 1e-6}), Contains("argument 0 (input) must be contiguous"));

  // An address the kernel's 16-byte vectors cannot use, given as a pointer or through a
  // DLTensor's byte offset (a slice of a larger tensor).
  const void* odd = reinterpret_cast<void*>(0x1002);
  CHECK_THROWS_WITH(k.launch({odd, p, p, p, 3, 1e-6}),
                    "kjit_fused_add_rmsnorm: argument 0 (input) at address 0x1002 must be 16-byte aligned");
  DLTensor shifted = y;
  shifted.byte_offset = 8;
  CHECK_THROWS_WITH(k.launch({x, r, w, shifted, 3, 1e-6}), Contains("argument 3 (output) at address 0x1008 must be 16-byte aligned"));
  shifted.byte_offset = 32;
  if (!kjit::runtime::driver_available(&why_not))
    CHECK_THROWS_AS(k.launch({x, r, w, shifted, 3, 1e-6}), kjit::UnavailableError);  // aligned: reaches the driver

  // Zero rows: nothing to launch, so no GPU is needed and nothing fails.
  std::vector<std::int64_t> empty{0, 4096};
  DLTensor e = tensor(empty, kjit::DType::bfloat16);
  CHECK_NOTHROW(k.launch({e, e, w, e, 0, 1e-6}));
  // Valid arguments reach the driver, which is absent here.
  if (!kjit::runtime::driver_available(&why_not)) CHECK_THROWS_AS(k.launch({x, r, w, y, 3, 1e-6}), kjit::UnavailableError);
  CHECK_THROWS_AS(kjit::Kernel().launch({}), kjit::ArgumentError);
}

TEST_CASE("tensor maps: the view's extents and strides, known or not", "[engine]") {
  using kjit::detail::tensor_map_geometry;
  // Ragged k [1000 tokens, 8 heads, 128] bf16 as (dim, head, row).
  auto g = tensor_map_geometry({128, 8, 0}, 2, 1000 * 8 * 128);
  REQUIRE(g.rank == 3);
  CHECK((g.dims[0] == 128 && g.dims[1] == 8 && g.dims[2] == 1000));
  CHECK((g.strides[0] == 256 && g.strides[1] == 2048));
  // HND pages [40 pages, 8 heads, 64 slots, 128] as (dim, 1, row): a row per head's slot.
  g = tensor_map_geometry({128, 1, 0}, 2, 40 * 8 * 64 * 128);
  CHECK((g.dims[1] == 1 && g.dims[2] == 40 * 8 * 64 && g.strides[1] == 256));
  // A pointer argument: rows as far as 47-bit addresses allow, at most 2^31.
  g = tensor_map_geometry({128, 8, 0}, 2, -1);
  CHECK(g.dims[2] == 1ull << 31);
  g = tensor_map_geometry({1 << 20, 1 << 10, 0}, 4, -1);
  CHECK(g.dims[2] == (1ull << 47) / (4ull << 30));
  // An empty tensor still maps one row (TMA refuses 0); no box is read.
  CHECK(tensor_map_geometry({128, 8, 0}, 2, 0).dims[2] == 1);
}

TEST_CASE("dtype names", "[engine]") {
  CHECK(kjit::parse_dtype("bfloat16") == kjit::DType::bfloat16);
  CHECK(kjit::parse_dtype("float8_e4m3fn") == kjit::DType::float8_e4m3);
  CHECK(kjit::parse_dtype("half") == kjit::DType::float16);
  CHECK_FALSE(kjit::parse_dtype("float128"));
  for (auto d : {kjit::DType::float16, kjit::DType::bfloat16, kjit::DType::float32, kjit::DType::float8_e4m3, kjit::DType::int64})
    CHECK(kjit::parse_dtype(kjit::dtype_name(d)) == d);
  CHECK(kjit::dtype_size(kjit::DType::bfloat16) == 2);
}

TEST_CASE("decode plans split long KV only where the batch leaves the GPU idle", "[engine][attention]") {
  auto chunks = [](std::int64_t batch, std::int64_t len, std::int64_t blocks_per_request) {
    std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), len);
    const kjit::DecodePlan p = kjit::plan_decode_split(lengths, blocks_per_request, 32, 128, 132);
    CHECK(p.num_chunks * p.chunk_size >= len);  // the chunks cover every token
    if (p.num_chunks > 1) CHECK(p.workspace_bytes >= static_cast<std::size_t>(batch * p.num_chunks * 32 * 129 * 4));
    return p.num_chunks;
  };
  CHECK(chunks(64, 4096, 8) == 3);     // 512 blocks would be 1.3 waves of 396
  CHECK(chunks(1, 32768, 8) == 49);    // one request: 392 blocks of ~670 tokens, one wave
  CHECK(chunks(256, 1024, 8) == 2);
  CHECK(chunks(1, 300, 8) == 1);       // too short to split
  CHECK(chunks(396, 4096, 1) == 1);    // exactly one full wave
  CHECK(chunks(0, 0, 8) == 1);         // an empty batch

  // Four blocks per SM (two pipeline stages): batch 64 fits one wave of 528 unsplit.
  auto chunks4 = [](std::int64_t batch, std::int64_t len) {
    std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), len);
    return kjit::plan_decode_split(lengths, 8, 32, 128, 132, 4).num_chunks;
  };
  CHECK(chunks4(64, 4096) == 1);
  CHECK(chunks4(256, 1024) == 1);
  CHECK(chunks4(1, 32768) == 66);  // the most chunks that fit one wave (528 of 528)

  // Two blocks per SM (what BatchDecode aims to fill with 16-bit KV): 264 slots.
  auto chunks2 = [](std::int64_t batch, std::int64_t len) {
    std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), len);
    return kjit::plan_decode_split(lengths, 8, 32, 128, 132, 2).num_chunks;
  };
  CHECK(chunks2(1, 32768) == 33);  // 264 of 264 slots
  CHECK(chunks2(7, 32768) == 9);   // one wave would be 224 of 264 (85%): two waves of 252, 95%
  CHECK(chunks2(3, 100000) == 11); // 264 of 264
  CHECK(chunks2(8, 8192) == 4);    // 256 blocks
  CHECK(chunks2(32, 4096) == 1);
  CHECK(chunks2(64, 4096) == 1);   // 512 blocks: two waves, 97% full
}

TEST_CASE("prefill work lists queue every item once, longest first", "[engine][attention]") {
  kjit::EngineOptions o;
  o.disk_cache = false;
  kjit::Engine engine(o);
  const std::string spec = R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "work_list": true)";
  const kjit::KernelInfo ragged = engine.build(spec + "}", "sm_90a").info;
  // The list against the kernel's items (32 queries x 4 heads an item, 128-key tiles): the
  // header [items, next 0, finished 0], each (tile, request, KV head) with rows exactly
  // once, the kernel's groups of requests whose K/V fit 16 MB of L2 in turn, and within a
  // group no item after a longer one, length in half tiles: its K/V tiles, one half less
  // where its last tile is half-width (no row sees past its first 64 keys).
  auto check_list = [](const std::vector<std::int32_t>& list, const std::vector<std::int32_t>& qo_indptr,
                       const std::vector<std::int64_t>& kv_len) {
    std::int64_t keys = 0;
    for (std::int64_t n : kv_len) keys += n;
    const auto batch_keys = static_cast<std::int64_t>(kv_len.size());
    const std::int64_t request_bytes = std::max<std::int64_t>(1, keys / std::max<std::int64_t>(batch_keys, 1) * 8 * 128 * 4);
    const std::int64_t per_group = std::max<std::int64_t>(1, (std::int64_t{16} << 20) / request_bytes);
    const auto batch = static_cast<std::int64_t>(qo_indptr.size()) - 1;
    REQUIRE(list.size() >= 3);
    CHECK(list[0] == static_cast<std::int32_t>(list.size() - 3));
    CHECK(list[1] == 0);
    CHECK(list[2] == 0);
    std::map<std::int32_t, int> seen;
    std::int64_t previous = std::numeric_limits<std::int64_t>::max(), previous_group = 0;
    for (std::size_t i = 3; i < list.size(); ++i) {
      const std::int32_t item = list[i];
      ++seen[item];
      const std::int64_t b = item / 8 % batch, tile = item / 8 / batch;
      const std::int64_t qo = qo_indptr[b + 1] - qo_indptr[b], last_query = std::min(tile * 32 + 32, qo) - 1;
      const std::int64_t key_end = std::max<std::int64_t>(0, std::min(kv_len[b], last_query + kv_len[b] - qo + 1));
      const std::int64_t tiles = (key_end + 127) / 128;
      const bool half_width = tiles > 0 && key_end - (tiles - 1) * 128 <= 64;
      const std::int64_t halves = 2 * tiles - (half_width ? 1 : 0);
      const std::int64_t group = b / per_group;
      CHECK(group >= previous_group);
      if (group == previous_group) CHECK(halves <= previous);
      previous = halves, previous_group = group;
    }
    std::int64_t with_rows = 0;
    for (std::int64_t b = 0; b < batch; ++b) with_rows += 8 * ((qo_indptr[b + 1] - qo_indptr[b] + 31) / 32);
    CHECK(static_cast<std::int64_t>(seen.size()) == with_rows);
    for (const auto& [item, count] : seen) CHECK(count == 1);
  };
  // Causal 8 x 1024 and 4 x 2048 (groups of 4 and 2 requests).
  std::vector<std::int32_t> qo{0}, kv{0};
  for (int b = 0; b < 8; ++b) qo.push_back(qo.back() + 1024), kv.push_back(kv.back() + 1024);
  check_list(kjit::plan_prefill_work(ragged, qo, kv), qo, std::vector<std::int64_t>(8, 1024));
  std::vector<std::int32_t> qo4{0}, kv4{0};
  for (int b = 0; b < 4; ++b) qo4.push_back(qo4.back() + 2048), kv4.push_back(kv4.back() + 2048);
  check_list(kjit::plan_prefill_work(ragged, qo4, kv4), qo4, std::vector<std::int64_t>(4, 2048));
  // Ragged lengths with empty requests and more keys than queries.
  const std::vector<std::int32_t> mixed_qo{0, 5, 5, 300, 301}, mixed_kv{0, 5, 40, 1000, 1001};
  check_list(kjit::plan_prefill_work(ragged, mixed_qo, mixed_kv), mixed_qo, {5, 35, 960, 1});
  // No queries at all: an empty queue.
  CHECK(kjit::plan_prefill_work(ragged, std::vector<std::int32_t>{0, 0, 0}, std::vector<std::int32_t>{0, 3, 9}) ==
        std::vector<std::int32_t>{0, 0, 0});
  // Paged: lengths from the pages and the last page's length.
  const kjit::KernelInfo paged = engine.build(spec + R"(, "paged": true, "page_size": 16})", "sm_90a").info;
  const std::vector<std::int32_t> paged_qo{0, 20, 20, 40}, pages{0, 2, 2, 5}, last{16, 1, 3}, bad_last{16, 1, 17}, short_qo{0, 20};
  check_list(kjit::plan_prefill_work(paged, paged_qo, pages, last), paged_qo, {32, 0, 35});
  CHECK_THROWS_AS(kjit::plan_prefill_work(paged, paged_qo, pages, bad_last), kjit::ArgumentError);  // past the page
  CHECK_THROWS_AS(kjit::plan_prefill_work(paged, short_qo, pages, last), kjit::ArgumentError);      // batch sizes differ
  // Other item shapes, as the family plans them: one head per item (128 queries), and a
  // group of 5 packed (128 (query, head) rows an item: ceil(5 x queries / 128) items with
  // rows per KV head and request).
  auto item_count = [](const std::vector<std::int32_t>& list) { return list[0]; };
  const std::vector<std::int32_t> odd_qo{0, 300, 301, 301, 556}, odd_kv{0, 300, 1000, 1000, 1255};
  const kjit::KernelInfo one_head = engine.build(spec + R"(, "pack_gqa": false})", "sm_90a").info;
  CHECK(item_count(kjit::plan_prefill_work(one_head, odd_qo, odd_kv)) == 32 * (3 + 1 + 0 + 2));
  const kjit::KernelInfo five = engine.build(
      R"({"op": "batch_prefill", "num_qo_heads": 40, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "work_list": true})",
      "sm_90a").info;
  CHECK(item_count(kjit::plan_prefill_work(five, odd_qo, odd_kv)) == 8 * (12 + 1 + 0 + 10));
  // Only for specs that take the list.
  const kjit::KernelInfo unlisted =
      engine.build(R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"})", "sm_90a").info;
  CHECK_THROWS_AS(kjit::plan_prefill_work(unlisted, qo, kv), kjit::ArgumentError);
  CHECK_THROWS_AS(kjit::PrefillWorkPlanner(unlisted), kjit::ArgumentError);

  // A planner built once gives each batch the one-shot function's list, in any order of use.
  const kjit::PrefillWorkPlanner ragged_planner(ragged), paged_planner(paged), five_planner(five);
  for (int round = 0; round < 2; ++round) {
    CHECK(ragged_planner.plan(qo, kv) == kjit::plan_prefill_work(ragged, qo, kv));
    CHECK(ragged_planner.plan(odd_qo, odd_kv) == kjit::plan_prefill_work(ragged, odd_qo, odd_kv));
    CHECK(paged_planner.plan(paged_qo, pages, last) == kjit::plan_prefill_work(paged, paged_qo, pages, last));
    CHECK(five_planner.plan(odd_qo, odd_kv) == kjit::plan_prefill_work(five, odd_qo, odd_kv));
  }
  // The size without planning (what the C ABI answers a size query with).
  CHECK(ragged_planner.list_size(qo) == ragged_planner.plan(qo, kv).size());
  CHECK(ragged_planner.list_size(odd_qo) == ragged_planner.plan(odd_qo, odd_kv).size());
  CHECK(paged_planner.list_size(paged_qo) == paged_planner.plan(paged_qo, pages, last).size());
  CHECK(five_planner.list_size(odd_qo) == five_planner.plan(odd_qo, odd_kv).size());
  CHECK(kjit::PrefillWorkPlanner(one_head).list_size(odd_qo) == kjit::plan_prefill_work(one_head, odd_qo, odd_kv).size());
  CHECK_THROWS_AS(ragged_planner.list_size(std::vector<std::int32_t>{0, 5, 3}), kjit::ArgumentError);
  std::mt19937 rng(5);
  for (int trial = 0; trial < 50; ++trial) {  // random batches with empty requests and longer caches
    std::vector<std::int32_t> random_qo{0}, random_kv{0};
    std::vector<std::int64_t> random_kv_len;
    for (std::uint32_t b = 0, n = 1 + rng() % 20; b < n; ++b) {
      const std::int32_t queries = rng() % 3 == 0 ? 0 : static_cast<std::int32_t>(rng() % 700);
      const auto keys = queries + static_cast<std::int32_t>(rng() % 300);
      random_qo.push_back(random_qo.back() + queries);
      random_kv.push_back(random_kv.back() + keys);
      random_kv_len.push_back(keys);
    }
    const std::vector<std::int32_t> list = ragged_planner.plan(random_qo, random_kv);
    CHECK(ragged_planner.list_size(random_qo) == list.size());
    CHECK(five_planner.list_size(random_qo) == five_planner.plan(random_qo, random_kv).size());
    check_list(list, random_qo, random_kv_len);
  }
  CHECK_THROWS_AS(paged_planner.plan(paged_qo, pages, bad_last), kjit::ArgumentError);
}
