// Host-side number formats and the float64 references the GPU tests compare with.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace kjit::test {

// ---- bfloat16 / float16 / float8 e4m3, round to nearest even ----------------

inline float bits_to_float(std::uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline std::uint32_t float_to_bits(float f) { std::uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t b = float_to_bits(f);
  if (std::isnan(f)) return 0x7fc0;
  b += 0x7fff + ((b >> 16) & 1);
  return static_cast<std::uint16_t>(b >> 16);
}

inline float half_to_float(std::uint16_t h) {
  int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
  return sign ? -v : v;
}
// Exact RNE for finite values in range (the tests' values are).
inline std::uint16_t float_to_half(float f) {
  if (std::isnan(f)) return 0x7e00;
  std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = std::max(e - 1, -14);            // unbiased exponent of the result's binade
  double quantum = std::ldexp(1.0, exp - 10);  // spacing of halves there
  double q = std::nearbyint(a / quantum);      // RNE (default rounding mode)
  double r = q * quantum;
  if (r == 0) return sign;
  int re;
  std::frexp(r, &re);
  int biased = std::max(re - 1, -14) + 15;
  if (r < std::ldexp(1.0, -14)) return sign | static_cast<std::uint16_t>(r / std::ldexp(1.0, -24));
  std::uint16_t mant = static_cast<std::uint16_t>(r / std::ldexp(1.0, re - 1 - 10)) & 0x3ff;
  return sign | static_cast<std::uint16_t>(biased << 10) | mant;
}

inline double e4m3_to_double(std::uint8_t c) {
  int sign = c >> 7, exp = (c >> 3) & 0xf, mant = c & 7;
  if (exp == 15 && mant == 7) return NAN;
  double v = exp == 0 ? std::ldexp(mant, -9) : std::ldexp(8 + mant, exp - 10);
  return sign ? -v : v;
}
// Round to nearest even, saturating to +-448 (as __NV_SATFINITE does).
inline std::uint8_t double_to_e4m3(double x) {
  if (std::isnan(x)) return 0x7f;
  std::uint8_t sign = std::signbit(x) ? 0x80 : 0;
  double a = std::fabs(x);
  if (a >= 448.0) return sign | 0x7e;
  if (a < std::ldexp(1.0, -6))  // subnormals: multiples of 2^-9 (code 8 is the smallest normal)
    return sign | static_cast<std::uint8_t>(std::nearbyint(a * 512.0));
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): binade exponent e - 1, 3 mantissa bits
  double q = std::nearbyint(std::ldexp(a, 4 - e));  // in [8, 16]; 16 carries into the next binade
  int code = ((e - 1 + 7) << 3) + static_cast<int>(q) - 8;
  return sign | static_cast<std::uint8_t>(std::min(code, 0x7e));
}

// The same by exhaustive search over the codes (slow; checks the one above).
inline std::uint8_t double_to_e4m3_search(double x) {
  std::uint8_t sign = std::signbit(x) ? 0x80 : 0;
  double a = std::fabs(x);
  int best = 0;
  double best_diff = INFINITY;
  for (int c = 0; c <= 0x7e; ++c) {
    double d = std::fabs(e4m3_to_double(static_cast<std::uint8_t>(c)) - a);
    if (d < best_diff || (d == best_diff && (c % 2 == 0))) { best = c; best_diff = d; }
  }
  return sign | static_cast<std::uint8_t>(best);
}

// ---- RMSNorm family ----------------------------------------------------------

struct NormReference {
  std::vector<double> output;       // y (before rounding / quantization)
  std::vector<double> residual;     // updated residual (fused add), as stored
  std::vector<double> scale;        // per-row FP8 scale
  std::vector<std::uint8_t> fp8;    // quantized output
};

// x, r, w already decoded from their storage type; round(v) is the dtype's rounding.
// Fills rows [begin, end) of a reference sized by make_norm_reference.
template <class Round>
void rmsnorm_reference_rows(const std::vector<double>& x, const std::vector<double>* r, const std::vector<double>& w,
                            std::int64_t hidden, double eps, bool quant_fp8, Round round, NormReference& ref,
                            std::int64_t begin, std::int64_t end) {
  std::vector<double> row(static_cast<std::size_t>(hidden));
  for (std::int64_t i = begin; i < end; ++i) {
    double sum = 0;
    for (std::int64_t j = 0; j < hidden; ++j) {
      std::size_t k = static_cast<std::size_t>(i * hidden + j);
      double v = x[k];
      if (r) { v = round(v + (*r)[k]); ref.residual[k] = v; }
      row[static_cast<std::size_t>(j)] = v;
      sum += v * v;
    }
    double inv = 1.0 / std::sqrt(sum / static_cast<double>(hidden) + eps);
    double amax = 0;
    for (std::int64_t j = 0; j < hidden; ++j) {
      std::size_t k = static_cast<std::size_t>(i * hidden + j);
      ref.output[k] = row[static_cast<std::size_t>(j)] * inv * w[static_cast<std::size_t>(j)];
      amax = std::max(amax, std::fabs(ref.output[k]));
    }
    if (quant_fp8) {
      double scale = std::max(amax / 448.0, 1.0 / (448.0 * 512.0));
      ref.scale[static_cast<std::size_t>(i)] = scale;
      for (std::int64_t j = 0; j < hidden; ++j) {
        std::size_t k = static_cast<std::size_t>(i * hidden + j);
        ref.fp8[k] = double_to_e4m3(ref.output[k] / scale);
      }
    }
  }
}

inline NormReference make_norm_reference(std::int64_t rows, std::int64_t hidden, bool fused, bool quant_fp8) {
  NormReference ref;
  ref.output.resize(static_cast<std::size_t>(rows * hidden));
  if (fused) ref.residual.resize(ref.output.size());
  if (quant_fp8) {
    ref.scale.resize(static_cast<std::size_t>(rows));
    ref.fp8.resize(ref.output.size());
  }
  return ref;
}

template <class Round>
NormReference rmsnorm_reference(const std::vector<double>& x, const std::vector<double>* r, const std::vector<double>& w,
                                std::int64_t rows, std::int64_t hidden, double eps, bool quant_fp8, Round round) {
  NormReference ref = make_norm_reference(rows, hidden, r != nullptr, quant_fp8);
  rmsnorm_reference_rows(x, r, w, hidden, eps, quant_fp8, round, ref, 0, rows);
  return ref;
}

}  // namespace kjit::test
