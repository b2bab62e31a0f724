// kjit: the command-line tool. Exit codes: 0 ok, 1 failure, 2 bad usage or bad input.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "api/artifact_metadata.hpp"
#include "bench.hpp"
#include "cache/bundle.hpp"
#include "cache/disk_cache.hpp"
#include "compile/nvrtc.hpp"
#include "kjit/kjit.hpp"
#include "runtime/driver.hpp"
#include "spec/config.hpp"

namespace {

using namespace kjit;

// A SPEC argument is inline JSON or the path of a JSON file.
std::string read_spec(const std::string& arg) {
  std::size_t b = arg.find_first_not_of(" \t\r\n");
  if (b != std::string::npos && arg[b] == '{') return arg;
  std::ifstream in(arg);
  if (!in) throw SpecError(fmt::format("spec \"{}\" is neither inline JSON nor a readable file", arg));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, sep);)
    if (!part.empty()) out.push_back(part);
  return out;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (b >= 1024 && u < 3) { b /= 1024; ++u; }
  return fmt::format("{:.1f} {}", b, units[u]);
}

int cmd_doctor() {
  std::string why;
  int problems = 0;
  fmt::print("kjit {}\n", kjit::version());
  if (runtime::driver_available(&why)) {
    int version = 0;
    runtime::driver().driver_version(&version);
    fmt::print("driver:        CUDA {}.{}\n", version / 1000, (version % 1000) / 10);
    for (int i = 0; i < runtime::device_count(); ++i) {
      auto d = runtime::device_info(i);
      fmt::print("gpu {}:         {} (sm_{}{}, {} SMs, {}) -> arch {}\n", i, d.name, d.major, d.minor, d.multiprocessors,
                 human_bytes(static_cast<double>(d.memory_bytes)), runtime::device_arch(i));
    }
  } else {
    fmt::print("driver:        none ({}); kernels can still be compiled with --arch\n", why);
  }
  if (compile::nvrtc_available(&why)) fmt::print("nvrtc:         {}\n", compile::nvrtc_version());
  else { fmt::print("nvrtc:         unavailable ({})\n", why); ++problems; }
  std::string include = compile::cuda_include_dir();
  if (include.empty()) { fmt::print("cuda headers:  not found (set KJIT_CUDA_INCLUDE or CUDA_HOME)\n"); ++problems; }
  else fmt::print("cuda headers:  {}\n", include);
  cache::DiskCache cache(cache::DiskCache::default_dir(), 0);
  auto files = cache.list();
  double total = 0;
  for (const auto& f : files) total += static_cast<double>(f.bytes);
  fmt::print("cache dir:     {} ({} entries, {})\n", cache.dir(), files.size(), human_bytes(total));
  if (const char* b = std::getenv("KJIT_BUNDLE"); b && *b) fmt::print("bundle:        {}\n", b);
  if (const char* t = std::getenv("KJIT_TEMPLATE_DIR"); t && *t) fmt::print("templates:     {} (overrides the embedded ones)\n", t);
  // A machine without a GPU is a fine place to compile; only a missing compiler is a problem.
  return problems ? 1 : 0;
}

int cmd_compile(const std::string& spec, const std::string& arch, const std::string& cubin_path, const EngineOptions& options) {
  Engine engine(options);
  if (arch.empty() && options.arch.empty()) {
    std::string why;
    if (!runtime::driver_available(&why))
      throw UnavailableError(fmt::format("{}; pass --arch (e.g. --arch sm_90a) to compile for a GPU that is not here", why));
  }
  auto start = std::chrono::steady_clock::now();
  Artifact a = engine.build(read_spec(spec), arch);
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  fmt::print("key        {}\n", a.info.key.empty() ? "(bundle: " + a.info.source_key + ")" : a.info.key);
  fmt::print("spec       {}\n", a.info.spec);
  fmt::print("entry      {}  arch {}\n", a.info.entry, a.info.arch);
  fmt::print("result     {} ({})\n", a.info.source == ArtifactSource::nvrtc ? "miss, compiled" : "hit", to_string(a.info.source));
  fmt::print("time       {:.1f} ms (NVRTC {:.1f} ms when compiled)\n", ms, a.info.compile_seconds * 1e3);
  fmt::print("registers  {}  spill stores {} bytes  stack {} bytes  cubin {}\n", a.info.registers, a.info.spill_bytes,
             a.info.stack_bytes, human_bytes(static_cast<double>(a.info.cubin_bytes)));
  if (!a.info.performance_warnings.empty()) fmt::print("ptxas      {}\n", a.info.performance_warnings);
  fmt::print("cache      {}\n", engine.cache_dir().empty() ? "(off)" : engine.cache_dir());
  if (!cubin_path.empty()) {  // for cuobjdump / nvdisasm (tools/sass-loops)
    if (std::string why = cache::write_file_atomically(cubin_path, a.cubin); !why.empty())
      throw CacheError(fmt::format("--cubin {}: {}", cubin_path, why));
    fmt::print("cubin      {}\n", cubin_path);
  }
  return 0;
}

int cmd_pregen(const std::string& config_path, const std::string& arch_list, const std::string& out, int jobs,
               const EngineOptions& options) {
  spec::ModelConfig config = spec::load_config(config_path);
  std::vector<std::string> archs = arch_list.empty() ? config.archs : split(arch_list, ',');
  if (archs.empty()) throw SpecError("pregen needs --arch (or an \"arch\" list in the config)");
  for (auto& a : archs) a = compile::normalize_arch(a);
  struct Job {
    std::string spec;
    std::string arch;
  };
  std::vector<Job> work;
  for (const auto& s : config.specs)
    for (const auto& a : archs) work.push_back({s.dump(), a});

  EngineOptions o = options;
  o.bundle_dir.clear();  // never build a bundle from itself
  Engine engine(o);
  cache::BundleWriter writer(out);
  std::atomic<std::size_t> next{0}, done{0};
  std::mutex print_mutex;
  std::vector<std::string> failures;
  auto start = std::chrono::steady_clock::now();
  auto worker = [&] {
    for (std::size_t i; (i = next++) < work.size();) {
      try {
        Artifact a = engine.build(work[i].spec, work[i].arch);
        writer.add(a.info.source_key,
                   detail::artifact_metadata(a.info, compile::nvrtc_version(), compile::compile_options(a.info.arch)), a.cubin);
        std::lock_guard lock(print_mutex);
        fmt::print(stderr, "[{:>3}/{}] {} {} -> {} ({}, {:.2f} s, {} regs)\n", ++done, work.size(), a.info.arch,
                   a.info.spec, a.info.source_key.substr(0, 12), to_string(a.info.source), a.info.compile_seconds,
                   a.info.registers);
      } catch (const Error& e) {
        std::lock_guard lock(print_mutex);
        ++done;
        failures.push_back(fmt::format("{} {}: {}", work[i].arch, work[i].spec, e.what()));
        fmt::print(stderr, "[{:>3}/{}] FAILED {} {}\n", done.load(), work.size(), work[i].arch, work[i].spec);
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < std::max(1, jobs); ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (!failures.empty()) {
    for (const auto& f : failures) fmt::print(stderr, "{}\n", f);
    fmt::print(stderr, "pregen: {} of {} kernels failed; no bundle written\n", failures.size(), work.size());
    return 1;
  }
  writer.finish();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("bundle {}: {} kernels ({} specs x {} archs) in {:.1f} s\n", out, work.size(), config.specs.size(),
             archs.size(), s);
  return 0;
}

int cmd_cache(const std::string& action, const std::string& dir, std::uint64_t max_bytes) {
  cache::DiskCache cache(dir.empty() ? cache::DiskCache::default_dir() : dir, max_bytes);
  if (action == "ls") {
    double total = 0;
    for (const auto& f : cache.list()) {
      std::string what = "?";
      if (auto bytes = cache::read_file(f.path))
        if (auto e = cache::DiskCache::decode(*bytes)) what = e->meta.value("arch", "") + " " + e->meta["spec"].dump();
      fmt::print("{}  {:>10}  {}\n", f.key, human_bytes(static_cast<double>(f.bytes)), what);
      total += static_cast<double>(f.bytes);
    }
    fmt::print("{}: {}\n", cache.dir(), human_bytes(total));
  } else if (action == "verify") {
    auto [ok, damaged] = cache.verify();
    fmt::print("{}: {} entries ok, {} damaged (removed)\n", cache.dir(), ok, damaged);
    return damaged ? 1 : 0;
  } else if (action == "prune") {
    std::uint64_t freed = cache.prune(max_bytes);
    fmt::print("{}: freed {}\n", cache.dir(), human_bytes(static_cast<double>(freed)));
  } else if (action == "clear") {
    fmt::print("{}: removed {} entries\n", cache.dir(), cache.clear());
  }
  return 0;
}

std::map<std::string, std::int64_t> parse_shape(const std::vector<std::string>& items) {
  std::map<std::string, std::int64_t> out;
  for (const auto& item : items) {
    auto eq = item.find('=');
    if (eq == std::string::npos) throw SpecError(fmt::format("--shape wants NAME=VALUE, got \"{}\"", item));
    try {
      out[item.substr(0, eq)] = std::stoll(item.substr(eq + 1));
    } catch (const std::exception&) {
      throw SpecError(fmt::format("--shape {}: not an integer", item));
    }
  }
  return out;
}

using Shapes = std::map<std::string, std::vector<std::int64_t>>;

// Every combination of the shape values.
std::vector<std::map<std::string, std::int64_t>> shape_combinations(const Shapes& shapes) {
  std::vector<std::map<std::string, std::int64_t>> combos{{}};
  for (const auto& [axis, values] : shapes) {
    std::vector<std::map<std::string, std::int64_t>> next;
    for (const auto& c : combos)
      for (auto v : values) {
        auto n = c;
        n[axis] = v;
        next.push_back(n);
      }
    combos = next;
  }
  return combos;
}

// specs[i] is benchmarked over the combinations of each of its shape sets.
int cmd_bench(const std::vector<std::string>& specs, const std::vector<std::vector<Shapes>>& spec_shapes, int iterations,
              const EngineOptions& options) {
  Engine engine(options);
  std::vector<Kernel> kernels;
  for (const auto& s : specs) kernels.push_back(engine.get(s));  // all compiles before any timing
  const double copy = tools::copy_bandwidth_gbps();
  auto device = runtime::device_info(runtime::current_device());
  fmt::print("device {}; copy bandwidth {:.0f} GB/s (read + write, measured now)\n", device.name, copy);
  fmt::print("{:<72} {:>22} {:>10} {:>9} {:>7}\n", "spec", "shape", "median us", "GB/s", "% copy");
  for (std::size_t i = 0; i < kernels.size(); ++i) {
    const Kernel& k = kernels[i];
    std::vector<std::map<std::string, std::int64_t>> combos;
    for (const Shapes& set : spec_shapes[i].empty() ? std::vector<Shapes>{{}} : spec_shapes[i])
      for (auto& c : shape_combinations(set)) combos.push_back(std::move(c));
    for (const auto& shape : combos) {
      if (k.info().op == "batch_prefill" || k.info().op == "append_paged_kv_cache") {  // need valid index arrays
        auto it = shape.find("seq_len"), bt = shape.find("batch_size"), kt = shape.find("kv_len");
        if (it == shape.end() || bt == shape.end())
          throw SpecError(fmt::format("benchmarking {} needs --shape batch_size=N --shape seq_len=N (and kv_len=N)", k.info().op));
        const std::int64_t kv_len = kt == shape.end() ? it->second : kt->second;
        if (kv_len < it->second && k.info().op == "append_paged_kv_cache")
          throw SpecError("append_paged_kv_cache: kv_len must be at least seq_len (the appended tokens)");
        const std::string shape_text = fmt::format("batch_size={} seq_len={} kv_len={}", bt->second, it->second, kv_len);
        if (k.info().op == "append_paged_kv_cache") {
          auto r = tools::bench_append(engine, k.info().spec, bt->second, it->second, kv_len, iterations);
          fmt::print("{:<72} {:>22} {:>10.2f} {:>9.0f} {:>6.1f}%\n", r.spec, shape_text, r.median_us, r.gbps, 100 * r.gbps / copy);
          continue;
        }
        auto r = tools::bench_prefill(engine, k.info().spec, bt->second, it->second, kv_len, iterations);
        auto tflops = [&](double us) { return r.flops / us / 1e6; };
        fmt::print("{:<72} {:>22} {:>10.2f} {:>9.1f} TFLOP/s {:>6.0f} GB/s {:>5.1f}%  (back to back {:.2f} us = {:.1f} TFLOP/s)\n",
                   r.spec, shape_text, r.median_us, tflops(r.median_us), r.gbps, 100 * r.gbps / copy, r.back_to_back_us,
                   tflops(r.back_to_back_us));
        continue;
      }
      if (k.info().op == "batch_decode") {  // needs a valid page table: built by the decode bench
        auto find = [&](const char* axis) {
          auto it = shape.find(axis);
          if (it == shape.end()) throw SpecError(fmt::format("benchmarking batch_decode needs --shape {}=N", axis));
          return it->second;
        };
        std::string plan;
        const std::int64_t num_chunks = shape.count("num_chunks") ? shape.at("num_chunks") : 0;  // 0: planned
        const bool in_order = shape.count("pages_in_order") && shape.at("pages_in_order") != 0;  // else shuffled
        auto r = tools::bench_decode(engine, k.info().spec, find("batch_size"), find("kv_len"), iterations, &plan, num_chunks,
                                     in_order);
        fmt::print("{:<72} {:>22} {:>10.2f} {:>9.0f} {:>6.1f}%  ({}; back to back {:.2f} us = {:.0f} GB/s)\n", r.spec,
                   fmt::format("batch_size={} kv_len={}{}", r.shape["batch_size"], r.shape["kv_len"], in_order ? " in order" : ""),
                   r.median_us, r.gbps,
                   100 * r.gbps / copy, plan, r.back_to_back_us, r.bytes / (r.back_to_back_us * 1e-6) / 1e9);
        continue;
      }
      auto r = tools::bench_kernel(k, shape, {}, iterations);
      std::string shape_text;
      for (const auto& [a, v] : r.shape) shape_text += fmt::format("{}{}={}", shape_text.empty() ? "" : " ", a, v);
      fmt::print("{:<72} {:>22} {:>10.2f} {:>9.0f} {:>6.1f}%\n", r.spec, shape_text, r.median_us, r.gbps, 100 * r.gbps / copy);
    }
  }
  return 0;
}

int cmd_overhead(const std::string& spec, const std::string& self, const std::map<std::string, std::int64_t>& shape) {
  auto r = tools::measure_overhead(spec, self, shape);
  fmt::print("cold compile (in process, new cache)   {:9.2f} ms  (NVRTC {:.2f} ms)\n", r.cold_compile_ms, r.nvrtc_ms);
  fmt::print("disk-cache hit, new process            {:9.3f} ms  (Engine + get + module load)\n", r.disk_hit_new_process_ms);
  fmt::print("memory hit, Engine::get                {:9.3f} us\n", r.memory_hit_us);
  fmt::print("bare cuLaunchKernel (median of 7)      {:9.3f} us\n", r.bare_launch_us);
  fmt::print("Kernel::launch, pointers               {:9.3f} us  (+{:.3f})\n", r.kjit_launch_us, r.kjit_launch_us - r.bare_launch_us);
  fmt::print("Kernel::launch, DLTensors (checked)    {:9.3f} us  (+{:.3f})\n", r.kjit_launch_dlpack_us,
             r.kjit_launch_dlpack_us - r.bare_launch_us);
  return 0;
}

std::string self_path(const char* argv0) {
  char buffer[4096];
  ssize_t n = ::readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  if (n > 0) return std::string(buffer, static_cast<std::size_t>(n));
  return argv0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kjit: JIT-generated GPU kernels for LLM inference"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(kjit::version()));

  EngineOptions options;
  std::string cache_dir, bundle_dir, arch;
  bool no_disk_cache = false;
  auto engine_flags = [&](CLI::App* c) {
    c->add_option("--cache-dir", cache_dir, "cache directory (default: $KJIT_CACHE_DIR or ~/.cache/kjit)");
    c->add_flag("--no-disk-cache", no_disk_cache, "keep kernels in memory only");
    c->add_option("--bundle", bundle_dir, "look kernels up in this bundle first (default: $KJIT_BUNDLE)");
  };

  auto* doctor = app.add_subcommand("doctor", "report driver, GPUs, NVRTC, CUDA headers and cache");

  std::string spec;
  auto* render = app.add_subcommand("render", "print the generated CUDA source of a spec");
  render->add_option("spec", spec, "spec: inline JSON or a file (kjit spec or FlashInfer-Bench definition)")->required();

  auto* compile = app.add_subcommand("compile", "compile a spec into the cache; print key, hit/miss, time, registers");
  compile->add_option("spec", spec, "spec: inline JSON or a file")->required();
  compile->add_option("--arch", arch, "target, e.g. sm_80, sm_89, sm_90a, sm_100a (default: this GPU)");
  std::string cubin_path;
  compile->add_option("--cubin", cubin_path, "also write the cubin to this file");
  engine_flags(compile);

  std::string config, out, arch_list;
  int jobs = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto* pregen = app.add_subcommand("pregen", "compile every spec of a model config into a bundle");
  pregen->add_option("config", config, "model config (configs/*.json)")->required();
  pregen->add_option("--arch", arch_list, "comma-separated targets (default: the config's \"arch\")");
  pregen->add_option("--out", out, "bundle directory to write")->required();
  pregen->add_option("-j,--jobs", jobs, "parallel compiles");
  pregen->add_option("--cache-dir", cache_dir, "cache directory");

  std::string action;
  std::string max_size = "4G";
  auto* cache = app.add_subcommand("cache", "list, verify, prune or clear the disk cache");
  cache->add_option("action", action, "ls | verify | prune | clear")->required()->check(CLI::IsMember({"ls", "verify", "prune", "clear"}));
  cache->add_option("--cache-dir", cache_dir, "cache directory");
  cache->add_option("--max-size", max_size, "prune: keep at most this much (e.g. 512M, 2G)");

  std::vector<std::string> bench_specs, shape_items;
  std::string bench_config;
  int iterations = 100;
  auto* bench = app.add_subcommand("bench", "time kernels on the GPU (CUDA events, median), with GB/s and % of copy bandwidth");
  bench->add_option("spec", bench_specs, "specs: inline JSON or files");
  bench->add_option("--config", bench_config, "bench every spec of a model config over its \"shapes\"");
  bench->add_option("--shape", shape_items, "run-time axis values, e.g. --shape batch_size=16384")->allow_extra_args(false);
  bench->add_option("--iters", iterations, "timed launches per shape");
  engine_flags(bench);

  bool child = false;
  auto* overhead = app.add_subcommand("overhead", "time kjit's own costs: cold compile, cache hits, launch overhead");
  overhead->add_option("spec", spec, "spec: inline JSON or a file")->required();
  overhead->add_flag("--child", child, "(internal) time one cache hit in this process");
  overhead->add_option("--cache-dir", cache_dir, "(internal)");
  std::vector<std::string> overhead_shape;
  overhead->add_option("--shape", overhead_shape, "axis values for the launch, e.g. --shape total_q=128")->allow_extra_args(false);

  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    std::string names;
    for (const CLI::App* sub : app.get_subcommands({})) {
      known |= sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      fmt::print(stderr, "kjit: unknown command \"{}\"; commands: {}\n", argv[1], names);
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  options.cache_dir = cache_dir;
  options.disk_cache = !no_disk_cache;
  options.bundle_dir = bundle_dir;
  try {
    if (doctor->parsed()) return cmd_doctor();
    if (render->parsed()) {
      Engine engine(options);
      fmt::print("{}", engine.render(read_spec(spec)));
      return 0;
    }
    if (compile->parsed()) return cmd_compile(spec, arch, cubin_path, options);
    if (pregen->parsed()) return cmd_pregen(config, arch_list, out, jobs, options);
    if (cache->parsed()) {
      std::uint64_t limit = 0;
      try {
        std::size_t used = 0;
        double v = std::stod(max_size, &used);
        char unit = used < max_size.size() ? static_cast<char>(std::toupper(max_size[used])) : 'B';
        double scale = unit == 'K' ? 1024.0 : unit == 'M' ? 1048576.0 : unit == 'G' ? 1073741824.0 : 1.0;
        limit = static_cast<std::uint64_t>(v * scale);
      } catch (const std::exception&) {
        throw SpecError(fmt::format("--max-size \"{}\" is not a size (e.g. 512M, 2G)", max_size));
      }
      return cmd_cache(action, cache_dir, limit);
    }
    if (bench->parsed()) {
      // A config's specs over their shapes; --shape values replace those axes everywhere.
      std::vector<std::string> specs;
      std::vector<std::vector<Shapes>> shapes;
      const auto overrides = parse_shape(shape_items);
      if (!bench_config.empty()) {
        auto c = spec::load_config(bench_config);
        for (std::size_t i = 0; i < c.specs.size(); ++i) {
          specs.push_back(c.specs[i].dump());
          shapes.push_back(c.shapes_of(i));
        }
      }
      for (const auto& s : bench_specs) {
        specs.push_back(read_spec(s));
        shapes.emplace_back();
      }
      for (auto& sets : shapes) {
        if (sets.empty()) sets.emplace_back();
        for (auto& s : sets)
          for (const auto& [axis, value] : overrides) s[axis] = {value};
      }
      if (specs.empty()) throw SpecError("bench needs a spec or --config");
      return cmd_bench(specs, shapes, iterations, options);
    }
    if (overhead->parsed()) {
      if (child) return kjit::tools::overhead_child(read_spec(spec), cache_dir);
      return cmd_overhead(read_spec(spec), self_path(argv[0]), parse_shape(overhead_shape));
    }
  } catch (const SpecError& e) {
    fmt::print(stderr, "kjit: {}\n", e.what());
    return 2;
  } catch (const TemplateError& e) {
    fmt::print(stderr, "kjit: {}\n", e.what());
    return 2;
  } catch (const ArgumentError& e) {
    fmt::print(stderr, "kjit: {}\n", e.what());
    return 2;
  } catch (const Error& e) {
    fmt::print(stderr, "kjit: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kjit: internal error: {}\n", e.what());
    return 1;
  }
  return 0;
}
