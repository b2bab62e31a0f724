// Every normalization variant against the float64 reference, on fresh random
// inputs, with outputs poisoned first and a guard row after each output.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "kjit/kjit.hpp"
#include "reference.hpp"
#include "runtime/device_memory.hpp"

using kjit::runtime::DeviceMemory;
using namespace kjit::test;

namespace {

constexpr int kHiddenSizes[] = {128, 512, 1536, 2048, 4096, 7168, 16384, 1, 3, 100, 4097, 5120};
constexpr std::int64_t kRows[] = {0, 1, 7, 4097};
constexpr const char* kOps[] = {"rmsnorm", "fused_add_rmsnorm", "rmsnorm_fp8_quant", "fused_add_rmsnorm_fp8_quant"};

kjit::Engine& engine() {
  static kjit::Engine instance;  // default cache: reruns skip NVRTC
  return instance;
}

// Runs fn(begin, end) over row ranges on all cores.
template <class F>
void parallel_rows(std::int64_t rows, F fn) {
  const std::int64_t workers = std::max<std::int64_t>(1, std::min<std::int64_t>(std::thread::hardware_concurrency(), rows / 16));
  std::vector<std::thread> threads;
  for (std::int64_t t = 0; t < workers; ++t)
    threads.emplace_back([&, t] { fn(rows * t / workers, rows * (t + 1) / workers); });
  for (auto& th : threads) th.join();
}

std::string spec_of(const char* op, int hidden, const char* dtype, int vectors_per_thread = 2) {
  return fmt::format(R"({{"op": "{}", "hidden_size": {}, "dtype": "{}", "vectors_per_thread": {}}})", op, hidden, dtype,
                     vectors_per_thread);
}

struct Storage {
  bool bf16;
  std::uint16_t encode(double v) const { return bf16 ? float_to_bf16(static_cast<float>(v)) : float_to_half(static_cast<float>(v)); }
  double decode(std::uint16_t b) const { return bf16 ? bf16_to_float(b) : half_to_float(b); }
};

struct Case {
  const char* op;
  int hidden;
  const char* dtype;
  std::int64_t rows;
  bool in_place = false;  // output aliases input (fused add)
  int vectors_per_thread = 2;
};

void check_case(const Case& c, std::uint64_t seed) {
  const bool fused = std::strstr(c.op, "fused_add") != nullptr;
  const bool fp8 = std::strstr(c.op, "fp8") != nullptr;
  const Storage st{std::strcmp(c.dtype, "bfloat16") == 0};
  const std::int64_t n = c.rows * c.hidden, h = c.hidden;
  INFO(spec_of(c.op, c.hidden, c.dtype, c.vectors_per_thread) << " rows " << c.rows << (c.in_place ? " in place" : "") << " seed " << seed);

  // Rows of very different magnitudes (0.01 .. 100), generated and referenced in parallel.
  std::vector<std::uint16_t> x(static_cast<std::size_t>(n)), r(static_cast<std::size_t>(n)), w(static_cast<std::size_t>(h));
  std::vector<double> xd(x.size()), rd(r.size()), wd(w.size());
  std::mt19937_64 weight_rng(seed);
  std::uniform_real_distribution<double> uniform(-2, 2);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i] = st.encode(uniform(weight_rng));
    wd[i] = st.decode(w[i]);
  }
  const double eps = 1e-6;
  auto round = [&](double v) { return st.decode(st.encode(v)); };
  NormReference ref = make_norm_reference(c.rows, h, fused, fp8);
  parallel_rows(c.rows, [&](std::int64_t begin, std::int64_t end) {
    std::mt19937_64 rng(seed ^ (static_cast<std::uint64_t>(begin) * 0x9E3779B97F4A7C15ull));
    std::uniform_real_distribution<double> unit(-1.7, 1.7);
    for (std::int64_t i = begin; i < end; ++i) {
      double scale = std::pow(10.0, static_cast<double>(static_cast<int>(rng() % 5)) - 2);
      for (std::int64_t j = 0; j < h; ++j) {
        std::size_t k = static_cast<std::size_t>(i * h + j);
        x[k] = st.encode(unit(rng) * scale);
        r[k] = st.encode(unit(rng) * scale);
        xd[k] = st.decode(x[k]);
        rd[k] = st.decode(r[k]);
      }
    }
    rmsnorm_reference_rows(xd, fused ? &rd : nullptr, wd, h, eps, fp8, round, ref, begin, end);
  });

  // One guard row after every buffer the kernel writes; outputs poisoned (0xFF: NaN in every format).
  const std::size_t row_bytes16 = static_cast<std::size_t>(h) * 2;
  DeviceMemory input(static_cast<std::size_t>(n) * 2 + row_bytes16), residual(static_cast<std::size_t>(n) * 2 + row_bytes16),
      weight(static_cast<std::size_t>(h) * 2);
  DeviceMemory output(fp8 ? static_cast<std::size_t>(n + h) : static_cast<std::size_t>(n) * 2 + row_bytes16);
  DeviceMemory scale(static_cast<std::size_t>(c.rows + 1) * 4);
  input.fill(0xff);
  residual.fill(0xff);
  output.fill(0xff);
  scale.fill(0xff);
  kjit::runtime::check(kjit::runtime::driver().memcpy_htod(input.address(), x.data(), x.size() * 2), "upload");
  kjit::runtime::check(kjit::runtime::driver().memcpy_htod(residual.address(), r.data(), r.size() * 2), "upload");
  weight.upload(w.data());

  kjit::Kernel k = engine().get(spec_of(c.op, c.hidden, c.dtype, c.vectors_per_thread));
  void* out_ptr = c.in_place ? input.get() : output.get();
  std::vector<kjit::Arg> args{kjit::Arg(input.get())};
  if (fused) args.emplace_back(residual.get());
  args.emplace_back(weight.get());
  args.emplace_back(out_ptr);
  if (fp8) args.emplace_back(scale.get());
  args.emplace_back(c.rows);
  args.emplace_back(eps);
  k.launch(args);
  kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");

  const DeviceMemory& out_memory = c.in_place ? input : output;
  if (!fp8) {
    auto got = out_memory.download_as<std::uint16_t>();
    double err2 = 0, ref2 = 0, worst = 0;
    std::int64_t bad = 0, nan = 0;
    const double rtol = st.bf16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -9);  // two units in the last place
    for (std::int64_t i = 0; i < n; ++i) {
      double g = st.decode(got[static_cast<std::size_t>(i)]), e = ref.output[static_cast<std::size_t>(i)];
      if (std::isnan(g)) { ++nan; continue; }
      err2 += (g - e) * (g - e);
      ref2 += e * e;
      double excess = std::fabs(g - e) - (1e-6 + rtol * std::fabs(e));
      if (excess > 0) ++bad;
      worst = std::max(worst, std::fabs(g - e) / (1e-6 + std::fabs(e)));
    }
    CHECK(nan == 0);
    CHECK(bad == 0);
    if (n > 0) CHECK(std::sqrt(err2 / std::max(ref2, 1e-300)) < (st.bf16 ? 8e-3 : 1e-3));
    INFO("worst relative error " << worst);
    if (!c.in_place)  // the guard row stays poisoned
      for (std::int64_t j = 0; j < h; ++j) REQUIRE(got[static_cast<std::size_t>(n + j)] == 0xffff);
  } else {
    auto got = out_memory.download_as<std::uint8_t>();
    auto scales = scale.download_as<float>();
    std::int64_t exact = 0, off_by_one = 0, worse = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      std::uint8_t g = got[static_cast<std::size_t>(i)], e = ref.fp8[static_cast<std::size_t>(i)];
      if (g == e) { ++exact; continue; }
      bool same_sign = (g & 0x80) == (e & 0x80) || (g & 0x7f) == 0 || (e & 0x7f) == 0;
      int distance = same_sign ? std::abs((g & 0x7f) - (e & 0x7f)) : (g & 0x7f) + (e & 0x7f);
      if (distance <= 1 && (g & 0x7f) != 0x7f) ++off_by_one; else ++worse;
    }
    CHECK(worse == 0);
    if (n > 0) CHECK(off_by_one <= n / 100 + 1);  // near-ties only
    for (std::int64_t i = 0; i < c.rows; ++i)
      CHECK(std::fabs(scales[static_cast<std::size_t>(i)] - ref.scale[static_cast<std::size_t>(i)]) <=
            2e-6 * ref.scale[static_cast<std::size_t>(i)]);
    if (!c.in_place) {
      for (std::int64_t j = 0; j < h; ++j) REQUIRE(got[static_cast<std::size_t>(n + j)] == 0xff);
    }
    std::uint32_t guard;
    std::memcpy(&guard, &scales[static_cast<std::size_t>(c.rows)], 4);
    CHECK(guard == 0xffffffffu);
  }
  if (fused) {  // the residual is updated in place, exactly round(x + r)
    auto got = residual.download_as<std::uint16_t>();
    std::int64_t mismatched = 0;
    for (std::int64_t i = 0; i < n; ++i)
      mismatched += got[static_cast<std::size_t>(i)] != st.encode(ref.residual[static_cast<std::size_t>(i)]);
    CHECK(mismatched == 0);
    for (std::int64_t j = 0; j < h; ++j) REQUIRE(got[static_cast<std::size_t>(n + j)] == 0xffff);
  }
}

}  // namespace

TEST_CASE("normalization kernels match the float64 reference", "[gpu][norm]") {
  // Compile everything first, in parallel (cached after the first run).
  std::vector<std::string> specs;
  for (const char* op : kOps)
    for (const char* dtype : {"float16", "bfloat16"})
      for (int hidden : kHiddenSizes) specs.push_back(spec_of(op, hidden, dtype));
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      for (std::size_t i; (i = next++) < specs.size();) (void)engine().build(specs[i]);
    });
  for (auto& t : threads) t.join();

  std::random_device device;
  for (const char* op : kOps)
    for (const char* dtype : {"float16", "bfloat16"})
      for (int hidden : kHiddenSizes)
        for (std::int64_t rows : kRows) check_case({op, hidden, dtype, rows}, (std::uint64_t{device()} << 32) | device());
}

TEST_CASE("tuning variants compute the same function", "[gpu][norm]") {
  std::random_device device;
  for (const char* op : kOps)
    for (int vectors : {1, 4, 8})
      for (int hidden : {100, 4096, 7168, 16384})
        for (std::int64_t rows : {7, 1000}) check_case({op, hidden, "bfloat16", rows, false, vectors}, device());
}

TEST_CASE("fused add + RMSNorm works in place (output = input)", "[gpu][norm]") {
  std::random_device device;
  for (const char* dtype : {"float16", "bfloat16"})
    for (int hidden : {4096, 7168, 100}) check_case({"fused_add_rmsnorm", hidden, dtype, 33, true}, device());
}

TEST_CASE("DLPack tensors launch and are checked", "[gpu][norm]") {
  kjit::Kernel k = engine().get(spec_of("rmsnorm", 4096, "bfloat16"));
  const std::int64_t rows = 5;
  DeviceMemory x(rows * 4096 * 2), w(4096 * 2), y(rows * 4096 * 2);
  std::vector<std::uint16_t> ones(rows * 4096, float_to_bf16(1.0f)), wh(4096, float_to_bf16(0.5f));
  x.upload(ones.data());
  w.upload(wh.data());
  y.fill(0xff);
  std::int64_t shape_x[] = {rows, 4096}, shape_w[] = {4096};
  DLTensor tx{x.get(), {kDLCUDA, 0}, 2, kjit::to_dlpack(kjit::DType::bfloat16), shape_x, nullptr, 0};
  DLTensor tw{w.get(), {kDLCUDA, 0}, 1, kjit::to_dlpack(kjit::DType::bfloat16), shape_w, nullptr, 0};
  DLTensor ty{y.get(), {kDLCUDA, 0}, 2, kjit::to_dlpack(kjit::DType::bfloat16), shape_x, nullptr, 0};
  k.launch({tx, tw, ty, rows, 1e-6});
  kjit::runtime::check(kjit::runtime::driver().ctx_synchronize(), "kernel");
  for (auto v : y.download_as<std::uint16_t>()) REQUIRE(bf16_to_float(v) == Approx(0.5f).epsilon(1e-3));
  CHECK_THROWS_AS(k.launch({tx, tw, ty, rows + 1, 1e-6}), kjit::ArgumentError);
  // A memory hit returns the same loaded kernel.
  CHECK(&engine().get(spec_of("rmsnorm", 4096, "bfloat16")).info() == &k.info());
}
