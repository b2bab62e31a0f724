// Attention kernels against a float64 reference computed directly from the page
// table: batch decode (plan/run and forced KV splits), page append, merge_state(s).
// Outputs are poisoned (NaN) first, so an unwritten element fails.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>

#include <fmt/format.h>

#include "kjit/attention.hpp"
#include "kjit/kjit.hpp"
#include "reference.hpp"
#include "runtime/device_memory.hpp"

using kjit::runtime::DeviceMemory;
using namespace kjit::test;

namespace {

kjit::Engine& engine() {
  static kjit::Engine instance;
  return instance;
}

// An engine compiling for another arch the device runs (sm_90 on an H100: the forms
// without sm_90a's wgmma).
kjit::Engine& engine_for_arch(const std::string& arch) {
  static std::map<std::string, std::unique_ptr<kjit::Engine>> engines;
  auto& e = engines[arch];
  if (!e) {
    kjit::EngineOptions options;
    options.arch = arch;
    e = std::make_unique<kjit::Engine>(options);
  }
  return *e;
}

void synchronize() { kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "attention kernel"); }

// 16-bit storage of either float type.
struct Half16 {
  bool bf16;
  std::uint16_t encode(float x) const { return bf16 ? float_to_bf16(x) : float_to_half(x); }
  float decode(std::uint16_t h) const { return bf16 ? bf16_to_float(h) : half_to_float(h); }
};

template <class T>
DeviceMemory to_device(const std::vector<T>& host) {
  DeviceMemory d(std::max<std::size_t>(host.size() * sizeof(T), 1));
  if (!host.empty()) d.upload(host.data());
  return d;
}

// The score options both spec kinds share, as spec text.
std::string score_options(bool return_lse, double soft_cap, std::int64_t window) {
  std::string s = fmt::format(R"(, "return_lse": {})", return_lse);
  if (soft_cap > 0) s += fmt::format(R"(, "logits_soft_cap": {})", soft_cap);
  if (window > 0) s += fmt::format(R"(, "sliding_window": {})", window);
  return s + "}";
}

struct DecodeCase {
  std::int64_t qo_heads, kv_heads, head_dim, page_size;
  std::string layout = "NHD";
  bool bf16 = true;
  double soft_cap = 0;
  std::int64_t window = 0;
  bool return_lse = true;
  bool fp8_kv = false;    // KV cache in fp8 e4m3 with scales
  bool combined = false;  // K and V in one [pages, 2, ...] tensor
  std::optional<bool> tensor_cores;  // the spec's default when unset

  std::string spec() const {
    return fmt::format(
               R"({{"op": "batch_decode", "num_qo_heads": {}, "num_kv_heads": {}, "head_dim": {}, "page_size": {}, "dtype": "{}", "kv_layout": "{}", "kv_dtype": "{}", "kv_storage": "{}"{})",
               qo_heads, kv_heads, head_dim, page_size, bf16 ? "bfloat16" : "float16", layout,
               fp8_kv ? "float8_e4m3" : bf16 ? "bfloat16" : "float16", combined ? "combined" : "separate",
               tensor_cores ? fmt::format(R"(, "tensor_cores": {})", *tensor_cores) : "") +
           score_options(return_lse, soft_cap, window);
  }
  DecodeCase on_cuda_cores() const {
    DecodeCase c = *this;
    c.tensor_cores = false;
    return c;
  }
};

// K and V pages interleaved into one [pages, 2, page elements] tensor.
template <class T>
std::vector<T> combine_pages(const std::vector<T>& k, const std::vector<T>& v, std::int64_t page_elements) {
  std::vector<T> kv(k.size() * 2);
  for (std::size_t page = 0; page * static_cast<std::size_t>(page_elements) < k.size(); ++page) {
    const std::size_t n = static_cast<std::size_t>(page_elements), from = page * n;
    std::copy_n(&k[from], n, &kv[2 * from]);
    std::copy_n(&v[from], n, &kv[2 * from + n]);
  }
  return kv;
}

// A paged cache holding `lengths` tokens per request, pages shuffled, plus unused pages.
struct PagedBatch {
  std::vector<std::int32_t> indptr{0}, indices, last_page_len;
  std::int64_t num_pages = 0;
  std::vector<std::uint16_t> k, v, q;  // 16-bit storage
  std::vector<std::uint8_t> k8, v8;    // fp8 KV: e4m3 codes of k / k_scale, v / v_scale
  double k_scale = 1, v_scale = 1;

  // The key / value element the kernel sees (dequantized for fp8).
  double key(const DecodeCase& c, std::int64_t at) const {
    return c.fp8_kv ? e4m3_to_double(k8[static_cast<std::size_t>(at)]) * k_scale : Half16{c.bf16}.decode(k[static_cast<std::size_t>(at)]);
  }
  double value(const DecodeCase& c, std::int64_t at) const {
    return c.fp8_kv ? e4m3_to_double(v8[static_cast<std::size_t>(at)]) * v_scale : Half16{c.bf16}.decode(v[static_cast<std::size_t>(at)]);
  }

  // Element offset of (page, slot, head) in the cache, as the kernels lay it out.
  std::int64_t offset(const DecodeCase& c, std::int64_t page, std::int64_t slot, std::int64_t head) const {
    if (c.layout == "NHD") return ((page * c.page_size + slot) * c.kv_heads + head) * c.head_dim;
    return ((page * c.kv_heads + head) * c.page_size + slot) * c.head_dim;
  }
  std::int64_t token_offset(const DecodeCase& c, std::int64_t b, std::int64_t t, std::int64_t head) const {
    return offset(c, indices[static_cast<std::size_t>(indptr[static_cast<std::size_t>(b)] + t / c.page_size)], t % c.page_size, head);
  }
};

PagedBatch make_batch(const DecodeCase& c, const std::vector<std::int64_t>& lengths, std::mt19937_64& rng) {
  PagedBatch p;
  std::int64_t pages = 0;
  for (std::int64_t len : lengths) {
    const std::int64_t n = (len + c.page_size - 1) / c.page_size;
    pages += n;
    p.indptr.push_back(static_cast<std::int32_t>(pages));
    p.last_page_len.push_back(static_cast<std::int32_t>(n ? len - (n - 1) * c.page_size : 0));
  }
  p.num_pages = pages + 3;  // pages no request owns: never read
  std::vector<std::int32_t> ids(static_cast<std::size_t>(p.num_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  p.indices.assign(ids.begin(), ids.begin() + pages);
  const Half16 h{c.bf16};
  std::normal_distribution<float> normal;
  const auto cache_elements = static_cast<std::size_t>(p.num_pages * c.page_size * c.kv_heads * c.head_dim);
  p.k.resize(cache_elements);
  p.v.resize(cache_elements);
  for (auto& x : p.k) x = h.encode(normal(rng));
  for (auto& x : p.v) x = h.encode(normal(rng));
  p.q.resize(lengths.size() * static_cast<std::size_t>(c.qo_heads * c.head_dim));
  for (auto& x : p.q) x = h.encode(normal(rng));
  if (c.fp8_kv) {  // scales that are not powers of two, so a missing or swapped one shows
    p.k_scale = 0.37;
    p.v_scale = 0.61;
    for (std::size_t i = 0; i < p.k.size(); ++i) {
      p.k8.push_back(double_to_e4m3(h.decode(p.k[i]) / p.k_scale));
      p.v8.push_back(double_to_e4m3(h.decode(p.v[i]) / p.v_scale));
    }
  }
  return p;
}

struct Reference {
  std::vector<double> o, lse;  // [batch, head, dim], [batch, head] (base 2)
};

// The score of a q.k product: scaled, then soft-capped when the case has a cap.
double score(double dot, double sm_scale, double soft_cap) {
  const double x = dot * sm_scale;
  return soft_cap > 0 ? soft_cap * std::tanh(x / soft_cap) : x;
}

// Scores (not empty) -> softmax weights in place; returns the base-2 log-sum-exp.
double softmax_in_place(std::vector<double>& s) {
  const double m = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (double x : s) sum += std::exp(x - m);
  for (double& x : s) x = std::exp(x - m) / sum;
  return (m + std::log(sum)) / std::log(2.0);
}

Reference reference_decode(const DecodeCase& c, const PagedBatch& p, std::int64_t batch, double sm_scale) {
  const Half16 h{c.bf16};
  Reference r;
  r.o.assign(static_cast<std::size_t>(batch * c.qo_heads * c.head_dim), 0.0);
  r.lse.assign(static_cast<std::size_t>(batch * c.qo_heads), -INFINITY);
  const std::int64_t group = c.qo_heads / c.kv_heads;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t pages = p.indptr[static_cast<std::size_t>(b + 1)] - p.indptr[static_cast<std::size_t>(b)];
    const std::int64_t len = pages ? (pages - 1) * c.page_size + p.last_page_len[static_cast<std::size_t>(b)] : 0;
    const std::int64_t begin = c.window > 0 ? std::max<std::int64_t>(0, len - c.window) : 0;
    for (std::int64_t hq = 0; hq < c.qo_heads; ++hq) {
      const std::int64_t hk = hq / group;
      const std::uint16_t* q = &p.q[static_cast<std::size_t>((b * c.qo_heads + hq) * c.head_dim)];
      std::vector<double> s;
      for (std::int64_t t = begin; t < len; ++t) {
        const std::int64_t at = p.token_offset(c, b, t, hk);
        double dot = 0;
        for (std::int64_t d = 0; d < c.head_dim; ++d) dot += double(h.decode(q[d])) * p.key(c, at + d);
        s.push_back(score(dot, sm_scale, c.soft_cap));
      }
      if (s.empty()) continue;
      r.lse[static_cast<std::size_t>(b * c.qo_heads + hq)] = softmax_in_place(s);
      double* o = &r.o[static_cast<std::size_t>((b * c.qo_heads + hq) * c.head_dim)];
      for (std::int64_t t = begin; t < len; ++t) {
        const double w = s[static_cast<std::size_t>(t - begin)];
        const std::int64_t at = p.token_offset(c, b, t, hk);
        for (std::int64_t d = 0; d < c.head_dim; ++d) o[d] += w * p.value(c, at + d);
      }
    }
  }
  return r;
}

// Output (16-bit: bf16 or fp16) and lse against the reference: relative L2 error and
// max-abs bounds suited to the output type.
void check_against(bool bf16, const Reference& ref, const std::vector<std::uint16_t>& out, const std::vector<float>* lse,
                   const std::string& what) {
  const Half16 h{bf16};
  double err2 = 0, ref2 = 0, max_abs = 0;
  for (std::size_t i = 0; i < ref.o.size(); ++i) {
    const double got = h.decode(out[i]);
    REQUIRE_FALSE(std::isnan(got));  // every element written
    err2 += (got - ref.o[i]) * (got - ref.o[i]);
    ref2 += ref.o[i] * ref.o[i];
    max_abs = std::max(max_abs, std::fabs(got - ref.o[i]));
  }
  INFO(what << ": |o - ref| / |ref| = " << std::sqrt(err2 / std::max(ref2, 1e-30)) << ", max abs " << max_abs);
  CHECK(std::sqrt(err2) <= (bf16 ? 8e-3 : 2e-3) * std::sqrt(ref2) + 1e-6);
  CHECK(max_abs <= (bf16 ? 2e-2 : 4e-3));
  if (!lse) return;
  double lse_err = 0;
  for (std::size_t i = 0; i < ref.lse.size(); ++i) {
    const double want = ref.lse[i], got = (*lse)[i];
    if (std::isinf(want)) {
      CHECK((std::isinf(got) && got < 0));
      continue;
    }
    lse_err = std::max(lse_err, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
  }
  INFO(what << ": max lse error " << lse_err);
  CHECK(lse_err <= 1e-4);
}

// The cache as the spec stores it: 16-bit or fp8, separate or combined (then in k; v unused).
DeviceMemory cache_on_device(const DecodeCase& c, const PagedBatch& p, bool values) {
  const std::int64_t page_elements = c.page_size * c.kv_heads * c.head_dim;
  if (c.combined && values) return DeviceMemory(1);
  if (c.fp8_kv) return c.combined ? to_device(combine_pages(p.k8, p.v8, page_elements)) : to_device(values ? p.v8 : p.k8);
  return c.combined ? to_device(combine_pages(p.k, p.v, page_elements)) : to_device(values ? p.v : p.k);
}

struct DeviceBatch {
  DeviceMemory q, k, v, indptr, indices, last, out, lse;
  DeviceBatch(const DecodeCase& c, const PagedBatch& p, std::int64_t batch)
      : q(to_device(p.q)), k(cache_on_device(c, p, false)), v(cache_on_device(c, p, true)), indptr(to_device(p.indptr)), indices(to_device(p.indices)),
        last(to_device(p.last_page_len)), out(std::max<std::size_t>(static_cast<std::size_t>(batch * c.qo_heads * c.head_dim) * 2, 2)),
        lse(std::max<std::size_t>(static_cast<std::size_t>(batch * c.qo_heads) * 4, 4)) {}
  void poison() {
    out.fill(0xff);
    lse.fill(0xff);
  }
};

// Runs a case through BatchDecode (its own plan), and with a forced split into
// `forced_chunks` chunks (the plan's override); checks both.
void run_decode_case(const DecodeCase& c, const std::vector<std::int64_t>& lengths, std::mt19937_64& rng, int forced_chunks = 3) {
  const auto batch = static_cast<std::int64_t>(lengths.size());
  PagedBatch p = make_batch(c, lengths, rng);
  const double sm_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const Reference ref = reference_decode(c, p, batch, sm_scale);
  DeviceBatch d(c, p, batch);
  kjit::BatchDecode decode(engine(), c.spec());
  const std::string what = fmt::format("{} lengths[0..] {}{}", c.spec(), lengths[0], lengths.size() > 1 ? ",..." : "");

  d.poison();
  const kjit::DecodePlan plan = decode.plan(p.indptr, p.last_page_len);
  DeviceMemory workspace(std::max<std::size_t>(plan.workspace_bytes, 1));
  const void* v_cache = c.combined ? nullptr : d.v.get();
  const auto k_scale = static_cast<float>(p.k_scale), v_scale = static_cast<float>(p.v_scale);
  decode.run(plan, {d.q.get(), d.k.get(), v_cache, static_cast<const std::int32_t*>(d.indptr.get()),
                    static_cast<const std::int32_t*>(d.indices.get()), static_cast<const std::int32_t*>(d.last.get()),
                    d.out.get(), c.return_lse ? static_cast<float*>(d.lse.get()) : nullptr, workspace.get(), k_scale, v_scale},
             sm_scale);
  synchronize();
  std::vector<float> lse = d.lse.download_as<float>();
  check_against(c.bf16, ref, d.out.download_as<std::uint16_t>(), c.return_lse ? &lse : nullptr,
                what + fmt::format(" (plan: {} chunks of {})", plan.num_chunks, plan.chunk_size));

  // A forced split: chunks of ceil(longest / forced_chunks) tokens, merged, on a workspace
  // of arbitrary contents.
  const kjit::DecodePlan split = decode.plan(p.indptr, p.last_page_len, forced_chunks);
  REQUIRE(split.num_chunks == forced_chunks);
  DeviceMemory split_workspace(split.workspace_bytes);
  split_workspace.fill(0x35);
  d.poison();
  decode.run(split, {d.q.get(), d.k.get(), v_cache, static_cast<const std::int32_t*>(d.indptr.get()),
                     static_cast<const std::int32_t*>(d.indices.get()), static_cast<const std::int32_t*>(d.last.get()),
                     d.out.get(), c.return_lse ? static_cast<float*>(d.lse.get()) : nullptr, split_workspace.get(), k_scale,
                     v_scale},
             sm_scale);
  synchronize();
  lse = d.lse.download_as<float>();
  check_against(c.bf16, ref, d.out.download_as<std::uint16_t>(), c.return_lse ? &lse : nullptr,
                what + fmt::format(" (forced split: {} chunks of {})", forced_chunks, split.chunk_size));
}

// Split decodes queued back to back on one workspace, each with its own queries and
// output, no synchronization between them: a decode that wrote the workspace while the
// previous split's merge still read it (say, launched to overlap that merge without waiting
// for it) would corrupt the earlier outputs.
void run_back_to_back(const DecodeCase& c, const std::vector<std::int64_t>& lengths, std::mt19937_64& rng, int chunks,
                      int runs) {
  const auto batch = static_cast<std::int64_t>(lengths.size());
  PagedBatch p = make_batch(c, lengths, rng);
  const double sm_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const Half16 h{c.bf16};
  std::normal_distribution<float> normal;
  std::vector<std::vector<std::uint16_t>> queries;
  std::vector<DeviceMemory> q, out;
  for (int r = 0; r < runs; ++r) {
    for (auto& x : p.q) x = h.encode(normal(rng));
    queries.push_back(p.q);
    q.push_back(to_device(p.q));
    out.emplace_back(static_cast<std::size_t>(batch * c.qo_heads * c.head_dim) * 2);
    out.back().fill(0xff);
  }
  DeviceBatch d(c, p, batch);
  kjit::BatchDecode decode(engine(), c.spec());
  const kjit::DecodePlan split = decode.plan(p.indptr, p.last_page_len, chunks);
  DeviceMemory workspace(split.workspace_bytes);
  for (int r = 0; r < runs; ++r)
    decode.run(split, {q[r].get(), d.k.get(), d.v.get(), static_cast<const std::int32_t*>(d.indptr.get()),
                       static_cast<const std::int32_t*>(d.indices.get()), static_cast<const std::int32_t*>(d.last.get()),
                       out[r].get(), nullptr, workspace.get(), 1.f, 1.f},
               sm_scale);
  synchronize();
  for (int r = 0; r < runs; ++r) {
    p.q = queries[static_cast<std::size_t>(r)];
    check_against(c.bf16, reference_decode(c, p, batch, sm_scale), out[static_cast<std::size_t>(r)].download_as<std::uint16_t>(),
                  nullptr, fmt::format("{} back to back, run {} of {} ({} chunks)", c.spec(), r + 1, runs, chunks));
  }
}

// Batch 37 (empty requests, lengths around page boundaries, a long one) at every group
// size, layout and page size of these head dims, in the given form (unset: the spec's default).
void run_decode_grid(std::initializer_list<std::int64_t> head_dims, std::optional<bool> tensor_cores, std::mt19937_64& rng) {
  std::vector<std::int64_t> lengths = {0, 1, 15, 16, 17, 1000, 0, 33, 64, 65, 2, 300};
  while (lengths.size() < 37) lengths.push_back(static_cast<std::int64_t>(rng() % 700));
  for (std::int64_t head_dim : head_dims)
    for (std::int64_t group : {1, 4, 8, 16})
      for (const char* layout : {"NHD", "HND"})
        for (std::int64_t page_size : {1, 16, 32, 64}) {
          DecodeCase c{2 * group, 2, head_dim, page_size, layout};
          c.tensor_cores = tensor_cores;
          run_decode_case(c, lengths, rng);
        }
}

}  // namespace

TEST_CASE("batch decode matches float64 attention over the page table", "[gpu][attention]") {
  std::random_device device;
  const std::uint64_t seed = (std::uint64_t{device()} << 32) | device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  run_decode_grid({64, 128, 256}, std::nullopt, rng);
}

TEST_CASE("batch decode: batch 1, long KV split over blocks, and the spec options", "[gpu][attention]") {
  std::mt19937_64 rng(11);
  for (std::int64_t page_size : {1, 16}) run_decode_case({32, 8, 128, page_size}, {32768}, rng, 7);
  run_decode_case({32, 8, 128, 16, "HND", false}, {5000, 1, 0, 4097}, rng);                // float16
  run_decode_case({32, 8, 128, 16, "NHD", true, 30.0}, {3000, 17, 0}, rng);                  // soft cap
  run_decode_case({32, 8, 128, 16, "NHD", true, 0, 100}, {3000, 17, 0, 100, 101}, rng);      // sliding window
  run_decode_case({16, 16, 256, 32, "NHD", true, 0, 0, false}, {2000, 5, 0}, rng);          // no lse
  run_decode_case({64, 4, 64, 64, "HND"}, {1, 2, 3}, rng);                                   // group 16, tiny
}

// The default form is tensor cores for 16-bit KV at head_dim 64 and 128 (the tests above);
// the CUDA-core form (head_dim 256 and fp8 KV take it by default) on the same grid.
TEST_CASE("batch decode on CUDA cores matches float64 attention over the page table", "[gpu][attention]") {
  std::random_device device;
  const std::uint64_t seed = (std::uint64_t{device()} << 32) | device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  run_decode_grid({64, 128}, false, rng);
  for (std::int64_t page_size : {1, 16}) run_decode_case(DecodeCase{32, 8, 128, page_size}.on_cuda_cores(), {32768}, rng, 7);
  run_decode_case(DecodeCase{32, 8, 128, 16, "HND", false}.on_cuda_cores(), {5000, 1, 0, 4097}, rng);            // float16
  run_decode_case(DecodeCase{32, 8, 128, 16, "NHD", true, 30.0}.on_cuda_cores(), {3000, 17, 0}, rng);              // soft cap
  run_decode_case(DecodeCase{32, 8, 128, 16, "NHD", true, 0, 100}.on_cuda_cores(), {3000, 17, 0, 100, 101}, rng);  // window
  DecodeCase combined{32, 8, 128, 16, "HND"};
  combined.combined = true;
  run_decode_case(combined.on_cuda_cores(), {0, 1, 15, 16, 17, 1000, 33, 300}, rng);
  const DecodeCase no_lse{32, 8, 128, 16, "NHD", true, 0, 0, false};
  run_back_to_back(no_lse.on_cuda_cores(), {4000, 17, 0, 2500}, rng, 5, 4);
}

TEST_CASE("batch decode: split decodes back to back on one workspace", "[gpu][attention]") {
  std::mt19937_64 rng(17);
  const DecodeCase no_lse{32, 8, 128, 16, "NHD", true, 0, 0, false};
  run_back_to_back(no_lse, {32768}, rng, 33, 4);
  run_back_to_back(no_lse, {4000, 17, 0, 2500}, rng, 5, 4);
}

TEST_CASE("batch decode: fp8 e4m3 KV with scales, and K/V combined in one tensor", "[gpu][attention]") {
  std::mt19937_64 rng(13);
  const std::vector<std::int64_t> lengths = {0, 1, 15, 16, 17, 1000, 33, 300};
  for (std::int64_t head_dim : {64, 128, 256})
    for (const char* layout : {"NHD", "HND"})
      for (bool combined : {false, true})
        for (bool fp8 : {false, true}) {
          if (!fp8 && !combined) continue;  // the plain cache is the first test's
          DecodeCase c{32, 8, head_dim, 16, layout};
          c.fp8_kv = fp8;
          c.combined = combined;
          run_decode_case(c, lengths, rng);
        }
  DecodeCase long_fp8{32, 8, 128, 1};
  long_fp8.fp8_kv = true;
  run_decode_case(long_fp8, {32768}, rng, 5);  // split over blocks
  DecodeCase fp16_fp8{16, 2, 128, 32, "NHD", false, 30.0};
  fp16_fp8.fp8_kv = true;
  run_decode_case(fp16_fp8, lengths, rng);  // float16 queries, soft cap

  kjit::BatchDecode combined(engine(), DecodeCase{8, 2, 128, 16, "NHD", true, 0, 0, true, false, true}.spec());
  kjit::DecodePlan one{1, 1, 1, 0};
  int dummy = 0;
  CHECK_THROWS_WITH(combined.run(one, {&dummy, &dummy, &dummy, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 0.1),
                    Catch::Contains("leave v_cache null"));
}

namespace {

// Appends ragged tokens (random bit patterns: the kernel copies, so equality is exact)
// and checks that exactly the valid tokens' rows changed.
template <class T>
void run_append_case(const char* dtype, const char* layout, std::int64_t page_size, bool combined, std::mt19937_64& rng) {
  DecodeCase c{8, 4, 128, page_size, layout};
  // Requests already hold `before` tokens; `added` are appended, so lengths grow.
  const std::vector<std::int64_t> before = {0, 15, 16, 100, 3}, added = {5, 1, 17, 0, 40};
  std::vector<std::int64_t> after(before.size());
  for (std::size_t b = 0; b < before.size(); ++b) after[b] = before[b] + added[b];
  PagedBatch p = make_batch(c, after, rng);  // its page table; the cache contents are drawn here
  std::vector<T> cache_k(p.k.size()), cache_v(p.v.size());
  for (auto& x : cache_k) x = static_cast<T>(rng());
  for (auto& x : cache_v) x = static_cast<T>(rng());
  std::vector<std::int32_t> batch_indices, positions;
  for (std::size_t b = 0; b < before.size(); ++b)
    for (std::int64_t t = before[b]; t < after[b]; ++t) {
      batch_indices.push_back(static_cast<std::int32_t>(b));
      positions.push_back(static_cast<std::int32_t>(t));
    }
  // Two tokens with bad indices: skipped, never written anywhere.
  batch_indices.push_back(99);
  positions.push_back(0);
  batch_indices.push_back(1);
  positions.push_back(static_cast<std::int32_t>(after[1]));
  const auto nnz = static_cast<std::int64_t>(positions.size());
  std::vector<T> new_k(static_cast<std::size_t>(nnz * c.kv_heads * c.head_dim)), new_v(new_k.size());
  for (auto& x : new_k) x = static_cast<T>(rng());
  for (auto& x : new_v) x = static_cast<T>(rng());
  const std::int64_t page_elements = c.page_size * c.kv_heads * c.head_dim;
  DeviceMemory dk = combined ? to_device(combine_pages(cache_k, cache_v, page_elements)) : to_device(cache_k),
               dv = to_device(cache_v), dnk = to_device(new_k), dnv = to_device(new_v), dbi = to_device(batch_indices),
               dpos = to_device(positions), dind = to_device(p.indices), dptr = to_device(p.indptr),
               dlast = to_device(p.last_page_len);
  kjit::Kernel append = engine().get(fmt::format(
      R"({{"op": "append_paged_kv_cache", "num_kv_heads": {}, "head_dim": {}, "page_size": {}, "dtype": "{}", "kv_layout": "{}", "kv_storage": "{}"}})",
      c.kv_heads, c.head_dim, page_size, dtype, layout, combined ? "combined" : "separate"));
  std::vector<kjit::Arg> args{dnk.get(), dnv.get(), dbi.get(), dpos.get(), dk.get()};
  if (!combined) args.emplace_back(dv.get());
  args.insert(args.end(), {kjit::Arg(dind.get()), kjit::Arg(dptr.get()), kjit::Arg(dlast.get()), kjit::Arg(nnz),
                           kjit::Arg(static_cast<std::int64_t>(before.size()))});
  append.launch(args);
  synchronize();
  // Expected: the old cache with each valid new token's rows in place.
  std::vector<T> want_k = cache_k, want_v = cache_v;
  for (std::int64_t i = 0; i + 2 < nnz; ++i)
    for (std::int64_t hk = 0; hk < c.kv_heads; ++hk) {
      const std::int64_t at = p.token_offset(c, batch_indices[static_cast<std::size_t>(i)], positions[static_cast<std::size_t>(i)], hk);
      for (std::int64_t d = 0; d < c.head_dim; ++d) {
        want_k[static_cast<std::size_t>(at + d)] = new_k[static_cast<std::size_t>((i * c.kv_heads + hk) * c.head_dim + d)];
        want_v[static_cast<std::size_t>(at + d)] = new_v[static_cast<std::size_t>((i * c.kv_heads + hk) * c.head_dim + d)];
      }
    }
  INFO(dtype << " " << layout << " page " << page_size << (combined ? " combined" : ""));
  if (combined) {
    CHECK(dk.download_as<T>() == combine_pages(want_k, want_v, page_elements));
  } else {
    CHECK(dk.download_as<T>() == want_k);
    CHECK(dv.download_as<T>() == want_v);
  }
}

}  // namespace

TEST_CASE("append_paged_kv_cache writes ragged tokens into their pages", "[gpu][attention]") {
  std::mt19937_64 rng(5);
  for (const char* layout : {"NHD", "HND"})
    for (std::int64_t page_size : {1, 16, 64})
      for (bool combined : {false, true}) run_append_case<std::uint16_t>("bfloat16", layout, page_size, combined, rng);
  run_append_case<std::uint8_t>("float8_e4m3", "NHD", 16, false, rng);
  run_append_case<std::uint8_t>("float8_e4m3", "HND", 1, true, rng);
}

TEST_CASE("merge_state and merge_states equal one pass over all the keys", "[gpu][attention]") {
  std::mt19937_64 rng(9);
  std::normal_distribution<float> normal;
  const std::int64_t heads = 6, dim = 128;
  std::int64_t seq = 0, states = 0;
  std::vector<float> v, s;
  // merge_states: a lane group per row (300 tokens), and a block per row for few rows
  // (seq_len <= 1024 / heads), with few and many states; the last shape serves merge_state.
  for (auto [shape_seq, shape_states] : {std::pair<std::int64_t, std::int64_t>{300, 5}, {3, 61}, {33, 5}}) {
    seq = shape_seq;
    states = shape_states;
    // States as float32 values with base-2 lse; some empty (lse -inf, values garbage).
    v.assign(static_cast<std::size_t>(seq * states * heads * dim), 0.f);
    s.assign(static_cast<std::size_t>(seq * states * heads), 0.f);
    for (auto& x : v) x = normal(rng);
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = i % 7 == 3 ? -INFINITY : 4.f * normal(rng);
    for (std::int64_t h = 0; h < heads; ++h)  // token 0, head h: every state empty when h == 0
      for (std::int64_t st = 0; st < states; ++st) s[static_cast<std::size_t>(st * heads + h)] = h == 0 ? -INFINITY : s[static_cast<std::size_t>(st * heads + h)];
    for (std::size_t i = 0; i < v.size(); ++i)
      if (std::isinf(s[i / dim])) v[i] = std::nanf("");  // an empty state's values must not be read
    auto reference = [&](std::int64_t t, std::int64_t h, std::int64_t first, std::int64_t count, std::vector<double>& o) -> double {
      double m = -INFINITY;
      for (std::int64_t st = first; st < first + count; ++st) m = std::max<double>(m, s[static_cast<std::size_t>((t * states + st) * heads + h)]);
      o.assign(static_cast<std::size_t>(dim), 0.0);
      if (std::isinf(m)) return -INFINITY;
      double sum = 0;
      for (std::int64_t st = first; st < first + count; ++st) {
        const double w = std::exp2(s[static_cast<std::size_t>((t * states + st) * heads + h)] - m);
        if (w == 0) continue;
        sum += w;
        for (std::int64_t d = 0; d < dim; ++d) o[static_cast<std::size_t>(d)] += w * v[static_cast<std::size_t>(((t * states + st) * heads + h) * dim + d)];
      }
      for (auto& x : o) x /= sum;
      return m + std::log2(sum);
    };
    DeviceMemory dv = to_device(v), ds = to_device(s), out(static_cast<std::size_t>(seq * heads * dim) * 4), out_s(static_cast<std::size_t>(seq * heads) * 4);
    out.fill(0xff);
    out_s.fill(0xff);
    engine().get(fmt::format(R"({{"op": "merge_states", "num_heads": {}, "head_dim": {}, "dtype": "float32"}})", heads, dim))
        .launch({dv.get(), ds.get(), out.get(), out_s.get(), seq, states});
    synchronize();
    auto got = out.download_as<float>(), got_s = out_s.download_as<float>();
    std::vector<double> o;
    for (std::int64_t t = 0; t < seq; ++t)
      for (std::int64_t h = 0; h < heads; ++h) {
        const double lse = reference(t, h, 0, states, o);
        const float g = got_s[static_cast<std::size_t>(t * heads + h)];
        INFO("token " << t << " head " << h);
        if (std::isinf(lse)) CHECK((std::isinf(g) && g < 0));
        else CHECK(std::fabs(g - lse) <= 1e-5 * std::max(1.0, std::fabs(lse)));
        for (std::int64_t d = 0; d < dim; ++d)
          REQUIRE(std::fabs(got[static_cast<std::size_t>((t * heads + h) * dim + d)] - o[static_cast<std::size_t>(d)]) <= 1e-5);
      }
  }

  // merge_state: states 1 and 3 of each token as two separate bf16 tensors.
  std::vector<std::uint16_t> va(static_cast<std::size_t>(seq * heads * dim)), vb(va.size());
  std::vector<float> sa(static_cast<std::size_t>(seq * heads)), sb(sa.size());
  for (std::int64_t t = 0; t < seq; ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      sa[static_cast<std::size_t>(t * heads + h)] = s[static_cast<std::size_t>((t * states + 1) * heads + h)];
      sb[static_cast<std::size_t>(t * heads + h)] = s[static_cast<std::size_t>((t * states + 3) * heads + h)];
      for (std::int64_t d = 0; d < dim; ++d) {
        va[static_cast<std::size_t>((t * heads + h) * dim + d)] = float_to_bf16(v[static_cast<std::size_t>(((t * states + 1) * heads + h) * dim + d)]);
        vb[static_cast<std::size_t>((t * heads + h) * dim + d)] = float_to_bf16(v[static_cast<std::size_t>(((t * states + 3) * heads + h) * dim + d)]);
      }
    }
  DeviceMemory dva = to_device(va), dvb = to_device(vb), dsa = to_device(sa), dsb = to_device(sb), out2(va.size() * 2),
               out_s(sa.size() * 4);
  out2.fill(0xff);
  out_s.fill(0xff);
  engine().get(fmt::format(R"({{"op": "merge_state", "num_heads": {}, "head_dim": {}, "dtype": "bfloat16"}})", heads, dim))
      .launch({dva.get(), dsa.get(), dvb.get(), dsb.get(), out2.get(), out_s.get(), seq});
  synchronize();
  auto got2 = out2.download_as<std::uint16_t>();
  auto got_s = out_s.download_as<float>();
  for (std::int64_t t = 0; t < seq; ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      // Reference from the bf16-rounded inputs of states 1 and 3.
      const double a = sa[static_cast<std::size_t>(t * heads + h)], b = sb[static_cast<std::size_t>(t * heads + h)];
      const double m = std::max(a, b);
      INFO("merge_state token " << t << " head " << h);
      if (std::isinf(m)) {
        CHECK((std::isinf(got_s[static_cast<std::size_t>(t * heads + h)]) && got_s[static_cast<std::size_t>(t * heads + h)] < 0));
        CHECK(bf16_to_float(got2[static_cast<std::size_t>((t * heads + h) * dim)]) == 0.f);
        continue;
      }
      const double wa = std::exp2(a - m), wb = std::exp2(b - m);
      CHECK(std::fabs(got_s[static_cast<std::size_t>(t * heads + h)] - (m + std::log2(wa + wb))) <= 1e-5 * std::max(1.0, std::fabs(m)));
      for (std::int64_t d = 0; d < dim; ++d) {
        const std::size_t i = static_cast<std::size_t>((t * heads + h) * dim + d);
        double want = 0;
        if (wa > 0) want += wa * bf16_to_float(va[i]);
        if (wb > 0) want += wb * bf16_to_float(vb[i]);
        want /= wa + wb;
        REQUIRE(std::fabs(bf16_to_float(got2[i]) - want) <= 8e-3 * std::max(1.0, std::fabs(want)));
      }
    }
}

TEST_CASE("batch decode refuses bad plans and arguments", "[gpu][attention]") {
  kjit::BatchDecode decode(engine(), R"({"op": "batch_decode", "num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 128, "page_size": 16, "dtype": "bfloat16"})");
  const std::vector<std::int32_t> indptr = {0, 2, 1}, last = {16, 3};
  CHECK_THROWS_WITH(decode.plan(indptr, last), Catch::Contains("kv_indptr decreases at request 1"));
  const std::vector<std::int32_t> indptr2 = {0, 2}, last2 = {17};
  CHECK_THROWS_WITH(decode.plan(indptr2, last2), Catch::Contains("kv_last_page_len[0] = 17 is outside 1..16"));
  CHECK_THROWS_WITH(decode.plan(indptr2, std::vector<std::int32_t>{}), Catch::Contains("expected batch_size + 1"));
  // A fixed split (sweeps): 7 chunks of the 19 tokens, with a workspace for their states.
  const std::vector<std::int32_t> last3 = {3};
  const kjit::DecodePlan fixed = decode.plan(indptr2, last3, 7);
  CHECK((fixed.num_chunks == 7 && fixed.chunk_size == 3 && fixed.workspace_bytes >= 7 * 8 * 129 * 4));
  CHECK_THROWS_WITH(decode.plan(indptr2, last3, -1), Catch::Contains("num_chunks = -1 is outside 0..65535"));
  // A split plan without a workspace.
  kjit::DecodePlan split{1, 4, 100, 4096};
  CHECK_THROWS_WITH(decode.run(split, {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 0.1),
                    Catch::Contains("needs a workspace"));
  CHECK_THROWS_AS(kjit::BatchDecode(engine(), R"({"op": "merge_states", "num_heads": 8, "head_dim": 128, "dtype": "float32"})"),
                  kjit::SpecError);
}

TEST_CASE("batch prefill refuses a grid past CUDA's limits", "[gpu][attention]") {
  // Group 4 packs 16 queries per 64-row tile; 16 * 65535 + 1 queries need 65536 tiles on grid z.
  // (The warp-specialized form is persistent: its grid is one block per SM, whatever the work.)
  kjit::Kernel prefill = engine().get(R"({"op": "batch_prefill", "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "warp_specialized": false})");
  DeviceMemory q(32 * 128 * 2), kv(8 * 128 * 2), indptr(8), out(32 * 128 * 2), lse(32 * 4);
  const std::vector<kjit::Arg> args{q.get(), kv.get(), kv.get(), indptr.get(), indptr.get(), out.get(), lse.get(),
                                    std::int64_t{1}, std::int64_t{16 * 65535 + 1}, 0.1};
  CHECK_THROWS_WITH(prefill.launch(args), Catch::Contains("max_qo_len") && Catch::Contains("65536 blocks along grid z, at most 65535"));
}

namespace {

struct PrefillCase {
  std::int64_t qo_heads, kv_heads, head_dim;
  bool causal = true;
  bool bf16 = true;
  double soft_cap = 0;
  std::int64_t window = 0;
  bool return_lse = true;
  std::int64_t page_size = 0;  // > 0: K/V in a paged cache (append attention)
  std::string layout = "NHD";
  bool combined = false;       // paged: K and V in one [pages, 2, ...] tensor
  std::string extra;           // more spec fields, e.g. R"(, "pack_gqa": false)"
  std::string arch;            // compile for this arch instead of the device's (e.g. sm_90: no wgmma)

  std::string spec() const {
    return fmt::format(
               R"({{"op": "batch_prefill", "num_qo_heads": {}, "num_kv_heads": {}, "head_dim": {}, "dtype": "{}", "causal": {}{})",
               qo_heads, kv_heads, head_dim, bf16 ? "bfloat16" : "float16", causal,
               page_size > 0 ? fmt::format(R"(, "paged": true, "page_size": {}, "kv_layout": "{}", "kv_storage": "{}")", page_size,
                                           layout, combined ? "combined" : "separate")
                             : "") +
           extra +
           score_options(return_lse, soft_cap, window);
  }
};

// The CSR arrays of ragged requests of (qo_len, kv_len), and the longest request's queries.
struct RaggedIndptrs {
  std::vector<std::int32_t> qo{0}, kv{0};
  std::int64_t max_qo = 0;
  explicit RaggedIndptrs(const std::vector<std::pair<std::int64_t, std::int64_t>>& lengths) {
    for (auto [qo_len, kv_len] : lengths) {
      qo.push_back(static_cast<std::int32_t>(qo.back() + qo_len));
      kv.push_back(static_cast<std::int32_t>(kv.back() + kv_len));
      max_qo = std::max(max_qo, qo_len);
    }
  }
};

// Ragged requests of (qo_len, kv_len) against float64 attention; outputs poisoned first.
void run_prefill_case(const PrefillCase& c, const std::vector<std::pair<std::int64_t, std::int64_t>>& lengths, std::mt19937_64& rng) {
  const Half16 h{c.bf16};
  const RaggedIndptrs indptrs(lengths);
  const std::vector<std::int32_t>& qo_indptr = indptrs.qo;
  const std::vector<std::int32_t>& kv_indptr = indptrs.kv;
  const std::int64_t max_qo = indptrs.max_qo;
  const std::int64_t total_q = qo_indptr.back(), total_kv = kv_indptr.back();
  std::normal_distribution<float> normal;
  std::vector<std::uint16_t> q(static_cast<std::size_t>(total_q * c.qo_heads * c.head_dim)), k(static_cast<std::size_t>(total_kv * c.kv_heads * c.head_dim)), v(k.size());
  for (auto& x : q) x = h.encode(normal(rng));
  for (auto& x : k) x = h.encode(normal(rng));
  for (auto& x : v) x = h.encode(normal(rng));
  const double sm_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));

  Reference ref;
  ref.o.assign(q.size(), 0.0);
  ref.lse.assign(static_cast<std::size_t>(total_q * c.qo_heads), -INFINITY);
  const std::int64_t group = c.qo_heads / c.kv_heads;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const std::int64_t qo = lengths[b].first, kv = lengths[b].second, shift = kv - qo;
    for (std::int64_t i = 0; i < qo; ++i)
      for (std::int64_t hq = 0; hq < c.qo_heads; ++hq) {
        const std::int64_t qi = qo_indptr[b] + i, hk = hq / group;
        std::vector<double> s;
        std::vector<std::int64_t> keys;
        for (std::int64_t j = 0; j < kv; ++j) {
          if (c.causal && j > i + shift) continue;
          if (c.window > 0 && j <= i + shift - c.window) continue;
          double dot = 0;
          for (std::int64_t d = 0; d < c.head_dim; ++d)
            dot += double(h.decode(q[static_cast<std::size_t>((qi * c.qo_heads + hq) * c.head_dim + d)])) *
                   h.decode(k[static_cast<std::size_t>(((kv_indptr[b] + j) * c.kv_heads + hk) * c.head_dim + d)]);
          s.push_back(score(dot, sm_scale, c.soft_cap));
          keys.push_back(j);
        }
        if (s.empty()) continue;
        ref.lse[static_cast<std::size_t>(qi * c.qo_heads + hq)] = softmax_in_place(s);
        for (std::size_t n = 0; n < s.size(); ++n) {
          const double w = s[n];
          for (std::int64_t d = 0; d < c.head_dim; ++d)
            ref.o[static_cast<std::size_t>((qi * c.qo_heads + hq) * c.head_dim + d)] +=
                w * h.decode(v[static_cast<std::size_t>(((kv_indptr[b] + keys[n]) * c.kv_heads + hk) * c.head_dim + d)]);
        }
      }
  }

  // Paged: the same keys and values scattered over shuffled pages of a cache.
  PagedBatch pages;
  if (c.page_size > 0) {
    const DecodeCase layout{c.qo_heads, c.kv_heads, c.head_dim, c.page_size, c.layout, c.bf16};
    std::vector<std::int64_t> kv_lengths;
    for (auto [qo, kv] : lengths) kv_lengths.push_back(kv);
    pages = make_batch(layout, kv_lengths, rng);
    for (std::size_t b = 0; b < lengths.size(); ++b)
      for (std::int64_t t = 0; t < lengths[b].second; ++t)
        for (std::int64_t hk = 0; hk < c.kv_heads; ++hk) {
          const std::int64_t at = pages.token_offset(layout, static_cast<std::int64_t>(b), t, hk);
          const std::int64_t from = ((kv_indptr[b] + t) * c.kv_heads + hk) * c.head_dim;
          std::copy_n(&k[static_cast<std::size_t>(from)], c.head_dim, &pages.k[static_cast<std::size_t>(at)]);
          std::copy_n(&v[static_cast<std::size_t>(from)], c.head_dim, &pages.v[static_cast<std::size_t>(at)]);
        }
  }
  const bool paged = c.page_size > 0;
  const std::int64_t page_elements = c.page_size * c.kv_heads * c.head_dim;
  DeviceMemory dq = to_device(q), dk = to_device(!paged ? k : c.combined ? combine_pages(pages.k, pages.v, page_elements) : pages.k),
               dv = to_device(paged ? pages.v : v),
               dqi = to_device(qo_indptr), dki = to_device(paged ? pages.indptr : kv_indptr),
               dind = to_device(pages.indices), dlast = to_device(pages.last_page_len);
  DeviceMemory out(std::max<std::size_t>(q.size() * 2, 2)), lse(std::max<std::size_t>(ref.lse.size() * 4, 4));
  out.fill(0xff);
  lse.fill(0xff);
  kjit::Kernel prefill = c.arch.empty() ? engine().get(c.spec()) : engine_for_arch(c.arch).get(c.spec());
  const auto batch = static_cast<std::int64_t>(lengths.size());
  std::vector<kjit::Arg> args{dq.get(), dk.get()};
  if (!c.combined) args.emplace_back(dv.get());
  args.insert(args.end(), {kjit::Arg(dqi.get()), kjit::Arg(dki.get())});
  if (paged) args.insert(args.end(), {kjit::Arg(dind.get()), kjit::Arg(dlast.get())});
  args.emplace_back(out.get());
  if (c.return_lse) args.emplace_back(lse.get());
  // "work_list": the host plan's queue of work items.
  std::optional<DeviceMemory> work;
  if (c.extra.find(R"("work_list": true)") != std::string::npos) {
    work.emplace(to_device(kjit::plan_prefill_work(prefill.info(), qo_indptr, paged ? pages.indptr : kv_indptr, pages.last_page_len)));
    args.emplace_back(work->get());
  }
  args.insert(args.end(), {kjit::Arg(batch), kjit::Arg(max_qo), kjit::Arg(sm_scale)});
  prefill.launch(args);
  synchronize();
  std::vector<float> got_lse = lse.download_as<float>();
  got_lse.resize(ref.lse.size());
  check_against(c.bf16, ref, out.download_as<std::uint16_t>(), c.return_lse ? &got_lse : nullptr, c.spec());
}

}  // namespace

TEST_CASE("batch prefill matches float64 attention on ragged requests", "[gpu][attention][prefill]") {
  std::random_device device;
  const std::uint64_t seed = (std::uint64_t{device()} << 32) | device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // (qo_len, kv_len): single tokens, tile edges, more keys than queries (chunked prefill),
  // more queries than keys (early rows see nothing under the causal mask), empty requests.
  const std::vector<std::pair<std::int64_t, std::int64_t>> lengths = {{1, 1}, {17, 17}, {64, 64}, {65, 100}, {130, 300},
                                                                      {0, 5}, {5, 0}, {70, 40}, {200, 200}, {3, 257}};
  for (std::int64_t head_dim : {64, 128, 256})
    for (std::int64_t group : {1, 4, 8})
      for (bool causal : {true, false}) run_prefill_case({2 * group, 2, head_dim, causal}, lengths, rng);
  run_prefill_case({8, 2, 128, true, false}, lengths, rng);                    // float16
  run_prefill_case({8, 2, 128, true, true, 30.0}, lengths, rng);               // soft cap
  run_prefill_case({8, 2, 128, true, true, 0, 50}, lengths, rng);              // sliding window
  run_prefill_case({8, 2, 256, false, true, 0, 0, false}, lengths, rng);       // no lse
  run_prefill_case({32, 8, 128, true}, {{1000, 1000}}, rng);                   // one longer request
  // Paged K/V: append attention (new queries at the end of each request's cache).
  for (std::int64_t page_size : {1, 16, 64})
    for (const char* layout : {"NHD", "HND"})
      for (std::int64_t head_dim : {64, 128, 256}) {
        PrefillCase c{8, 2, head_dim};
        c.page_size = page_size;
        c.layout = layout;
        run_prefill_case(c, lengths, rng);
      }
  // Rows of one head per block instead of the group's (query, head) pairs; a group of 5
  // (packed rows of a query do not align with the 64-row tiles); a group of 16.
  for (bool paged : {false, true}) {
    PrefillCase one_head{8, 2, 128};
    one_head.extra = R"(, "pack_gqa": false)";
    one_head.page_size = paged ? 16 : 0;
    run_prefill_case(one_head, lengths, rng);
    PrefillCase group5{10, 2, 128};
    group5.page_size = paged ? 16 : 0;
    run_prefill_case(group5, lengths, rng);
    PrefillCase window5{10, 2, 64, true, true, 0, 40};
    window5.page_size = paged ? 1 : 0;
    run_prefill_case(window5, lengths, rng);
  }
  run_prefill_case({32, 2, 128}, lengths, rng);
  // The warp-specialized form alone (no short form, whatever the batch):
  // head dims, groups, masks, score options, paged layouts and page sizes, rows of one head,
  // a group of 5, a long request (ring phases wrap), and on sm_90 (no wgmma) its mma.sync
  // fallback.
  {
    const std::string ws = R"(, "warp_specialized": true, "short_form_max_qo_len": 0)";
    std::vector<PrefillCase> cases;
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t group : {1, 4, 8})
        for (bool causal : {true, false}) cases.push_back({2 * group, 2, head_dim, causal});
    cases.push_back({8, 2, 128, true, false});                 // float16
    cases.push_back({8, 2, 128, true, true, 30.0});            // soft cap
    cases.push_back({8, 2, 128, true, true, 0, 50});           // sliding window
    cases.push_back({8, 2, 64, false, true, 30.0, 40, false});  // all of them, no lse
    cases.push_back({10, 2, 128});                             // group 5
    // Pages: cp.async (1, 16), TMA boxes of whole pages (64) and of a tile within a page (256).
    for (std::int64_t page_size : {1, 16, 64, 256})
      for (const char* layout : {"NHD", "HND"}) {
        PrefillCase c{8, 2, 128};
        c.page_size = page_size;
        c.layout = layout;
        cases.push_back(c);
        if (page_size == 16 || page_size == 64) {
          c.qo_heads = 32, c.kv_heads = 8;
          c.combined = true;
          cases.push_back(c);
        }
      }
    // The output staged in shared memory for the bulk copy engine: head dims, a group of 5
    // (a query's rows split across items), no lse, cp.async and TMA pages.
    std::vector<PrefillCase> staged{{8, 2, 128}, {8, 2, 64, false}, {10, 2, 128, true, true, 30.0, 0, false}};
    for (std::int64_t page_size : {16, 64}) {
      PrefillCase c{8, 2, 128};
      c.page_size = page_size;
      c.layout = page_size == 16 ? "HND" : "NHD";
      staged.push_back(c);
    }
    for (auto c : staged) {
      c.extra = R"(, "staged_output": true)";
      cases.push_back(c);
    }
    for (auto c : cases) {
      c.extra = ws + c.extra;
      run_prefill_case(c, lengths, rng);
    }
    // Blocks taking their items from the host plan's work list (plan_prefill_work): ragged and paged, with a
    // sliding window; then rows of one head and the long requests in either order.
    const std::string listed = ws + R"(, "work_list": true)";
    std::vector<PrefillCase> planned{{8, 2, 128}, {8, 2, 64, false}, {8, 2, 128, true, true, 0, 50}};
    PrefillCase paged_case{8, 2, 128};
    paged_case.page_size = 16;
    planned.push_back(paged_case);
    paged_case.page_size = 64;
    paged_case.layout = "HND";
    planned.push_back(paged_case);
    for (auto c : planned) {
      c.extra = listed;
      run_prefill_case(c, lengths, rng);
    }
    for (const std::string& order : {ws, listed, listed + R"(, "staged_output": true)"}) {
      PrefillCase one_head{8, 2, 128};
      one_head.extra = order + R"(, "pack_gqa": false)";
      run_prefill_case(one_head, lengths, rng);
      run_prefill_case({32, 8, 128, true, true, 0, 0, true, 0, "NHD", false, order}, {{1000, 1000}, {1, 3000}, {700, 2000}}, rng);
    }
    for (bool paged : {false, true}) {
      PrefillCase fallback{8, 2, 128};
      fallback.page_size = paged ? 16 : 0;
      fallback.extra = ws;
      fallback.arch = "sm_90";
      run_prefill_case(fallback, lengths, rng);
    }
  }
  // The default at head_dim 128 on either side of its short-form threshold (16 queries): the
  // short form up to it, the warp-specialized form past it.
  for (std::int64_t page_size : {0, 16}) {
    PrefillCase c{8, 2, 128};
    c.page_size = page_size;
    run_prefill_case(c, {{16, 16}, {1, 40}, {0, 3}, {5, 300}}, rng);
    run_prefill_case(c, {{17, 17}, {1, 40}, {0, 3}, {5, 300}}, rng);
  }
  // The form without warp specialization at head_dim 128 (the default there is the other).
  for (std::int64_t page_size : {0, 16}) {
    PrefillCase c{8, 2, 128};
    c.page_size = page_size;
    c.extra = R"(, "warp_specialized": false)";
    run_prefill_case(c, lengths, rng);
  }
  // Both tensor-core forms (wgmma where the GPU has it, and mma.sync) with both key tiles.
  for (bool warpgroup_mma : {true, false})
    for (int keys : {32, 64})
      for (std::int64_t head_dim : {64, 128}) {
        PrefillCase c{8, 2, head_dim, true, head_dim == 64};
        c.extra = fmt::format(R"(, "warpgroup_mma": {}, "keys_per_tile": {})", warpgroup_mma, keys);
        run_prefill_case(c, lengths, rng);
        c.page_size = 16;
        run_prefill_case(c, lengths, rng);
      }
  for (const char* layout : {"NHD", "HND"}) {  // K and V combined in one tensor
    PrefillCase c{32, 8, 128};
    c.page_size = 16;
    c.layout = layout;
    c.combined = true;
    run_prefill_case(c, lengths, rng);
  }
}

// A block's items change with the work list, never an item's arithmetic: the outputs must
// be the static order's, bit for bit (outputs poisoned first, so an item the list misses
// shows).
TEST_CASE("prefill work lists give the static order's bits", "[gpu][attention][prefill]") {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal;
  auto base = [](int qo_heads, int kv_heads) {
    return fmt::format(R"({{"op": "batch_prefill", "num_qo_heads": {}, "num_kv_heads": {}, "head_dim": 128, "dtype": "bfloat16", "short_form_max_qo_len": 0)",
                       qo_heads, kv_heads);
  };
  const std::vector<std::pair<std::int64_t, std::int64_t>> equal(8, {1024, 1024});
  const std::vector<std::pair<std::int64_t, std::int64_t>> ragged = {{1, 1},     {17, 17},  {0, 5},     {5, 0},     {130, 300},
                                                                     {200, 200}, {3, 257},  {1000, 1000}, {1, 3000}, {700, 2000}};
  // Groups of 4, of 5 (128-row items split a query's heads), and one head per item.
  struct Heads {
    int qo, kv;
    const char* extra;
  };
  for (const Heads heads : {Heads{32, 8, ""}, Heads{10, 2, ""}, Heads{32, 8, R"(, "pack_gqa": false)"}})
    for (const auto& lengths : {equal, ragged}) {
      if ((heads.qo != 32 || *heads.extra != '\0') && lengths.size() == equal.size()) continue;  // 8 x 1024: the default only
      const std::string spec = base(heads.qo, heads.kv) + heads.extra;
      const RaggedIndptrs indptrs(lengths);
      const std::vector<std::int32_t>& qo_indptr = indptrs.qo;
      const std::vector<std::int32_t>& kv_indptr = indptrs.kv;
      const std::int64_t max_qo = indptrs.max_qo;
      std::vector<std::uint16_t> q(static_cast<std::size_t>(qo_indptr.back() * heads.qo) * 128),
          k(static_cast<std::size_t>(kv_indptr.back() * heads.kv) * 128), v(k.size());
      for (auto* x : {&q, &k, &v})
        for (auto& e : *x) e = float_to_bf16(normal(rng));
      DeviceMemory dq = to_device(q), dk = to_device(k), dv = to_device(v), dqi = to_device(qo_indptr), dki = to_device(kv_indptr);
      std::vector<std::vector<std::uint8_t>> outputs, lses;
      for (bool listed : {false, true}) {
        kjit::Kernel prefill = engine().get(spec + (listed ? R"(, "work_list": true})" : "}"));
        DeviceMemory out(std::max<std::size_t>(q.size() * 2, 2)), lse(std::max<std::size_t>(q.size() / 128 * 4, 4));
        out.fill(0xff);
        lse.fill(0xff);
        std::vector<kjit::Arg> args{dq.get(), dk.get(), dv.get(), dqi.get(), dki.get(), out.get(), lse.get()};
        std::optional<DeviceMemory> work;
        if (listed) {
          work.emplace(to_device(kjit::plan_prefill_work(prefill.info(), qo_indptr, kv_indptr)));
          args.emplace_back(work->get());
        }
        args.insert(args.end(), {kjit::Arg(static_cast<std::int64_t>(lengths.size())), kjit::Arg(max_qo), kjit::Arg(0.0883883)});
        prefill.launch(args);
        if (listed) {  // the queue left reset: the same list serves a second launch, which writes every row again
          out.fill(0xff);
          lse.fill(0xff);
          prefill.launch(args);
        }
        synchronize();
        if (listed) {
          const std::vector<std::int32_t> queue = work->download_as<std::int32_t>();
          CHECK(queue[1] == 0);  // next
          CHECK(queue[2] == 0);  // finished
        }
        outputs.push_back(out.download_as<std::uint8_t>());
        lses.push_back(lse.download_as<std::uint8_t>());
      }
      INFO(spec << ", requests " << lengths.size());
      CHECK(outputs[0] == outputs[1]);
      CHECK(lses[0] == lses[1]);
      std::size_t unwritten = 0;  // the poison, a NaN no output element is
      for (std::size_t i = 0; i + 1 < outputs[1].size(); i += 2) unwritten += outputs[1][i] == 0xff && outputs[1][i + 1] == 0xff;
      CHECK(unwritten == 0);
    }
}
