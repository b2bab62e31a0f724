// Sorting-free sampling: a few passes over each row. A row lives in shared memory,
// split over a cluster of up to 8 blocks, so only its first pass reads global
// memory; in large batches one block streams each row from global memory (through a
// ring of shared-memory stages when the row is read more than once).
//
// Every filter kjit supports keeps an upper set of the row, S = {i : p_i >= t},
// so a sample from p restricted to S can be drawn by rejection without sorting:
//
//   round r:  draw a candidate j from p restricted to {p > lo}, then test it:
//             j in S iff  count(p > p_j) < k             (top-k)
//                         mass(p > p_j) < top_p * total  (top-p)
//                         p_j >= min_p * max(p)          (min-p)
//             accept, or raise lo to p_j (every token at or below p_j is outside S).
//
// A candidate drawn from a superset of S and kept only if it lies in S is exactly
// a draw from p restricted to S (tested filters draw four candidates a round and
// take the first inside S). A draw is two-level: each thread owns a chunk of the
// row and sums its eligible mass during the pass; an exponential race over the
// chunk sums (argmin E_t / S_t) picks a chunk with probability S_t / sum S, and a
// race over the chunk's elements (argmin E_i / p_i), run by the draw's kWarps / kDraws
// warps of the block holding the chunk (a vector a thread), picks the token with
// probability p_i / S_t. Random numbers come from Philox keyed by (seed, offset) and
// counted by (row, round, chunk or element), so the result does not depend on
// scheduling. The test of round r's candidate shares round r+1's pass.
// The blocks of a cluster push their sums into every block's shared memory and
// each combines them in rank order, so all take the same decisions.
// Each pass also counts the tokens and mass above a few pivot values: a pivot with
// k tokens (or top_p of the mass) above it is below the threshold, and lo jumps to
// it; this bounds the rounds top-k needs on long-tailed rows.
// Top-k then top-p (FlashInfer's "top_k_first") keeps the top-p set of the top-k
// tokens renormalized: a first phase finds the k-th largest value t exactly (radix
// select, 8 bits a pass), then draws are restricted to {p >= t} and top-p's mass test
// is against the mass of that set instead of the row's.
// Passes sum in fp32; a top-p test whose sums lie within their rounding error of the
// boundary is repeated on fp64 sums in the next pass, so the set is still exact.
// Sets are tie-inclusive: tokens equal to the boundary value are all in S.
// NaN and negative probabilities count as 0; a row with no positive entry, or one
// that has not converged after kMaxRounds, yields its largest entry.
#pragma once

#include "kjit/cluster.cuh"
#include "kjit/common.cuh"
#include "kjit/philox.cuh"

namespace kjit::sampling {

// top_k_top_p: both filters on the original row (joint); top_k_then_top_p: top-p of the
// renormalized top-k set.
enum class Filter { none, top_k, top_p, min_p, top_k_top_p, top_k_then_top_p };

struct RowParams {
  long long top_k;
  float top_p;
  float min_p;
  float inv_temperature;  // logits only: weights are exp((x - max) / temperature)
};

// Pivot values and the count / mass above each; nothing at all without pivots.
template <int N>
struct Pivots {
  float value[N];
  int count[N];
  float mass[N];
};
template <>
struct Pivots<0> {};

// A compile-time flag that a generic lambda can branch on.
template <bool kValue>
struct Constant {
  static constexpr bool value = kValue;
};

// What a pass sums in: fp32, or fp64 for a pass that repeats an undecided test.
template <bool kExact> struct SumType { using type = float; };
template <> struct SumType<true> { using type = double; };

// kBlocksPerRow: 0 streams each row from global memory with one block; 1..8 keeps
// the row in shared memory, split into that many slices, one per block of a cluster.
// kRingStages: a streamed row of 16-byte vectors goes through a ring of that many
// shared-memory stages (0: straight from global memory into registers).
template <typename T, int kVocab, int kVec, int kThreads, Filter kFilter, bool kLogits = false, int kBlocksPerRow = 0,
          int kRingStages = 0>
struct Sampler {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kMaxRounds = 64;
  static constexpr int kNone = 0x7fffffff;  // no token
  static constexpr bool kTopK = kFilter == Filter::top_k || kFilter == Filter::top_k_top_p;
  static constexpr bool kTopP = kFilter == Filter::top_p || kFilter == Filter::top_k_top_p || kFilter == Filter::top_k_then_top_p;
  static constexpr bool kTopKFirst = kFilter == Filter::top_k_then_top_p;  // a threshold phase, then top-p within it
  static constexpr bool kTested = kTopK || kTopP;  // candidates wait for a counting pass
  static constexpr int kPivots = kTested ? 8 : 0;
  // Candidates drawn per round. The kernel's time is its slowest row's, so tested
  // filters draw four: the first one inside S is taken (independent draws from a
  // superset, so still exact), and a row rarely needs more than two passes.
  static constexpr int kDraws = kTested ? 4 : 1;
  static constexpr int kVecsPerRow = kVocab / kVec;
  static constexpr bool kResident = kBlocksPerRow > 0;
  static constexpr int kCluster = kResident ? kBlocksPerRow : 1;
  static constexpr int kVecsPerBlock = (kVecsPerRow + kCluster - 1) / kCluster;
  // Dynamic shared memory the launch must give: one slice of the row.
  static constexpr int kSliceBytes = kResident ? (kVecsPerBlock * kVec * static_cast<int>(sizeof(T)) + 15) / 16 * 16 : 0;
  static constexpr int kUnroll = 4;
  static constexpr int kGroup = kVec < 4 ? kVec : 4;  // elements a pass looks at together
  // Passes sum in fp32 (fp64 adds and conversions took a third of a pass's issue time). A
  // thread adds at most kSumTerms entries, so its sums of these non-negative terms are
  // within kSumError of their value (relative). Tests closer than that to the boundary are
  // repeated with fp64 sums in the next pass, so every decision stays exact.
  // (16-bit logits sum in fp64 as before: those forms sit at the 128-register limit, and the
  // retest's extra state made them spill.)
  static constexpr bool kFastSums = !(kLogits && sizeof(T) == 2);
  static constexpr int kSumTerms = (kVecsPerBlock + kThreads - 1) / kThreads * kVec;
  static constexpr double kSumError = kSumTerms * 5.9604644775390625e-8 / (1.0 - kSumTerms * 5.9604644775390625e-8);
  // The ring is filled by the bulk copy engine: loads take no registers, and a pass
  // starts on what the ring still holds from the last one.
  static constexpr bool kRing = kRingStages > 0;
  static constexpr int kStageVecs = kThreads * 4;  // a stage: four vectors per thread, loaded together
  static constexpr int kStages = kRing ? kRingStages : 1;
  static constexpr int kRingBytes = kRing ? kStages * kStageVecs * 16 : 0;
  static constexpr int kRefillLag = 2;  // stages between a slot's read and its refill
  // Dynamic shared memory the launch gives: the row slice or the ring.
  static constexpr int kDynamicSharedBytes = kResident ? kSliceBytes : kRingBytes;
  static_assert(kVocab % kVec == 0, "vector width must divide the vocabulary");
  static_assert(kDraws <= 4 && kWarps % kDraws == 0, "one Philox lane per draw; every draw gets the same number of warps");
  static_assert((kWarps & (kWarps - 1)) == 0 && kWarps <= 32, "warp 0 reduces the warps' partials in a butterfly");
  static_assert(kBlocksPerRow >= 0 && kBlocksPerRow <= 8, "a portable cluster has at most 8 blocks");
  static_assert(!kRing || (!kResident && kVec * sizeof(T) == 16 && kStages <= 32 && kStages > kRefillLag), "the ring streams 16-byte vectors");
  static_assert(kVecsPerBlock * (kCluster - 1) < kVecsPerRow, "every block of a row needs a non-empty slice");

  struct Partial {
    float key[kDraws];     // chunk races: smallest E_t / S_t
    int index[kDraws];     // their chunks (block rank * kThreads + thread)
    int count[kDraws];     // tokens above each pending candidate
    double mass[kDraws];   // their mass
    double total;          // mass of the row (round 0)
    float max;             // largest entry (round 0)
    int argmax;
  };

  // What a block contributes to a round: its Partial and its pivot sums.
  struct BlockSums {
    Partial part;
    int pivot_count[kPivots > 0 ? kPivots : 1];
    float pivot_mass[kPivots > 0 ? kPivots : 1];
  };

  struct Candidate {
    int token;
    float p;
  };

  // A team of warps' best element of a race: smallest key, then lowest token.
  struct RaceEntry {
    float key;
    int token;
    float p;
  };

  struct Shared {
    Partial warp_partials[kWarps];
    int pivot_count[kPivots > 0 ? kPivots : 1];
    float pivot_mass[kPivots > 0 ? kPivots : 1];
    BlockSums published[kCluster];  // written by each block of the cluster into every block
    Candidate candidate[kDraws];    // written by the block that ran the draw into every block
    RaceEntry race[kWarps];         // each warp's best element of its draw's race
    float block_max[kCluster];
    unsigned long long slice_loaded;  // mbarrier of the bulk copy
    unsigned long long stage_loaded[kStages];  // the ring's mbarriers: a stage has arrived
    unsigned long long stage_read[kStages];    // and every warp has read it
    // Top-k first: digit histograms (two, so a pass never clears bins a peer still reads).
    int radix_bins[kTopKFirst ? 2 : 1][kTopKFirst ? 256 : 1];
    int radix_total[kTopKFirst ? 256 : 1];
    int radix_digit, radix_above;
  };

  static __device__ __forceinline__ float clean(float p) { return p > 0.f ? p : 0.f; }  // NaN, negatives, -0 -> +0

  // The unnormalized probability of an entry: itself, or for logits the softmax
  // weight exp((x - max) / T) in (0, 1] (NaN logits weigh 0). The filters only
  // compare weights and ratios of sums, so normalization is never needed.
  static __device__ __forceinline__ float weight(float x, float max_logit, float scale_log2) {
    if constexpr (kLogits) return x == x ? exp2f((x - max_logit) * scale_log2) : 0.f;
    else return clean(x);
  }

  static __device__ __forceinline__ unsigned rank() { return kCluster > 1 ? blockIdx.x % kCluster : 0u; }

  // Orders writes into peers' shared memory (or, for one block, the block's own).
  static __device__ __forceinline__ void group_sync() {
    if constexpr (kCluster > 1) cluster::sync();
    else __syncthreads();
  }

  template <typename V>
  static __device__ __forceinline__ void push_to_all(V* local_slot, const V& value) {
    if constexpr (kCluster > 1) {
#pragma unroll
      for (unsigned r = 0; r < kCluster; ++r) *cluster::map(local_slot, r) = value;
    } else {
      *local_slot = value;
    }
  }

  // a combined with b. Only the fields the filter reads are combined, and the row's
  // totals only in a pass that takes them (whole).
  static __device__ __forceinline__ Partial combine(Partial a, const Partial& b, bool whole) {
#pragma unroll
    for (int d = 0; d < kDraws; ++d) {
      if (b.key[d] < a.key[d] || (b.key[d] == a.key[d] && b.index[d] < a.index[d])) {
        a.key[d] = b.key[d];
        a.index[d] = b.index[d];
      }
      if constexpr (kTopK) a.count[d] += b.count[d];
      if constexpr (kTopP) a.mass[d] += b.mass[d];
    }
    if (whole) {
      a.total += b.total;
      if (b.max > a.max || (b.max == a.max && b.argmax < a.argmax)) { a.max = b.max; a.argmax = b.argmax; }
    }
    return a;
  }

  // v combined with the lane `offset` away (xor). Both lanes compute the same value:
  // every combination is symmetric.
  static __device__ __forceinline__ Partial combine_lane(const Partial& v, int offset, bool whole) {
    Partial o = v;
#pragma unroll
    for (int d = 0; d < kDraws; ++d) {
      o.key[d] = __shfl_xor_sync(0xffffffffu, v.key[d], offset);
      o.index[d] = __shfl_xor_sync(0xffffffffu, v.index[d], offset);
      if constexpr (kTopK) o.count[d] = __shfl_xor_sync(0xffffffffu, v.count[d], offset);
      if constexpr (kTopP) o.mass[d] = __shfl_xor_sync(0xffffffffu, v.mass[d], offset);
    }
    if (whole) {
      o.total = __shfl_xor_sync(0xffffffffu, v.total, offset);
      o.max = __shfl_xor_sync(0xffffffffu, v.max, offset);
      o.argmax = __shfl_xor_sync(0xffffffffu, v.argmax, offset);
    }
    return combine(v, o, whole);
  }

  // The block's sums, valid in warp 0 only: each warp reduces its lanes, then warp 0
  // reduces the warps'. (Every thread combining all warps' partials in turn took a
  // tenth of top-p's time.)
  static __device__ Partial block_reduce(Partial v, bool whole, Shared& shared) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = combine_lane(v, offset, whole);
    if (threadIdx.x % 32 == 0) shared.warp_partials[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
      v = shared.warp_partials[threadIdx.x % kWarps];  // xor offsets below kWarps stay in a group of kWarps lanes
#pragma unroll
      for (int offset = kWarps / 2; offset > 0; offset /= 2) v = combine_lane(v, offset, whole);
    }
    return v;
  }

  static __device__ __forceinline__ unsigned pick(const uint4& bits, int i) {
    return (i & 3) == 0 ? bits.x : (i & 3) == 1 ? bits.y : (i & 3) == 2 ? bits.z : bits.w;
  }

  // f(v, x) for this thread's vectors x = src[v * kVec ...] of src[0, vecs * kVec), with
  // kUnroll loads in flight before any is used: when src is global memory, bytes in
  // flight set the pass time.
  template <typename F>
  static __device__ __forceinline__ void for_each_vector(const T* src, int vecs, F&& f) {
    for (int base = threadIdx.x; base < vecs; base += kThreads * kUnroll) {
      Vec<T, kVec> xs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < vecs) xs[u].load(src + (base + u * kThreads) * kVec);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < vecs) f(base + u * kThreads, xs[u]);
    }
  }

  // Where a pass reads this block's vectors: global memory, its resident slice, or
  // global memory through the ring.
  struct Stream {
    const T* global;
    const T* local;    // the slice, or the ring's first slot
    bool ring;
    unsigned passes;   // ring passes run so far
    int base;          // the slot the last ring pass read first
    unsigned phase;    // bit s: the parity slot s's mbarrier completes next (every thread tracks alike)
    unsigned read_phase;  // bit s: flipped each time the block reads slot s (every thread tracks alike)
  };

  // f(v, x) for each of this thread's vectors: v % kThreads == threadIdx.x whatever
  // the source, so a thread's chunk is the same in every pass.
  template <typename F>
  static __device__ __forceinline__ void read_row(Stream& s, int vecs, Shared& shared, F&& f) {
    if constexpr (kRing) {
      if (s.ring) return ring_pass(s, vecs, shared, f);
    }
    for_each_vector(s.local != nullptr ? s.local : s.global, vecs, f);
  }

  // A pass over the row in stages of kStageVecs vectors through kStages slots. Each warp
  // releases a slot once it has read it, and thread 0 refills the slot read kRefillLag
  // stages ago once every warp has released it: no block-wide barrier a stage. Passes
  // alternate direction, so each starts on the stages the last one read last, which
  // still sit in the ring and are read again with no copy. Step i of a pass reads slot
  // base + i going forwards, base - i going backwards.
  template <typename F>
  static __device__ void ring_pass(Stream& s, int vecs, Shared& shared, F&& f) {
    const int stages = (vecs + kStageVecs - 1) / kStageVecs;
    const bool backwards = s.passes % 2 == 1;
    const int resident = s.passes == 0 ? 0 : min(stages, kStages);
    const int base = s.passes == 0 ? 0 : ((s.base + (backwards ? stages - 1 : 1 - stages)) % kStages + kStages) % kStages;
    auto slot_of = [&](int i) { return ((backwards ? base - i : base + i) % kStages + kStages) % kStages; };
    auto first_of = [&](int i) { return (backwards ? stages - 1 - i : i) * kStageVecs; };
    auto fill = [&](int i, int slot) {
      const int first = first_of(i);
      const unsigned bytes = static_cast<unsigned>(min(kStageVecs, vecs - first)) * 16u;
      bulk::barrier_expect_bytes(&shared.stage_loaded[slot], bytes);
      bulk::copy(const_cast<T*>(s.local) + slot * kStageVecs * kVec, s.global + first * kVec, bytes, &shared.stage_loaded[slot]);
    };
    if (threadIdx.x == 0)
      for (int i = resident; i < min(stages, kStages); ++i) fill(i, slot_of(i));
    for (int i = 0, slot = base; i < stages; ++i) {
      const int first = first_of(i);
      if (i >= resident) {
        bulk::barrier_wait(&shared.stage_loaded[slot], (s.phase >> slot) & 1u);
        s.phase ^= 1u << slot;
      }
      const int count = min(kStageVecs, vecs - first);
      const T* stage = s.local + slot * kStageVecs * kVec;
#pragma unroll
      for (int j = 0; j < kStageVecs / kThreads; ++j) {
        const int at = static_cast<int>(threadIdx.x) + j * kThreads;
        if (at < count) {
          Vec<T, kVec> x;
          x.load(stage + at * kVec);
          f(first + at, x);
        }
      }
      __syncwarp();  // the warp's reads of the slot are done
      if (threadIdx.x % 32 == 0) bulk::barrier_arrive(&shared.stage_read[slot]);
      s.read_phase ^= 1u << slot;
      // The slot of stage i - kRefillLag was released by this warp then; the others have
      // most likely released it too. (A slot is read once between refills, so its release
      // barrier is at most one phase ahead of the parity tracked here.)
      const int done = i - kRefillLag;
      if (threadIdx.x == 0 && done >= 0 && done + kStages < stages) {
        const int done_slot = slot_of(done);
        bulk::barrier_wait(&shared.stage_read[done_slot], ((s.read_phase >> done_slot) & 1u) ^ 1u);
        fill(done + kStages, done_slot);
      }
      slot = backwards ? (slot == 0 ? kStages - 1 : slot - 1) : (slot == kStages - 1 ? 0 : slot + 1);
    }
    s.base = base;
    ++s.passes;
  }

  // Resident rows: this block's slice into shared memory, by the bulk copy engine
  // when the slice is 16-byte aligned, else by ordinary loads. Also makes sure
  // every block of the cluster runs before any writes into a peer.
  static __device__ void load_slice(const T* g, int vecs, T* slice, Shared& shared) {
    const unsigned bytes = static_cast<unsigned>(vecs) * kVec * sizeof(T);
    const bool bulk = (reinterpret_cast<unsigned long long>(g) & 15) == 0 && bytes % 16 == 0;
    if (bulk && threadIdx.x == 0) {
      bulk::barrier_init(&shared.slice_loaded, 1);
      bulk::barrier_expect_bytes(&shared.slice_loaded, bytes);
      constexpr unsigned kPiece = 32768;  // several copies in flight
      for (unsigned at = 0; at < bytes; at += kPiece)
        bulk::copy(reinterpret_cast<char*>(slice) + at, reinterpret_cast<const char*>(g) + at,
                   bytes - at < kPiece ? bytes - at : kPiece, &shared.slice_loaded);
    }
    if (!bulk) for_each_vector(g, vecs, [&](int v, const Vec<T, kVec>& x) { x.store(slice + v * kVec); });
    group_sync();
    if (bulk) bulk::barrier_wait(&shared.slice_loaded, 0);
  }

  // Top-k first: the k-th largest weight t, tie-inclusive ({w >= t} has at least k
  // entries, {w > t} fewer). Weights are non-negative floats, which order as their bit
  // patterns; each pass histograms the next 8 bits of the entries that share the bits
  // found so far, and keeps the lowest non-empty bin with fewer than k entries above it.
  static __device__ float top_k_threshold(Stream& src, int vecs, long long k, float max_logit, float scale_log2,
                                          Shared& shared) {
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0, mask = 0;
    int above = 0;  // entries above the current prefix's range (always < k)
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      int* bins = shared.radix_bins[pass % 2];
      for (int i = threadIdx.x; i < 256; i += kThreads) bins[i] = 0;
      __syncthreads();
      read_row(src, vecs, shared, [&](int, const Vec<T, kVec>& x) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const unsigned key = __float_as_uint(weight(to_float(x[j]), max_logit, scale_log2));
          if ((key & mask) == prefix) atomicAdd(&bins[(key >> shift) & 0xffu], 1);
        }
      });
      group_sync();  // every block's bins are complete (and visible to its peers)
      for (int i = threadIdx.x; i < 256; i += kThreads) {
        int c = 0;
#pragma unroll
        for (unsigned r = 0; r < kCluster; ++r) c += kCluster > 1 ? *cluster::map(&bins[i], r) : bins[i];
        shared.radix_total[i] = c;
      }
      __syncthreads();
      if (threadIdx.x < 32) {  // lane l holds bins 8l .. 8l + 7
        int c[8], lane_sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) { c[i] = shared.radix_total[lane * 8 + i]; lane_sum += c[i]; }
        int suffix = lane_sum;  // entries in this lane's bins and all higher ones
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
          const int v = __shfl_down_sync(0xffffffffu, suffix, o);
          if (lane + o < 32) suffix += v;
        }
        int over = above + suffix - lane_sum;  // entries above bin 8l + 7
        int best = -1, best_above = 0;
#pragma unroll
        for (int i = 7; i >= 0; --i) {
          if (c[i] > 0 && over < k) { best = lane * 8 + i; best_above = over; }
          over += c[i];
        }
        // Qualifying bins run down from the top one (which always qualifies), so the
        // lowest one is in the lowest lane that has any.
        const int from = __ffs(__ballot_sync(0xffffffffu, best >= 0)) - 1;
        best = __shfl_sync(0xffffffffu, best, from);
        best_above = __shfl_sync(0xffffffffu, best_above, from);
        if (lane == 0) { shared.radix_digit = best; shared.radix_above = best_above; }
      }
      __syncthreads();
      prefix |= static_cast<unsigned>(shared.radix_digit) << shift;
      mask |= 0xffu << shift;
      above = shared.radix_above;
    }
    return __uint_as_float(prefix);
  }

  static __device__ void run(const T* __restrict__ probs, int* __restrict__ samples, RowParams params,
                             unsigned long long seed, unsigned long long offset) {
    __shared__ Shared shared;
    extern __shared__ __align__(16) unsigned char slice_storage[];
    const long long row = blockIdx.x / kCluster;
    const unsigned my_rank = rank();
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const T* p_row = probs + row * kVocab;
    // This block's vectors [first_vec, first_vec + vecs) of the row, read from src.
    const int first_vec = static_cast<int>(my_rank) * kVecsPerBlock;
    const int vecs = kResident ? min(kVecsPerBlock, kVecsPerRow - first_vec) : kVecsPerRow;
    Stream src{p_row, nullptr, false, 0u, 0, 0u, 0u};
    if constexpr (kResident) {
      T* slice = reinterpret_cast<T*>(slice_storage);
      load_slice(p_row + first_vec * kVec, vecs, slice, shared);
      src.local = slice;
    }
    if constexpr (kRing) {
      src.ring = (reinterpret_cast<unsigned long long>(probs) & 15) == 0;  // every row then is: 16 | kVocab * sizeof(T)
      if (src.ring) {
        src.local = reinterpret_cast<const T*>(slice_storage);
        if (threadIdx.x == 0)
          for (int i = 0; i < kStages; ++i) {
            bulk::barrier_init(&shared.stage_loaded[i], 1);
            bulk::barrier_init(&shared.stage_read[i], kWarps);
          }
        __syncthreads();
      }
    }
    const int first_chunk = static_cast<int>(my_rank) * kThreads;

    random::Philox4x32 philox;
    philox.key = make_uint2(static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32) ^ static_cast<unsigned>(offset >> 32));
    philox.counter = make_uint4(0, static_cast<unsigned>(row), 0, static_cast<unsigned>(offset));

    float lo = 0.f;     // draws are from {p > lo}
    float floor = 0.f;  // min-p: and from {p >= floor} once the row maximum is known
    int candidate[kDraws];
    float candidate_p[kDraws];  // +inf where no candidate is pending, so no entry lies above it
#pragma unroll
    for (int d = 0; d < kDraws; ++d) { candidate[d] = -1; candidate_p[d] = __int_as_float(0x7f800000); }
    double total = 0.0;  // fp32-summed in round 0; fp64 after a retest pass
    float row_max = 0.f;
    int row_argmax = 0;
    // The token, or -1: none yet; kRetest: the last pass could not decide a candidate, so
    // the next one sums in fp64 and tests it again (kept in result: no register to spare).
    constexpr int kRetest = -2;
    int result = -1;
    Pivots<kPivots> pivots;
    if constexpr (kPivots > 0) {
#pragma unroll
      for (int j = 0; j < kPivots; ++j) pivots.value[j] = __int_as_float((127 - 2 * (kPivots - j)) << 23);  // 2^-16 .. 1/4
    }

    // Logits: one pass for the row maximum first, so every weight is exp of a value <= 0.
    float max_logit = 0.f;
    const float scale_log2 = params.inv_temperature * 1.4426950408889634f;  // log2(e) / T
    if constexpr (kLogits) {
      float m = -__int_as_float(0x7f800000);
      read_row(src, vecs, shared, [&](int, const Vec<T, kVec>& x) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) m = fmaxf(m, to_float(x[j]));  // fmaxf skips NaN
      });
#pragma unroll
      for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) shared.warp_partials[warp].max = m;
      __syncthreads();
      m = shared.warp_partials[0].max;
      for (int w = 1; w < kWarps; ++w) m = fmaxf(m, shared.warp_partials[w].max);
      if (threadIdx.x < kCluster) *(kCluster > 1 ? cluster::map(&shared.block_max[my_rank], threadIdx.x) : &shared.block_max[0]) = m;
      group_sync();
      m = shared.block_max[0];
      for (int b = 1; b < kCluster; ++b) m = fmaxf(m, shared.block_max[b]);
      max_logit = m;
      if (!(max_logit > -__int_as_float(0x7f800000))) max_logit = 0.f;  // all -inf / NaN: every weight is 0
    }

    if constexpr (kTopKFirst) floor = top_k_threshold(src, vecs, params.top_k, max_logit, scale_log2, shared);

    for (int round = 0; round <= kMaxRounds && result < 0; ++round) {
      const bool exact = kFastSums && result == kRetest;
      const bool whole = round == 0 || exact;  // a pass that takes the row's totals
      Partial part;
#pragma unroll
      for (int d = 0; d < kDraws; ++d) {
        part.key[d] = __int_as_float(0x7f800000);
        part.index[d] = kNone;
        part.count[d] = 0;
        part.mass[d] = 0.0;
      }
      part.total = 0.0;
      part.max = -1.f;
      part.argmax = kNone;
      float chunk = 0.f;  // this thread's eligible mass (it only weighs the chunk in its race)
      float gate = __int_as_float(0x7f800000);  // the lowest pending candidate's probability
#pragma unroll
      for (int d = 0; d < kDraws; ++d) gate = fminf(gate, candidate_p[d]);
      // Counting above the pivots costs as much as the rest of a pass, and only pays when
      // candidates get rejected. A draw lies in the top-p set with probability at least
      // top_p, so with top-p alone and top_p >= 1/2 the first two rounds (which four
      // draws nearly always end) leave it out.
      const bool count_pivots = !exact && (kTopK || round >= 2 || params.top_p < 0.5f);
      float pivot_gate = __int_as_float(0x7f800000);  // no element is above it
      if constexpr (kPivots > 0) {
#pragma unroll
        for (int q = 0; q < kPivots; ++q) { pivots.count[q] = 0; pivots.mass[q] = 0.f; }
        if (count_pivots) pivot_gate = pivots.value[0];
      }
      // One pass. The common path per element is a compare and an add; the rarer work
      // (round 0's totals, counting above candidates and pivots) is gated per vector, so
      // the pass is not made of branches (it was: 40 instructions an element).
      auto visit = [&](auto first_round, auto exact_sums) {
        using Sum = typename SumType<decltype(exact_sums)::value || !kFastSums>::type;
        constexpr bool kTotal = decltype(first_round)::value || decltype(exact_sums)::value;
        Sum total_sum = 0, mass_sum[kDraws];
#pragma unroll
        for (int d = 0; d < kDraws; ++d) mass_sum[d] = 0;
        read_row(src, vecs, shared, [&](int v, const Vec<T, kVec>& x) {
          float eligible = 0.f;
#pragma unroll
          for (int g = 0; g < kVec; g += kGroup) {  // groups of four: 16-bit vectors of eight would spill
            float p[kGroup];
#pragma unroll
            for (int j = 0; j < kGroup; ++j) p[j] = weight(to_float(x[g + j]), max_logit, scale_log2);
            float top = p[0];
#pragma unroll
            for (int j = 1; j < kGroup; ++j) top = fmaxf(top, p[j]);
            if constexpr (kTotal) {
#pragma unroll
              for (int j = 0; j < kGroup; ++j)
                if (!kTopKFirst || p[j] >= floor) total_sum += p[j];  // top-k first: the mass of the top-k set
            }
            if constexpr (decltype(first_round)::value) {
              const int first = (first_vec + v) * kVec + g;  // passes may run backwards: ties go to the lowest index
              if (top > part.max || (top == part.max && first < part.argmax)) {
                int j = kGroup - 1;
#pragma unroll
                for (int k = kGroup - 2; k >= 0; --k)
                  if (p[k] == top) j = k;
                part.max = top;
                part.argmax = first + j;
              }
            }
            if constexpr (kTested) {
              if (top > gate) {  // above the lowest pending candidate: rare, candidates are likely tokens
#pragma unroll
                for (int j = 0; j < kGroup; ++j)
#pragma unroll
                  for (int d = 0; d < kDraws; ++d)
                    if (p[j] > candidate_p[d]) {
                      ++part.count[d];
                      mass_sum[d] += p[j];
                    }
              }
            }
            if constexpr (!decltype(exact_sums)::value) {  // an fp64 pass only decides: no draws, no pivots
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                const bool in = kFilter == Filter::min_p || kTopKFirst ? p[j] > lo && p[j] >= floor : p[j] > lo;
                eligible += in ? p[j] : 0.f;
              }
            }
            if constexpr (kPivots > 0) {
              if constexpr (!decltype(exact_sums)::value) {
                if (top > pivot_gate) {  // pivots ascend: most of a long tail stops here
#pragma unroll
                  for (int j = 0; j < kGroup; ++j)
#pragma unroll
                    for (int q = 0; q < kPivots; ++q)
                      if (p[j] > pivots.value[q]) {
                        if constexpr (kTopK) ++pivots.count[q];
                        if constexpr (kTopP) pivots.mass[q] += p[j];
                      }
                }
              }
            }
          }
          chunk += eligible;
        });
        part.total = total_sum;
#pragma unroll
        for (int d = 0; d < kDraws; ++d) part.mass[d] = mass_sum[d];
      };
      if (round == 0) visit(Constant<true>{}, Constant<false>{});
      else if (!exact) visit(Constant<false>{}, Constant<false>{});
      else visit(Constant<false>{}, Constant<true>{});
      // The chunk races: one Philox call gives every draw its exponential.
      philox.counter.x = first_chunk + threadIdx.x;
      philox.counter.z = 2u * round;
      if (chunk > 0.f) {
        const uint4 bits = philox();
#pragma unroll
        for (int d = 0; d < kDraws; ++d) {
          part.key[d] = random::exponential(pick(bits, d)) / chunk;
          part.index[d] = first_chunk + threadIdx.x;
        }
      }
      if constexpr (kPivots > 0) if (count_pivots) {
        if (threadIdx.x < kPivots) { shared.pivot_count[threadIdx.x] = 0; shared.pivot_mass[threadIdx.x] = 0.f; }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kPivots; ++q) {
          int c = pivots.count[q];
          float m = pivots.mass[q];
#pragma unroll
          for (int o = 16; o > 0; o /= 2) {
            if constexpr (kTopK) c += __shfl_xor_sync(0xffffffffu, c, o);
            if constexpr (kTopP) m += __shfl_xor_sync(0xffffffffu, m, o);
          }
          if (lane == 0) {
            if constexpr (kTopK) atomicAdd(&shared.pivot_count[q], c);
            if constexpr (kTopP) atomicAdd(&shared.pivot_mass[q], m);
          }
        }
      }
      {
        // Block sums (block_reduce's barrier also orders the pivot sums), pushed to
        // every block of the row and combined there in rank order.
        BlockSums mine;
        mine.part = block_reduce(part, whole, shared);
        if constexpr (kPivots > 0) {
#pragma unroll
          for (int q = 0; q < kPivots; ++q) { mine.pivot_count[q] = shared.pivot_count[q]; mine.pivot_mass[q] = shared.pivot_mass[q]; }
        }
        if (threadIdx.x < kCluster)
          *(kCluster > 1 ? cluster::map(&shared.published[my_rank], threadIdx.x) : &shared.published[0]) = mine;
      }
      group_sync();
      Partial r = shared.published[0].part;
#pragma unroll
      for (int b = 1; b < kCluster; ++b) r = combine(r, shared.published[b].part, whole);
      const float drawn_lo = lo, drawn_floor = floor;  // the eligibility the chunk sums were taken with
      if (exact) total = r.total;
      if (round == 0) {
        total = r.total;
        row_max = r.max;
        row_argmax = r.max > 0.f ? r.argmax : 0;
        if constexpr (kFilter == Filter::min_p) floor = fminf(fmaxf(params.min_p, 0.f), 1.f) * row_max;
      }
      // fp32 sums decide a top-p test only when they are further than their error from
      // the boundary (both mass and total may be off by kSumError of the total).
      const double margin = exact || !kFastSums ? 0.0 : 2.5 * kSumError * total;
      bool unsure = false;
      if constexpr (kTested) {  // test the pending candidates, in draw order
#pragma unroll
        for (int d = 0; d < kDraws; ++d) {
          if (candidate[d] < 0 || result >= 0 || unsure) continue;
          bool in_set = true;
          if constexpr (kTopK) in_set = in_set && r.count[d] < params.top_k;
          if constexpr (kTopP) {
            const double limit = static_cast<double>(params.top_p) * total;
            if (in_set && r.mass[d] >= limit + margin) in_set = false;
            else if (kFastSums && in_set && !(r.mass[d] < limit - margin)) unsure = true;  // this one and the later ones wait
          }
          if (unsure) continue;
          if (in_set) {
            result = candidate[d];
          } else {
            lo = fmaxf(lo, candidate_p[d]);
            candidate[d] = -1;
            candidate_p[d] = __int_as_float(0x7f800000);
          }
        }
        if (result >= 0) break;
      }
      // Pivots with k tokens, or top_p of the mass, strictly above them lie below the threshold.
      // Pivot masses are fp32 sums, within and across threads (a few dozen more additions),
      // and total may be one too, so top-p asks for a margin that covers their rounding.
      constexpr double kPivotSumError = (kSumTerms + 64 + kCluster) * 5.9604644775390625e-8;
      const double pivot_margin = 2.5 * (kPivotSumError > 4e-5 ? kPivotSumError : 4e-5) + (exact || !kFastSums ? 0.0 : 2.5 * kSumError);
      if constexpr (kPivots > 0) if (count_pivots) {
#pragma unroll
        for (int q = 0; q < kPivots; ++q) {
          int count = 0;
          float mass = 0.f;
#pragma unroll
          for (int b = 0; b < kCluster; ++b) { count += shared.published[b].pivot_count[q]; mass += shared.published[b].pivot_mass[q]; }
          bool below = false;
          if constexpr (kTopK) below = below || count >= params.top_k;
          if constexpr (kTopP)
            below = below || static_cast<double>(mass) >= static_cast<double>(params.top_p) * total + pivot_margin * total;
          if (below) lo = fmaxf(lo, pivots.value[q]);
        }
      }
      // An undecided candidate waits, with the later ones, for a pass with fp64 sums; that
      // pass only decides, and the pass after it draws again.
      const bool draw = !unsure && !exact;
      result = unsure ? kRetest : -1;
      if (draw && r.index[0] == kNone) { result = row_argmax; break; }  // nothing to draw from: no positive entry

      // The element races inside the winning chunks. Draw d runs in the block holding its
      // chunk, on warps d, d + kDraws, ...: a thread takes one of the chunk's vectors or
      // a few (one warp walking a chunk alone took a seventh of top-p's time, latency).
      constexpr int kTeams = kWarps / kDraws;
      const int draw_id = warp % kDraws;
      int chunk_id = r.index[0];
#pragma unroll
      for (int d = 1; d < kDraws; ++d)
        if (draw_id == d) chunk_id = r.index[d];
      const bool race_here = draw && chunk_id / kThreads == static_cast<int>(my_rank);
      if (race_here) {
        RaceEntry best{__int_as_float(0x7f800000), kNone, 0.f};
        philox.counter.z = 2u * round + 1u + 256u * static_cast<unsigned>(draw_id);
        const T* chunk_src = kResident ? src.local : src.global;
        constexpr int kStride = kTeams * 32 * kThreads;
        for (int v = chunk_id % kThreads + (warp / kDraws * 32 + lane) * kThreads; v < vecs; v += kStride) {
          Vec<T, kVec> x;
          x.load(chunk_src + v * kVec);
#pragma unroll
          for (int g = 0; g < kVec; g += 4) {  // a Philox call for each four elements
            philox.counter.x = static_cast<unsigned>(((first_vec + v) * kVec + g) / 4);
            const uint4 bits = philox();
#pragma unroll
            for (int j = g; j < g + 4 && j < kVec; ++j) {
              const int i = (first_vec + v) * kVec + j;
              const float p = weight(to_float(x[j]), max_logit, scale_log2);
              if (p > drawn_lo && p >= drawn_floor && p > 0.f) {
                const float key = random::exponential(pick(bits, i)) / p;
                if (key < best.key || (key == best.key && i < best.token)) best = RaceEntry{key, i, p};
              }
            }
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) {
          const RaceEntry other{__shfl_xor_sync(0xffffffffu, best.key, o), __shfl_xor_sync(0xffffffffu, best.token, o),
                                __shfl_xor_sync(0xffffffffu, best.p, o)};
          if (other.key < best.key || (other.key == best.key && other.token < best.token)) best = other;
        }
        if (lane == 0) shared.race[warp] = best;
      }
      __syncthreads();  // the teams' winners are in shared memory
      if (race_here && warp < kDraws && lane < kCluster) {
        RaceEntry best = shared.race[warp];
#pragma unroll
        for (int t = 1; t < kTeams; ++t) {
          const RaceEntry other = shared.race[warp + t * kDraws];
          if (other.key < best.key || (other.key == best.key && other.token < best.token)) best = other;
        }
        *(kCluster > 1 ? cluster::map(&shared.candidate[warp], lane) : &shared.candidate[warp]) = Candidate{best.token, best.p};
      }
      group_sync();  // candidates are in every block; the published sums have been read
      if (!draw) continue;
#pragma unroll
      for (int d = 0; d < kDraws; ++d) {
        const Candidate c = shared.candidate[d];
        candidate[d] = c.token == kNone ? -1 : c.token;  // kNone cannot happen: the chunk had mass
        candidate_p[d] = c.token == kNone ? __int_as_float(0x7f800000) : c.p;
      }
      if constexpr (kFilter == Filter::none) result = candidate[0];
      if constexpr (kFilter == Filter::min_p) {
        // Tested at once; after round 0 the draw is inside S, so round 1 always accepts.
        if (candidate[0] >= 0 && candidate_p[0] >= floor) result = candidate[0];
        else candidate[0] = -1;
      }
      if constexpr (kPivots > 0) {
#pragma unroll
        for (int d = 0; d < kDraws; ++d)
          if (candidate_p[d] <= lo) {  // already known to be outside S
            candidate[d] = -1;
            candidate_p[d] = __int_as_float(0x7f800000);
          }
        // Next pivots, ascending: geometric between the floor of the search and the row maximum.
        const float base = fmaxf(lo, row_max * 5.9604645e-8f);  // 2^-24 of the maximum
#pragma unroll
        for (int q = 0; q < kPivots; ++q)
          pivots.value[q] = base * exp2f(log2f(row_max / base) * static_cast<float>(q + 1) / static_cast<float>(kPivots + 1));
      }
      if (result < 0 && candidate[0] < 0 && kFilter == Filter::none) result = row_argmax;
    }
    if (result < 0) result = row_argmax;  // did not converge in kMaxRounds
    if (my_rank == 0 && threadIdx.x == 0) samples[row] = result;
  }
};

}  // namespace kjit::sampling
