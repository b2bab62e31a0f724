// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, so every
// (seed, offset, row, round, element) has its own random numbers and no state
// is kept between launches.
#pragma once

namespace kjit::random {

struct Philox4x32 {
  uint4 counter;
  uint2 key;

  __device__ __forceinline__ uint4 operator()() const {
    constexpr unsigned kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    uint4 c = counter;
    uint2 k = key;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
      const unsigned hi0 = __umulhi(kM0, c.x), lo0 = kM0 * c.x;
      const unsigned hi1 = __umulhi(kM1, c.z), lo1 = kM1 * c.z;
      c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
      k.x += kW0;
      k.y += kW1;
    }
    return c;
  }
};

// Exp(1) variate from 32 random bits: E = -log(1 - v), v uniform in (0, 1).
// Written with log1p so that small E (the values that decide an exponential
// race) keep full relative precision; E is never 0 or infinite.
__device__ __forceinline__ float exponential(unsigned bits) {
  const float v = static_cast<float>(bits) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;  // (bits + 0.5) / 2^32
  return -log1pf(-v);
}

}  // namespace kjit::random
