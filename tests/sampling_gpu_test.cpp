// Sampling kernels: exact support (never a token outside the filtered set, computed in
// float64), distributions (chi-square against the renormalized target, and a check that
// the test rejects a biased sample stream), determinism, and bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include <fmt/format.h>

#include "kjit/kjit.hpp"
#include "runtime/device_memory.hpp"

using kjit::runtime::DeviceMemory;

namespace {

kjit::Engine& engine() {
  static kjit::Engine instance;
  return instance;
}

struct Filter {
  std::string op;
  std::int64_t top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
  float temperature = 1.f;  // *_from_logits only
  std::string order;        // top_k_top_p ops: "joint" or "top_k_first" ("": the default, top_k_first)
};

// The spec field a filter's order adds.
std::string order_field(const Filter& f) {
  return f.order.empty() ? "" : fmt::format(R"(, "filter_apply_order": "{}")", f.order);
}

double clean(float p) { return p > 0.f ? static_cast<double>(p) : 0.0; }

// The filtered set, as the kernels define it (tie-inclusive upper sets), in float64.
std::vector<bool> filtered_set(const float* p, std::int64_t vocab, const Filter& f) {
  std::vector<double> v(static_cast<std::size_t>(vocab));
  double total = 0, max = 0;
  for (std::int64_t i = 0; i < vocab; ++i) {
    v[static_cast<std::size_t>(i)] = clean(p[i]);
    total += v[static_cast<std::size_t>(i)];
    max = std::max(max, v[static_cast<std::size_t>(i)]);
  }
  std::vector<double> sorted(v);
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  // suffix structure: for a value x, count and mass of entries > x
  std::vector<double> prefix(sorted.size() + 1, 0.0);
  for (std::size_t i = 0; i < sorted.size(); ++i) prefix[i + 1] = prefix[i] + sorted[i];
  const float floor = std::min(std::max(f.min_p, 0.f), 1.f) * static_cast<float>(max);  // fp32, as the kernel
  const bool top_k = f.op.find("top_k") != std::string::npos, top_p = f.op.find("top_p") != std::string::npos;
  // Top-k first: top-p is measured against the mass of the top-k set {v >= k-th largest}.
  double top_p_base = total;
  if (top_k && top_p && f.order != "joint") {
    const double kth = sorted[static_cast<std::size_t>(f.top_k - 1)];
    const auto members = std::upper_bound(sorted.begin(), sorted.end(), kth, std::greater<>()) - sorted.begin();
    top_p_base = prefix[static_cast<std::size_t>(members)];
  }
  std::vector<bool> in(v.size(), false);
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (v[i] <= 0) continue;
    // Entries strictly above v[i]: the first position not greater than it in the descending order.
    const std::size_t above = static_cast<std::size_t>(
        std::lower_bound(sorted.begin(), sorted.end(), v[i], std::greater<>()) - sorted.begin());
    bool ok = true;
    if (top_k) ok = ok && static_cast<std::int64_t>(above) < f.top_k;
    if (top_p) ok = ok && prefix[above] < static_cast<double>(f.top_p) * top_p_base;
    // (the names "top_k"/"top_p" alone, as the renorm test passes them, select the same sets)
    if (f.op.find("min_p") != std::string::npos) ok = ok && static_cast<float>(v[i]) >= floor;
    in[i] = ok;
  }
  return in;
}

// Where a row lives while it is sampled: the family's choice (small batches in shared
// memory over a cluster, large ones streamed), always streamed from global memory, and
// always in shared memory over an odd cluster whose slices differ in length.
const std::vector<std::string> kLayouts = {"", R"(, "blocks_per_row": 0)",
                                           R"(, "blocks_per_row": 5, "resident_max_batch": 2147483647)"};

std::string spec_of(const std::string& op, std::int64_t vocab, const char* dtype = "float32", const std::string& layout = "") {
  return fmt::format(R"({{"op": "{}", "vocab_size": {}, "dtype": "{}"{}}})", op, vocab, dtype, layout);
}

// Samples `rows` rows of probs (float32) once; returns the tokens.
std::vector<int> sample(const std::string& spec, const Filter& f, const DeviceMemory& probs, std::int64_t rows,
                        std::uint64_t seed, std::uint64_t offset) {
  kjit::Kernel k = engine().get(spec);
  DeviceMemory out(static_cast<std::size_t>(rows) * 4);
  out.fill(0xff);
  std::vector<kjit::Arg> args{kjit::Arg(probs.get()), kjit::Arg(out.get())};
  if (f.op.find("top_k") != std::string::npos) args.emplace_back(f.top_k);
  if (f.op.find("top_p") != std::string::npos) args.emplace_back(f.top_p);
  if (f.op.find("min_p") != std::string::npos) args.emplace_back(f.min_p);
  if (f.op.find("logits") != std::string::npos) args.emplace_back(f.temperature);
  args.emplace_back(rows);
  args.emplace_back(static_cast<std::int64_t>(seed));
  args.emplace_back(static_cast<std::int64_t>(offset));
  k.launch(args);
  kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "sampling kernel");
  return out.download_as<int>();
}

// Kinds of rows that stress the boundary.
std::vector<float> make_row(std::mt19937_64& rng, std::int64_t vocab, int kind) {
  std::vector<float> p(static_cast<std::size_t>(vocab));
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform;
  switch (kind) {
    case 0: {  // softmax of N(0, 3^2) logits: a long tail
      double m = -1e300;
      std::vector<double> l(p.size());
      for (auto& x : l) { x = 3 * normal(rng); m = std::max(m, x); }
      double s = 0;
      for (auto& x : l) { x = std::exp(x - m); s += x; }
      for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(l[i] / s);
      break;
    }
    case 1:  // many exact ties: 8 levels
      for (auto& x : p) x = static_cast<float>(1 + rng() % 8);
      break;
    case 2: {  // near-ties: distinct values 1 ulp apart around a few levels
      for (std::size_t i = 0; i < p.size(); ++i) {
        float base = static_cast<float>(1 + rng() % 4) * 0.25f;
        for (int s = 0, n = static_cast<int>(rng() % 3); s < n; ++s) base = std::nextafter(base, 2.f);
        p[i] = base;
      }
      break;
    }
    default:  // zeros, negatives and NaNs mixed in (they must never be drawn)
      for (auto& x : p) {
        double u = uniform(rng);
        x = u < 0.3 ? 0.f : u < 0.35 ? -1.f : u < 0.4 ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(uniform(rng));
      }
  }
  return p;
}

// Upper tail p-value of a chi-square statistic (Wilson-Hilferty approximation).
double chi_square_p_value(double statistic, int dof) {
  const double k = dof;
  const double z = (std::cbrt(statistic / k) - (1 - 2 / (9 * k))) / std::sqrt(2 / (9 * k));
  return 0.5 * std::erfc(z / std::sqrt(2.0));
}

// Chi-square of observed counts against target probabilities over the categories with target > 0.
double chi_square_p(const std::vector<std::int64_t>& counts, const std::vector<double>& target, std::int64_t n) {
  double stat = 0;
  int categories = 0;
  for (std::size_t i = 0; i < target.size(); ++i) {
    if (target[i] <= 0) continue;
    const double expected = target[i] * static_cast<double>(n);
    stat += (static_cast<double>(counts[i]) - expected) * (static_cast<double>(counts[i]) - expected) / expected;
    ++categories;
  }
  return chi_square_p_value(stat, std::max(1, categories - 1));
}

const std::vector<Filter> kFilters = {
    {"sampling_from_probs"},
    {"top_k_sampling_from_probs", 1},
    {"top_k_sampling_from_probs", 20},
    {"top_k_sampling_from_probs", 1000},
    {"top_p_sampling_from_probs", 0, 0.9f},
    {"top_p_sampling_from_probs", 0, 0.3f},
    {"min_p_sampling_from_probs", 0, 1.f, 0.1f},
    {"top_k_top_p_sampling_from_probs", 50, 0.8f},                              // top-k first (default)
    {"top_k_top_p_sampling_from_probs", 50, 0.8f, 0.f, 1.f, "joint"},
    {"top_k_top_p_sampling_from_probs", 7, 0.6f, 0.f, 1.f, "top_k_first"},
};

}  // namespace

TEST_CASE("samples never leave the filtered set (float64 reference)", "[gpu][sampling]") {
  std::random_device device;
  const std::uint64_t seed = (std::uint64_t{device()} << 32) | device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (std::int64_t vocab : {32000, 128256, 129280, 151936, 152064, 1000, 17, 5}) {
    const std::int64_t rows = 16;
    std::vector<float> host;
    for (std::int64_t r = 0; r < rows; ++r) {
      auto row = make_row(rng, vocab, static_cast<int>(r % 4));
      host.insert(host.end(), row.begin(), row.end());
    }
    DeviceMemory probs(host.size() * 4);
    probs.upload(host.data());
    for (const auto& f : kFilters) {
      Filter filter = f;
      filter.top_k = std::min<std::int64_t>(std::max<std::int64_t>(f.top_k, 1), vocab);
      std::vector<std::vector<bool>> sets;
      for (std::int64_t r = 0; r < rows; ++r) sets.push_back(filtered_set(&host[static_cast<std::size_t>(r * vocab)], vocab, filter));
      for (std::uint64_t offset = 0; offset < 8; ++offset) {
        const std::string& layout = kLayouts[offset % kLayouts.size()];
        auto tokens = sample(spec_of(filter.op, vocab, "float32", layout + order_field(filter)), filter, probs, rows, seed, offset);
        for (std::int64_t r = 0; r < rows; ++r) {
          const int t = tokens[static_cast<std::size_t>(r)];
          INFO(filter.op << " k " << filter.top_k << " p " << filter.top_p << " min_p " << filter.min_p << " vocab " << vocab
                         << " row " << r << " offset " << offset << " token " << t << " layout" << layout);
          REQUIRE(t >= 0);
          REQUIRE(t < vocab);
          const auto& set = sets[static_cast<std::size_t>(r)];
          if (std::find(set.begin(), set.end(), true) == set.end()) {
            // No positive entry (a short row of zeros, negatives and NaNs, about one run in
            // 25 for vocabulary 5): every entry counts as 0, and the first is the largest.
            REQUIRE(t == 0);
            continue;
          }
          REQUIRE(set[static_cast<std::size_t>(t)]);
        }
      }
    }
  }
}

TEST_CASE("sample frequencies match the renormalized filtered distribution", "[gpu][sampling]") {
  // A fixed small distribution, 2^20 samples per filter, significance 1e-6.
  const std::int64_t vocab = 50, rows = 65536, launches = 16;
  std::mt19937_64 rng(7);
  auto row = make_row(rng, vocab, 0);
  std::vector<float> host;
  for (std::int64_t r = 0; r < rows; ++r) host.insert(host.end(), row.begin(), row.end());
  DeviceMemory probs(host.size() * 4);
  probs.upload(host.data());
  std::random_device device;
  const std::uint64_t seed = (std::uint64_t{device()} << 32) | device();
  INFO("seed " << seed);
  for (const auto& layout : kLayouts)
  for (const auto& f : kFilters) {
    Filter filter = f;
    filter.top_k = std::min<std::int64_t>(std::max<std::int64_t>(f.top_k, 1), vocab);
    auto in = filtered_set(row.data(), vocab, filter);
    std::vector<double> target(static_cast<std::size_t>(vocab), 0.0);
    double mass = 0;
    for (std::int64_t i = 0; i < vocab; ++i)
      if (in[static_cast<std::size_t>(i)]) mass += clean(row[static_cast<std::size_t>(i)]);
    for (std::int64_t i = 0; i < vocab; ++i)
      if (in[static_cast<std::size_t>(i)]) target[static_cast<std::size_t>(i)] = clean(row[static_cast<std::size_t>(i)]) / mass;
    std::vector<std::int64_t> counts(static_cast<std::size_t>(vocab), 0);
    std::vector<int> stream;
    for (std::int64_t l = 0; l < launches; ++l) {
      auto tokens = sample(spec_of(filter.op, vocab, "float32", layout + order_field(filter)), filter, probs, rows, seed, static_cast<std::uint64_t>(l));
      for (int t : tokens) {
        REQUIRE(in[static_cast<std::size_t>(t)]);
        ++counts[static_cast<std::size_t>(t)];
      }
      stream.insert(stream.end(), tokens.begin(), tokens.end());
    }
    const std::int64_t n = rows * launches;
    const double p_value = chi_square_p(counts, target, n);
    INFO(filter.op << " k " << filter.top_k << " p " << filter.top_p << " min_p " << filter.min_p << " layout" << layout
                   << ": chi-square p-value " << p_value);
    CHECK(p_value > 1e-6);

    // The same test rejects a sampler that is biased by 1%: one sample in a hundred
    // replaced by the least likely token of the set (the most likely one would hide the
    // bias in a set of two or three dominant tokens).
    int rare = -1, support = 0;
    for (std::int64_t i = 0; i < vocab; ++i)
      if (target[static_cast<std::size_t>(i)] > 0) {
        ++support;
        if (rare < 0 || target[static_cast<std::size_t>(i)] < target[static_cast<std::size_t>(rare)]) rare = static_cast<int>(i);
      }
    if (support > 1) {
      std::vector<std::int64_t> biased(static_cast<std::size_t>(vocab), 0);
      for (std::size_t i = 0; i < stream.size(); ++i) ++biased[static_cast<std::size_t>(i % 100 == 0 ? rare : stream[i])];
      const double biased_p = chi_square_p(biased, target, n);
      INFO("biased stream p-value " << biased_p);
      CHECK(biased_p < 1e-6);
    }
  }
}

TEST_CASE("a large vocabulary with a few dominant tokens", "[gpu][sampling]") {
  const std::int64_t vocab = 128256, rows = 4096, launches = 32;
  std::vector<float> row(static_cast<std::size_t>(vocab), 0.1f / static_cast<float>(vocab - 5));
  const float dominant[] = {0.4f, 0.25f, 0.12f, 0.08f, 0.05f};
  const std::size_t where[] = {17, 90000, 5, 128255, 64000};
  for (int i = 0; i < 5; ++i) row[where[i]] = dominant[i];
  std::vector<float> host;
  for (std::int64_t r = 0; r < rows; ++r) host.insert(host.end(), row.begin(), row.end());
  DeviceMemory probs(host.size() * 4);
  probs.upload(host.data());
  std::random_device device;
  const std::uint64_t seed = device();
  for (const auto& layout : kLayouts)
  for (const Filter& f : {Filter{"top_p_sampling_from_probs", 0, 0.8f}, Filter{"top_k_sampling_from_probs", 3},
                          Filter{"sampling_from_probs"}}) {
    auto in = filtered_set(row.data(), vocab, f);
    // Categories: each dominant token, plus "any other token" (the tail).
    std::vector<double> target(6, 0.0);
    double mass = 0;
    for (std::int64_t i = 0; i < vocab; ++i)
      if (in[static_cast<std::size_t>(i)]) mass += row[static_cast<std::size_t>(i)];
    std::vector<std::int64_t> counts(6, 0);
    for (int d = 0; d < 5; ++d) target[static_cast<std::size_t>(d)] = in[where[d]] ? dominant[d] / mass : 0.0;
    target[5] = 1.0 - std::accumulate(target.begin(), target.begin() + 5, 0.0);
    if (target[5] < 1e-9) target[5] = 0;
    for (std::int64_t l = 0; l < launches; ++l)
      for (int t : sample(spec_of(f.op, vocab, "float32", layout), f, probs, rows, seed, static_cast<std::uint64_t>(l))) {
        REQUIRE(in[static_cast<std::size_t>(t)]);
        int c = 5;
        for (int d = 0; d < 5; ++d)
          if (static_cast<std::size_t>(t) == where[d]) c = d;
        ++counts[static_cast<std::size_t>(c)];
      }
    const double p_value = chi_square_p(counts, target, rows * launches);
    INFO(f.op << " layout" << layout << " p-value " << p_value);
    CHECK(p_value > 1e-6);
  }
}

TEST_CASE("sampling is deterministic in (seed, offset); other dtypes and per-row parameters", "[gpu][sampling]") {
  const std::int64_t vocab = 151936, rows = 37;
  std::mt19937_64 rng(3);
  std::vector<float> host;
  for (std::int64_t r = 0; r < rows; ++r) {
    auto row = make_row(rng, vocab, 0);
    host.insert(host.end(), row.begin(), row.end());
  }
  DeviceMemory probs(host.size() * 4);
  probs.upload(host.data());
  Filter f{"top_p_sampling_from_probs", 0, 0.95f};
  auto a = sample(spec_of(f.op, vocab), f, probs, rows, 42, 7);
  auto b = sample(spec_of(f.op, vocab), f, probs, rows, 42, 7);
  auto c = sample(spec_of(f.op, vocab), f, probs, rows, 42, 8);
  CHECK(a == b);
  CHECK(a != c);

  // bf16 probabilities, per-row top-k with out-of-range values clamped (0 -> 1, huge -> vocab).
  std::vector<std::uint16_t> bf16(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &host[i], 4);
    bf16[i] = static_cast<std::uint16_t>(bits >> 16);
  }
  DeviceMemory probs16(bf16.size() * 2);
  probs16.upload(bf16.data());
  std::vector<int> ks(rows);
  for (std::int64_t r = 0; r < rows; ++r) ks[static_cast<std::size_t>(r)] = r == 0 ? 0 : r == 1 ? 1 << 30 : static_cast<int>(1 + r * 3);
  DeviceMemory k_dev(ks.size() * 4), out(rows * 4);
  k_dev.upload(ks.data());
  out.fill(0xff);
  kjit::Kernel k = engine().get(R"({"op": "top_k_sampling_from_probs", "vocab_size": 151936, "dtype": "bfloat16", "per_row_params": true})");
  k.launch({probs16.get(), out.get(), k_dev.get(), rows, std::int64_t{1}, std::int64_t{2}});
  kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");
  auto tokens = out.download_as<int>();
  for (std::int64_t r = 0; r < rows; ++r) {
    std::vector<float> decoded(static_cast<std::size_t>(vocab));
    for (std::int64_t i = 0; i < vocab; ++i) {
      std::uint32_t bits = static_cast<std::uint32_t>(bf16[static_cast<std::size_t>(r * vocab + i)]) << 16;
      std::memcpy(&decoded[static_cast<std::size_t>(i)], &bits, 4);
    }
    Filter rf{"top_k_sampling_from_probs", std::min<std::int64_t>(std::max(ks[static_cast<std::size_t>(r)], 1), vocab)};
    auto in = filtered_set(decoded.data(), vocab, rf);
    INFO("row " << r << " k " << ks[static_cast<std::size_t>(r)]);
    REQUIRE(in[static_cast<std::size_t>(tokens[static_cast<std::size_t>(r)])]);
  }
}

TEST_CASE("bad sampling input: host errors and defined results", "[gpu][sampling]") {
  const std::int64_t vocab = 1000;
  kjit::Kernel top_k = engine().get(spec_of("top_k_sampling_from_probs", vocab));
  kjit::Kernel top_p = engine().get(spec_of("top_p_sampling_from_probs", vocab));
  kjit::Kernel min_p = engine().get(spec_of("min_p_sampling_from_probs", vocab));
  DeviceMemory probs(2 * vocab * 4), out(8);
  const void* p = probs.get();
  const void* o = out.get();
  const std::int64_t one = 1, zero = 0;
  CHECK_THROWS_WITH(top_k.launch({p, o, std::int64_t{0}, one, zero, zero}), Catch::Contains("(top_k) = 0 is out of range: allowed [1, 1000]"));
  CHECK_THROWS_WITH(top_k.launch({p, o, std::int64_t{1001}, one, zero, zero}), Catch::Contains("out of range"));
  CHECK_THROWS_WITH(top_p.launch({p, o, 0.0, one, zero, zero}), Catch::Contains("(top_p) = 0 is out of range: allowed (0, 1]"));
  CHECK_THROWS_AS(top_p.launch({p, o, 1.5, one, zero, zero}), kjit::ArgumentError);
  CHECK_THROWS_AS(top_p.launch({p, o, std::nan(""), one, zero, zero}), kjit::ArgumentError);
  CHECK_THROWS_AS(min_p.launch({p, o, -0.1, one, zero, zero}), kjit::ArgumentError);

  // Row 0: all zeros -> token 0. Row 1: NaN and negatives except one positive entry.
  std::vector<float> host(2 * vocab, 0.f);
  for (std::int64_t i = 0; i < vocab; ++i) host[static_cast<std::size_t>(vocab + i)] = i % 2 ? -1.f : std::nanf("");
  host[static_cast<std::size_t>(vocab + 777)] = 0.5f;
  probs.upload(host.data());
  for (kjit::Kernel* k : {&top_k, &top_p, &min_p}) {
    out.fill(0xff);
    if (k == &top_k) k->launch({p, o, std::int64_t{5}, std::int64_t{2}, zero, zero});
    else k->launch({p, o, 0.5, std::int64_t{2}, zero, zero});
    kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");
    auto t = out.download_as<int>();
    CHECK(t[0] == 0);
    CHECK(t[1] == 777);
  }
}

TEST_CASE("top-k / top-p renormalization and top-k logit masking match float64 sets", "[gpu][sampling][renorm]") {
  std::random_device device;
  const std::uint64_t seed = device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (std::int64_t vocab : {128256, 32000, 1000, 17}) {
    const std::int64_t rows = 12;
    std::vector<float> host;
    for (std::int64_t r = 0; r < rows; ++r) {
      auto row = make_row(rng, vocab, static_cast<int>(r % 4));
      host.insert(host.end(), row.begin(), row.end());
    }
    DeviceMemory input(host.size() * 4), output(host.size() * 4);
    input.upload(host.data());
    for (const Filter& f : {Filter{"top_k_renorm_probs", 1}, Filter{"top_k_renorm_probs", 50}, Filter{"top_p_renorm_probs", 0, 0.9f},
                            Filter{"top_p_renorm_probs", 0, 0.2f}, Filter{"top_k_mask_logits", 20}}) {
      Filter filter = f;
      filter.top_k = std::min<std::int64_t>(std::max<std::int64_t>(f.top_k, 1), vocab);
      const bool logits = filter.op == "top_k_mask_logits";
      std::vector<float> values = host;
      if (logits)  // logits: shift the probabilities into negative and positive values
        for (auto& x : values) x = std::isnan(x) ? x : x * 100.f - 0.5f;
      input.upload(values.data());
      output.fill(0xff);
      kjit::Kernel k = engine().get(spec_of(filter.op, vocab));
      if (filter.op == "top_p_renorm_probs") k.launch({input.get(), output.get(), filter.top_p, rows});
      else k.launch({input.get(), output.get(), filter.top_k, rows});
      kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");
      auto got = output.download_as<float>();
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* row = &values[static_cast<std::size_t>(r * vocab)];
        std::vector<bool> in;
        if (logits) {  // rank logits directly (NaN as -inf); the top-k set is tie-inclusive
          std::vector<float> v(row, row + vocab);
          for (auto& x : v) if (std::isnan(x)) x = -INFINITY;
          std::vector<float> sorted(v);
          std::sort(sorted.begin(), sorted.end(), std::greater<>());
          in.resize(v.size());
          for (std::size_t i = 0; i < v.size(); ++i)
            in[i] = std::lower_bound(sorted.begin(), sorted.end(), v[i], std::greater<>()) - sorted.begin() < filter.top_k;
        } else {
          Filter as_sampling{filter.op == "top_k_renorm_probs" ? "top_k" : "top_p", filter.top_k, filter.top_p};
          in = filtered_set(row, vocab, as_sampling);
        }
        double mass = 0;
        for (std::int64_t i = 0; i < vocab; ++i)
          if (in[static_cast<std::size_t>(i)]) mass += clean(row[i]);
        std::int64_t wrong = 0;
        for (std::int64_t i = 0; i < vocab; ++i) {
          const float g = got[static_cast<std::size_t>(r * vocab + i)];
          const bool keep = in[static_cast<std::size_t>(i)];
          if (logits) {
            const float x = std::isnan(row[i]) ? -INFINITY : row[i];  // NaN logits count as -inf
            wrong += keep ? !(g == x) : !(g == -INFINITY);
          } else {
            const double want = keep && mass > 0 ? clean(row[i]) / mass : 0.0;
            wrong += !(std::fabs(g - want) <= 1e-6 * want + 1e-30);
          }
        }
        INFO(filter.op << " k " << filter.top_k << " p " << filter.top_p << " vocab " << vocab << " row " << r);
        CHECK(wrong == 0);
      }
    }
  }
}

TEST_CASE("chain speculative sampling emits tokens distributed as the target", "[gpu][sampling][speculative]") {
  const std::int64_t vocab = 16, n = 3, batch = 1 << 18;
  std::random_device device;
  const std::uint64_t seed = device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto random_distribution = [&] {
    std::vector<double> d(static_cast<std::size_t>(vocab));
    std::uniform_real_distribution<double> u(0.0, 1.0);
    double s = 0;
    for (auto& x : d) s += (x = u(rng) * u(rng));
    for (auto& x : d) x /= s;
    return d;
  };
  std::vector<std::vector<double>> q(n), p(n + 1);
  for (auto& d : q) d = random_distribution();
  for (auto& d : p) d = random_distribution();
  std::vector<float> draft_probs, target_probs;
  std::vector<int> draft_tokens;
  draft_probs.reserve(static_cast<std::size_t>(batch * n * vocab));
  target_probs.reserve(static_cast<std::size_t>(batch * (n + 1) * vocab));
  std::vector<std::discrete_distribution<int>> drafters;
  for (const auto& d : q) drafters.emplace_back(d.begin(), d.end());
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < n; ++i) {
      for (double x : q[static_cast<std::size_t>(i)]) draft_probs.push_back(static_cast<float>(x));
      draft_tokens.push_back(drafters[static_cast<std::size_t>(i)](rng));
    }
    for (std::int64_t i = 0; i <= n; ++i)
      for (double x : p[static_cast<std::size_t>(i)]) target_probs.push_back(static_cast<float>(x));
  }
  DeviceMemory d_probs(draft_probs.size() * 4), d_tokens(draft_tokens.size() * 4), t_probs(target_probs.size() * 4),
      out(static_cast<std::size_t>(batch * (n + 1)) * 4), accepted(static_cast<std::size_t>(batch) * 4);
  d_probs.upload(draft_probs.data());
  d_tokens.upload(draft_tokens.data());
  t_probs.upload(target_probs.data());
  out.fill(0x7f);
  accepted.fill(0x7f);
  kjit::Kernel k = engine().get(R"({"op": "chain_speculative_sampling", "vocab_size": 16, "dtype": "float32"})");
  k.launch({d_probs.get(), d_tokens.get(), t_probs.get(), out.get(), accepted.get(), batch, n,
            static_cast<std::int64_t>(seed), std::int64_t{0}});
  kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");
  auto tokens = out.download_as<int>();
  auto acc = accepted.download_as<int>();

  std::vector<std::vector<std::int64_t>> counts(n + 1, std::vector<std::int64_t>(static_cast<std::size_t>(vocab), 0));
  std::vector<std::int64_t> reached(n + 1, 0);
  std::vector<std::int64_t> draft_only(static_cast<std::size_t>(vocab), 0);  // a sampler that never rejects
  for (std::int64_t b = 0; b < batch; ++b) {
    const int a = acc[static_cast<std::size_t>(b)];
    REQUIRE(a >= 0);
    REQUIRE(a <= n);
    for (std::int64_t j = 0; j <= n; ++j) {
      const int t = tokens[static_cast<std::size_t>(b * (n + 1) + j)];
      if (j <= a) {
        REQUIRE(t >= 0);
        REQUIRE(t < vocab);
        if (j < a) REQUIRE(t == draft_tokens[static_cast<std::size_t>(b * n + j)]);  // accepted drafts are kept
        ++counts[static_cast<std::size_t>(j)][static_cast<std::size_t>(t)];
        ++reached[static_cast<std::size_t>(j)];
      } else {
        REQUIRE(t == -1);
      }
    }
    ++draft_only[static_cast<std::size_t>(draft_tokens[static_cast<std::size_t>(b * n)])];
  }
  for (std::int64_t j = 0; j <= n; ++j) {
    if (reached[static_cast<std::size_t>(j)] < 10000) continue;  // too few to test
    const double pv = chi_square_p(counts[static_cast<std::size_t>(j)], p[static_cast<std::size_t>(j)], reached[static_cast<std::size_t>(j)]);
    INFO("position " << j << " reached " << reached[static_cast<std::size_t>(j)] << " p-value " << pv);
    CHECK(pv > 1e-6);
  }
  // Acceptance at position 0 happens with probability sum_v min(p0, q0).
  double accept0 = 0;
  for (std::int64_t v = 0; v < vocab; ++v) accept0 += std::min(p[0][static_cast<std::size_t>(v)], q[0][static_cast<std::size_t>(v)]);
  const double observed = static_cast<double>(reached[1]) / static_cast<double>(batch);
  CHECK(std::fabs(observed - accept0) < 6 * std::sqrt(accept0 * (1 - accept0) / static_cast<double>(batch)));
  // The test has power: the draft tokens themselves are not target-distributed.
  CHECK(chi_square_p(draft_only, p[0], batch) < 1e-6);
}

TEST_CASE("sampling from logits: softmax with temperature, fused", "[gpu][sampling][logits]") {
  std::random_device device;
  const std::uint64_t seed = device();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const float temperature = 0.7f;
  // Logits whose softmax at this temperature is the row: l = T log p (zeros -> -inf, NaN stays NaN).
  auto to_logits = [&](const std::vector<float>& p) {
    std::vector<float> l(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) l[i] = std::isnan(p[i]) ? p[i] : temperature * std::log(static_cast<double>(p[i]));
    return l;
  };
  // The weights the set is defined on, as the kernel computes them up to rounding.
  auto weights = [&](const float* l, std::int64_t vocab) {
    double m = -INFINITY;
    for (std::int64_t i = 0; i < vocab; ++i) if (!std::isnan(l[i])) m = std::max(m, static_cast<double>(l[i]));
    std::vector<float> w(static_cast<std::size_t>(vocab));
    for (std::int64_t i = 0; i < vocab; ++i)
      w[static_cast<std::size_t>(i)] = std::isnan(l[i]) ? 0.f : static_cast<float>(std::exp((l[i] - m) / temperature));
    return w;
  };
  for (std::int64_t vocab : {128256, 1000, 17}) {
    const std::int64_t rows = 12;
    std::vector<float> host;
    for (std::int64_t r = 0; r < rows; ++r) {
      const int kinds[] = {0, 1, 3};
      auto row = to_logits(make_row(rng, vocab, kinds[r % 3]));
      host.insert(host.end(), row.begin(), row.end());
    }
    DeviceMemory logits(host.size() * 4);
    logits.upload(host.data());
    for (Filter f : {Filter{"sampling_from_logits"}, Filter{"top_k_sampling_from_logits", 20}, Filter{"top_p_sampling_from_logits", 0, 0.9f},
                     Filter{"min_p_sampling_from_logits", 0, 1.f, 0.1f}, Filter{"top_k_top_p_sampling_from_logits", 50, 0.8f},
                     Filter{"top_k_top_p_sampling_from_logits", 50, 0.8f, 0.f, 1.f, "joint"}}) {
      f.temperature = temperature;
      f.top_k = std::min<std::int64_t>(std::max<std::int64_t>(f.top_k, 1), vocab);
      for (std::uint64_t offset = 0; offset < 6; ++offset) {
        const std::string& layout = kLayouts[offset % kLayouts.size()];
        auto tokens = sample(spec_of(f.op, vocab, "float32", layout + order_field(f)), f, logits, rows, seed, offset);
        for (std::int64_t r = 0; r < rows; ++r) {
          auto w = weights(&host[static_cast<std::size_t>(r * vocab)], vocab);
          auto in = filtered_set(w.data(), vocab, f);
          const int t = tokens[static_cast<std::size_t>(r)];
          INFO(f.op << " vocab " << vocab << " row " << r << " token " << t << " layout" << layout);
          REQUIRE(t >= 0);
          REQUIRE(t < vocab);
          REQUIRE(in[static_cast<std::size_t>(t)]);
        }
      }
    }
  }
  // Frequencies on a small vocabulary follow the softmax.
  const std::int64_t vocab = 50, rows = 65536, launches = 16;
  auto p = make_row(rng, vocab, 0);
  auto row = to_logits(p);
  std::vector<float> host;
  for (std::int64_t r = 0; r < rows; ++r) host.insert(host.end(), row.begin(), row.end());
  DeviceMemory logits(host.size() * 4);
  logits.upload(host.data());
  Filter f{"top_p_sampling_from_logits", 0, 0.8f};
  f.temperature = temperature;
  auto w = weights(row.data(), vocab);
  auto in = filtered_set(w.data(), vocab, f);
  std::vector<double> target(static_cast<std::size_t>(vocab), 0.0);
  double mass = 0;
  for (std::int64_t i = 0; i < vocab; ++i) if (in[static_cast<std::size_t>(i)]) mass += w[static_cast<std::size_t>(i)];
  for (std::int64_t i = 0; i < vocab; ++i) if (in[static_cast<std::size_t>(i)]) target[static_cast<std::size_t>(i)] = w[static_cast<std::size_t>(i)] / mass;
  for (const auto& layout : kLayouts) {
    std::vector<std::int64_t> counts(static_cast<std::size_t>(vocab), 0);
    for (std::int64_t l = 0; l < launches; ++l)
      for (int t : sample(spec_of(f.op, vocab, "float32", layout), f, logits, rows, seed, static_cast<std::uint64_t>(l)))
        ++counts[static_cast<std::size_t>(t)];
    const double pv = chi_square_p(counts, target, rows * launches);
    INFO("layout" << layout << " chi-square p-value " << pv);
    CHECK(pv > 1e-6);
  }
}
