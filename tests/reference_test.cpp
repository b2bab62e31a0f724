// The GPU tests trust these host conversions, so they are checked here first.
#include <catch2/catch.hpp>

#include "reference.hpp"

using namespace kjit::test;

TEST_CASE("host bf16 / fp16 / e4m3 conversions round to nearest even", "[reference]") {
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(-2.0f) == 0xc000);
  CHECK(float_to_bf16(bits_to_float(0x3f808000)) == 0x3f80);  // tie -> even
  CHECK(float_to_bf16(bits_to_float(0x3f818000)) == 0x3f82);  // tie -> even (up)
  CHECK(float_to_bf16(bits_to_float(0x3f808001)) == 0x3f81);
  CHECK(bf16_to_float(0x4049) == 3.140625f);

  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(65504.0f) == 0x7bff);
  CHECK(float_to_half(0.1f) == 0x2e66);
  CHECK(float_to_half(1.0f / 3.0f) == 0x3555);
  CHECK(float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie -> even
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  for (std::uint32_t h = 0; h < 0x7c00; ++h) CHECK(float_to_half(half_to_float(static_cast<std::uint16_t>(h))) == h);

  CHECK(e4m3_to_double(0x38) == 1.0);
  CHECK(e4m3_to_double(0x7e) == 448.0);
  CHECK(e4m3_to_double(0x01) == std::ldexp(1.0, -9));
  CHECK(std::isnan(e4m3_to_double(0x7f)));
  CHECK(double_to_e4m3(1.0) == 0x38);
  CHECK(double_to_e4m3(1000.0) == 0x7e);   // saturates
  CHECK(double_to_e4m3(-1000.0) == 0xfe);
  CHECK(double_to_e4m3(1.0625) == 0x38);   // halfway 1.0 / 1.125 -> even (1.0)
  CHECK(double_to_e4m3(1.1875) == 0x3a);   // halfway 1.125 / 1.25 -> even (1.25)
  for (int c = 0; c < 0x7f; ++c) CHECK(double_to_e4m3(e4m3_to_double(static_cast<std::uint8_t>(c))) == c);
  // The fast encoder agrees with exhaustive search everywhere, ties included.
  for (int c = 0; c < 0x7e; ++c) {
    double lo = e4m3_to_double(static_cast<std::uint8_t>(c)), hi = e4m3_to_double(static_cast<std::uint8_t>(c + 1));
    for (double t : {0.0, 0.25, 0.4999, 0.5, 0.5001, 0.75}) {
      double v = lo + t * (hi - lo);
      CHECK(double_to_e4m3(v) == double_to_e4m3_search(v));
      CHECK(double_to_e4m3(-v) == double_to_e4m3_search(-v));
    }
  }
  CHECK(double_to_e4m3(460.0) == 0x7e);
}

TEST_CASE("the float64 RMSNorm reference", "[reference]") {
  std::vector<double> x{1, 2, 3, 4}, w{1, 1, 2, 2}, r{1, 0, 0, 0};
  auto identity = [](double v) { return v; };
  auto ref = rmsnorm_reference(x, nullptr, w, 1, 4, 0.0, false, identity);
  double rms = std::sqrt((1 + 4 + 9 + 16) / 4.0);
  CHECK(ref.output[3] == Approx(4 / rms * 2));
  auto fused = rmsnorm_reference(x, &r, w, 1, 4, 0.0, true, identity);
  CHECK(fused.residual[0] == 2);
  double rms2 = std::sqrt((4 + 4 + 9 + 16) / 4.0);
  CHECK(fused.scale[0] == Approx(4 / rms2 * 2 / 448));
  CHECK(fused.fp8[3] == 0x7e);  // the row maximum maps to 448
}
