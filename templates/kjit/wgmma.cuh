// Warpgroup tensor-core helpers (sm_90a wgmma.mma_async): 4 warps multiply a 64-row A
// by a B read straight from shared memory, asynchronously, into fp32 accumulators.
//
// Accumulators of m64nNk16, per thread, as N / 8 groups of 4 floats: warp w of the
// warpgroup holds rows 16w .. 16w + 15, and with g = lane / 4, t = lane % 4 group n is
// (g, 8n + 2t), (g, 8n + 2t + 1), (g + 8, 8n + 2t), (g + 8, 8n + 2t + 1): a warp's share
// is exactly mma.sync m16n8's C fragments (mma.cuh), and an A operand in registers is its
// A fragment, so softmax code written for mma.sync works unchanged.
//
// Shared operands use the 128-byte swizzle: a tile is stored as column blocks of 64
// 16-bit elements, [columns / 64][rows][64], row r's 16-byte chunk c at c ^ (r % 8); each
// column block starts 1024-byte aligned (the swizzle is applied to address bits).
#pragma once

#include "kjit/mma.cuh"

namespace kjit::wgmma {

// Element (row, column) of a tile of kRows rows in the swizzled layout above.
template <int kRows>
__device__ __forceinline__ int swizzled_offset(int row, int column) {
  return (column / 64) * (kRows * 64) + row * 64 + ((((column % 64) / 8) ^ (row % 8)) * 8) + column % 8;
}

// Shared-memory matrix descriptor, 128-byte swizzle. For a K-major operand (K contiguous:
// Q and K rows) stride_bytes steps 8 rows (1024) and leading_bytes is unused; for an
// MN-major one (N contiguous: V read as [keys][dims]) leading_bytes steps from one
// 64-column block to the next and stride_bytes from one 8-key group to the next.
__device__ __forceinline__ unsigned long long descriptor(const void* start, unsigned leading_bytes, unsigned stride_bytes) {
  const unsigned address = mma::shared_address(start);
  return static_cast<unsigned long long>((address & 0x3FFFF) >> 4) | static_cast<unsigned long long>(leading_bytes >> 4) << 16 |
         static_cast<unsigned long long>(stride_bytes >> 4) << 32 | 1ull << 62;
}

// The descriptor of the matrix `offset_bytes` (a multiple of 16) further on in shared
// memory: one 32-bit add, since the start address is the low word's 14-bit field and
// shared memory's 228 KB never carry out of it (so the bits equal a 64-bit add's). The
// 64-bit adds took 28 of the warp-specialized prefill's 1078 instructions a K/V tile.
__device__ __forceinline__ unsigned long long advance(unsigned long long descriptor, unsigned offset_bytes) {
  const unsigned low = static_cast<unsigned>(descriptor) + (offset_bytes >> 4);
  return (descriptor & 0xFFFFFFFF00000000ull) | low;
}

// Before the first wgmma of a batch: orders this thread's earlier register and shared
// memory writes before the asynchronous reads.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Shared memory written through the generic proxy (cp.async, st.shared) becomes visible
// to wgmma's reads (the async proxy) after this fence and a barrier.
__device__ __forceinline__ void fence_shared_for_async_reads() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Warp specialization: a warpgroup gives registers back (a copying warpgroup) or takes
// them (the MMA warpgroups), so one block of 3 warpgroups can give 2 of them more than
// the 168 an even split allows. Every thread of the warpgroup executes it.
template <int kRegisters>
__device__ __forceinline__ void lower_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void raise_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// Keeps the compiler from reading or moving accumulators while a wgmma writes them.
template <int kGroups>
__device__ __forceinline__ void hold(float (&d)[kGroups][4]) {
#pragma unroll
  for (int n = 0; n < kGroups; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e])::"memory");
}

// Keeps packed A fragments in their registers before a fence (it orders only the writes
// that precede it, so they must not sink past it).
template <int kSteps>
__device__ __forceinline__ void hold(unsigned (&a)[kSteps][4]) {
#pragma unroll
  for (int n = 0; n < kSteps; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[n][e])::"memory");
}

#define KJIT_ACC4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define KJIT_ACC16(n) KJIT_ACC4(n), KJIT_ACC4(n + 1), KJIT_ACC4(n + 2), KJIT_ACC4(n + 3)
#define KJIT_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define KJIT_D32                                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define KJIT_D64                                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "  \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, " \
  "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// A and B from shared memory, both K-major: D (+)= A B. `n` operands follow the accumulators.
#define KJIT_WGMMA_SS(shape, type, dlist, a, b, scale)                                                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " scale ", 0;\nwgmma.mma_async.sync.aligned." shape ".f32." type "." type \
  " " dlist ", " a ", " b ", p, 1, 1, 0, 0;\n}\n"
// A from registers, B from shared memory, MN-major when transpose is "1": D (+)= A B.
#define KJIT_WGMMA_RS(shape, type, dlist, a, b, scale, transpose)                                         \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " scale ", 0;\nwgmma.mma_async.sync.aligned." shape ".f32." type "." type \
  " " dlist ", " a ", " b ", p, 1, 1, " transpose ";\n}\n"

// D (+)= A B, A: 64 x 16 and B: 16 x N (as N x 16, K-major) in shared memory.
// accumulate = false overwrites D.
template <typename T, int N>
__device__ __forceinline__ void mma_shared(float (&d)[N / 8][4], unsigned long long a, unsigned long long b, bool accumulate) {
  const int scale = accumulate ? 1 : 0;
  constexpr bool bf16 = mma::IsBf16<T>::value;
  if constexpr (N == 32) {
    if constexpr (bf16)
      asm volatile(KJIT_WGMMA_SS("m64n32k16", "bf16", KJIT_D16, "%16", "%17", "%18")
                   : KJIT_ACC16(0) : "l"(a), "l"(b), "r"(scale));
    else
      asm volatile(KJIT_WGMMA_SS("m64n32k16", "f16", KJIT_D16, "%16", "%17", "%18")
                   : KJIT_ACC16(0) : "l"(a), "l"(b), "r"(scale));
  } else if constexpr (N == 64) {
    if constexpr (bf16)
      asm volatile(KJIT_WGMMA_SS("m64n64k16", "bf16", KJIT_D32, "%32", "%33", "%34")
                   : KJIT_ACC16(0), KJIT_ACC16(4) : "l"(a), "l"(b), "r"(scale));
    else
      asm volatile(KJIT_WGMMA_SS("m64n64k16", "f16", KJIT_D32, "%32", "%33", "%34")
                   : KJIT_ACC16(0), KJIT_ACC16(4) : "l"(a), "l"(b), "r"(scale));
  } else {
    static_assert(N == 128, "N = 32, 64 or 128");
    if constexpr (bf16)
      asm volatile(KJIT_WGMMA_SS("m64n128k16", "bf16", KJIT_D64, "%64", "%65", "%66")
                   : KJIT_ACC16(0), KJIT_ACC16(4), KJIT_ACC16(8), KJIT_ACC16(12) : "l"(a), "l"(b), "r"(scale));
    else
      asm volatile(KJIT_WGMMA_SS("m64n128k16", "f16", KJIT_D64, "%64", "%65", "%66")
                   : KJIT_ACC16(0), KJIT_ACC16(4), KJIT_ACC16(8), KJIT_ACC16(12) : "l"(a), "l"(b), "r"(scale));
  }
}

// D (+)= A B, A: 64 x 16 in registers (this warp's mma.sync A fragment), B: 16 x N in
// shared memory, K-major (stored [N][16]) or, kTransposeB, MN-major (stored [16][N]).
// accumulate = false overwrites D.
#define KJIT_RS_CASE(shape, dlist, a, b, scale, ...)                                               \
  if constexpr (bf16 && kTransposeB)                                                               \
    asm volatile(KJIT_WGMMA_RS(shape, "bf16", dlist, a, b, scale, "1") : __VA_ARGS__);            \
  else if constexpr (bf16)                                                                         \
    asm volatile(KJIT_WGMMA_RS(shape, "bf16", dlist, a, b, scale, "0") : __VA_ARGS__);            \
  else if constexpr (kTransposeB)                                                                  \
    asm volatile(KJIT_WGMMA_RS(shape, "f16", dlist, a, b, scale, "1") : __VA_ARGS__);             \
  else                                                                                             \
    asm volatile(KJIT_WGMMA_RS(shape, "f16", dlist, a, b, scale, "0") : __VA_ARGS__);
template <typename T, int N, bool kTransposeB>
__device__ __forceinline__ void mma_registers(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long b,
                                              bool accumulate = true) {
  const int scale = accumulate ? 1 : 0;
  constexpr bool bf16 = mma::IsBf16<T>::value;
  if constexpr (N == 32) {
    KJIT_RS_CASE("m64n32k16", KJIT_D16, "{%16, %17, %18, %19}", "%20", "%21",
                 KJIT_ACC16(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale))
  } else if constexpr (N == 64) {
    KJIT_RS_CASE("m64n64k16", KJIT_D32, "{%32, %33, %34, %35}", "%36", "%37",
                 KJIT_ACC16(0), KJIT_ACC16(4) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale))
  } else {
    static_assert(N == 128, "N = 32, 64 or 128");
    KJIT_RS_CASE("m64n128k16", KJIT_D64, "{%64, %65, %66, %67}", "%68", "%69",
                 KJIT_ACC16(0), KJIT_ACC16(4), KJIT_ACC16(8), KJIT_ACC16(12)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale))
  }
}

// Attention's O += P V: P as kSteps A fragments of 16 keys, V's tile MN-major at
// descriptor v (16 keys = 16 rows of 128 bytes a step); only the first kUsedSteps (a tile's
// first kUsedSteps * 16 keys). Fenced and committed as one group.
template <typename T, int kHeadDim, int kSteps, int kUsedSteps = kSteps>
__device__ __forceinline__ void accumulate_probabilities(float (&o)[kHeadDim / 8][4], unsigned (&p)[kSteps][4],
                                                         unsigned long long v) {
  static_assert(kUsedSteps <= kSteps, "steps held in p");
  hold(p);
  hold(o);
  fence();
#pragma unroll
  for (int kk = 0; kk < kUsedSteps; ++kk) mma_registers<T, kHeadDim, /*transpose_b=*/true>(o, p[kk], v + kk * 16 * 128 / 16);
  commit();
}

#undef KJIT_RS_CASE
#undef KJIT_ACC4
#undef KJIT_ACC16
#undef KJIT_D16
#undef KJIT_D32
#undef KJIT_D64
#undef KJIT_WGMMA_SS
#undef KJIT_WGMMA_RS

}  // namespace kjit::wgmma
