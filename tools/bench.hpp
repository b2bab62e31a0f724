// GPU timing for the CLI: kernel benchmarks with CUDA events, copy bandwidth,
// and the engine's own overheads (compile, cache hits, launch).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kjit/kjit.hpp"

namespace kjit::tools {

struct BenchResult {
  std::string spec;
  std::map<std::string, std::int64_t> shape;
  double median_us = 0;
  double min_us = 0;
  // The same calls queued back to back (one event pair around all of them, per call): no
  // idle GPU waiting for each launch, as in a server's stream or graph.
  double back_to_back_us = 0;
  double bytes = 0;  // each input read once, each output written once
  double gbps = 0;
  double flops = 0;  // the useful floating-point operations of one call, where counted (prefill)
};

// Times a kernel on random inputs whose run-time axes come from `shape`;
// real parameters default to 1e-6 (eps) unless given in `reals`.
BenchResult bench_kernel(const Kernel& kernel, const std::map<std::string, std::int64_t>& shape,
                         const std::map<std::string, double>& reals, int iterations);

// Batch decode (plan + run) over a paged cache of batch_size requests of kv_len tokens
// each, pages in shuffled order (or in order: how much of the gap to contiguous K/V the
// scattered pages make); bytes are the KV read once plus q and the output.
// num_chunks > 0 fixes the KV split (else the planner chooses).
BenchResult bench_decode(Engine& engine, const std::string& spec, std::int64_t batch_size, std::int64_t kv_len,
                         int iterations, std::string* plan_text = nullptr, std::int64_t num_chunks = 0,
                         bool pages_in_order = false);

// Batch prefill over batch_size requests of seq_len queries and kv_len keys each (ragged,
// or paged when the spec says so: kv_len > seq_len is append attention); r.flops counts
// 4 * head_dim per visible (query, key) pair and head (two GEMMs), bytes are q, output, K and V once.
BenchResult bench_prefill(Engine& engine, const std::string& spec, std::int64_t batch_size, std::int64_t seq_len,
                          std::int64_t kv_len, int iterations);

// append_paged_kv_cache: seq_len new tokens at the end of each of batch_size requests of
// kv_len tokens; bytes are the new K/V read and written once.
BenchResult bench_append(Engine& engine, const std::string& spec, std::int64_t batch_size, std::int64_t new_tokens,
                         std::int64_t kv_len, int iterations);

// Device-to-device copy of 1 GiB, counting bytes read plus written (GB/s).
double copy_bandwidth_gbps();

struct OverheadResult {
  double cold_compile_ms = 0;      // NVRTC, in-process, new cache
  double nvrtc_ms = 0;             // NVRTC's own time within that
  double disk_hit_new_process_ms = 0;  // Engine + get + module load in a fresh process, warm disk cache
  double memory_hit_us = 0;        // Engine::get of a spec already loaded
  double bare_launch_us = 0;       // cuLaunchKernel, host side
  double kjit_launch_us = 0;       // Kernel::launch with pointers, host side
  double kjit_launch_dlpack_us = 0;  // Kernel::launch with DLTensors (checked), host side
};

// `self` is this executable's path (to time a cache hit in a new process).
// `shape` sizes the launch's buffers and integer arguments (as kjit bench's --shape; batch_size
// defaults to 1, other integers to 1).
OverheadResult measure_overhead(const std::string& spec, const std::string& self,
                                std::map<std::string, std::int64_t> shape = {});

// The child side: prints the milliseconds from Engine construction to a loaded kernel.
int overhead_child(const std::string& spec, const std::string& cache_dir);

}  // namespace kjit::tools
