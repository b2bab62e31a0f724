// Engine: spec -> plan -> source -> keys -> memory / bundle / disk / NVRTC -> Kernel.
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <unordered_map>

#include <fmt/format.h>

#include "api/artifact_metadata.hpp"
#include "api/kernel_state.hpp"
#include "api/log.hpp"
#include "cache/bundle.hpp"
#include "cache/cache_key.hpp"
#include "cache/disk_cache.hpp"
#include "codegen/template_engine.hpp"
#include "codegen/template_store.hpp"
#include "compile/nvrtc.hpp"
#include "families/family.hpp"
#include "runtime/driver.hpp"

namespace kjit {

struct Engine::Impl {
  EngineOptions options;
  std::mutex mutex;
  std::unordered_map<std::string, Kernel> kernels;      // spec text (as given, and canonical) + arch
  std::unordered_map<std::string, Artifact> artifacts;  // source key -> built cubin
  std::optional<cache::DiskCache> disk;
  std::optional<cache::Bundle> bundle;
  std::string arch;  // resolved lazily

  struct Rendered {
    families::KernelPlan plan;
    std::string source;
    compile::HeaderList headers;
  };

  Rendered render(std::string_view spec_json) {
    Rendered r;
    r.plan = families::plan_spec(spec::parse_spec(spec_json));
    nlohmann::json context = r.plan.template_params;
    context["entry"] = r.plan.entry;
    r.source = codegen::render_template(r.plan.template_name, context, codegen::load_template_file);
    r.headers = codegen::collect_headers(r.source);
    return r;
  }

  // launches: the plan's launch rules, conditional ones first.
  Artifact build(std::string_view spec_json, std::string arch_name, std::vector<families::LaunchRule>* launches = nullptr) {
    Rendered r = render(spec_json);
    if (launches) {
      *launches = r.plan.conditional_launches;
      launches->push_back(r.plan.launch);
    }
    arch_name = compile::normalize_arch(arch_name);
    const std::vector<std::string> nvrtc_options = compile::compile_options(arch_name);
    const std::string source_key = cache::source_key(r.source, r.headers, nvrtc_options, arch_name);

    Artifact a;
    a.info.op = r.plan.op;
    a.info.spec = r.plan.spec.dump();
    a.info.entry = r.plan.entry;
    a.info.arch = arch_name;
    a.info.source_key = source_key;
    a.info.params = r.plan.params;
    auto fill_from_meta = [&](const nlohmann::json& meta) { detail::read_artifact_metadata(meta, a.info); };

    {
      std::lock_guard lock(mutex);
      if (auto it = artifacts.find(source_key); it != artifacts.end()) {
        Artifact hit = it->second;
        hit.info.source = ArtifactSource::memory;
        return hit;
      }
    }
    auto remember = [&](Artifact& out) {
      out.info.cubin_bytes = out.cubin.size();
      std::lock_guard lock(mutex);
      artifacts.emplace(source_key, out);
    };

    if (bundle) {
      if (auto hit = bundle->find(source_key)) {
        fill_from_meta(hit->meta);
        a.cubin = std::move(hit->cubin);
        a.info.source = ArtifactSource::bundle;
        remember(a);
        return a;
      }
    }

    // The toolchain id, from the cache's memo when libnvrtc and the headers are unchanged.
    const std::vector<std::string> system_headers = codegen::collect_system_headers(r.source);
    const std::string fingerprint = cache::toolchain_fingerprint(system_headers);
    const std::string memo_name = "toolchain-" + fingerprint;
    std::optional<std::string> toolchain;
    if (disk && !fingerprint.empty()) toolchain = disk->recall(memo_name);
    // Checked only when needed: loading NVRTC costs milliseconds.
    auto require_compiler = [&] {
      std::string why;
      if (!options.allow_nvrtc) why = "NVRTC is disabled for this engine (allow_nvrtc = false or KJIT_DISABLE_NVRTC=1)";
      else if (compile::nvrtc_available(&why)) return;
      throw UnavailableError(fmt::format("no cubin for {} on {} in {}{}, and it cannot be compiled: {}", a.info.spec,
                                         arch_name, bundle ? "bundle " + bundle->dir() : "any bundle",
                                         disk ? " or cache " + disk->dir() : "", why));
    };
    if (!toolchain) {
      require_compiler();
      toolchain = cache::toolchain_id(system_headers);
      if (disk && !fingerprint.empty()) disk->remember(memo_name, *toolchain);
    }
    a.info.key = cache::cache_key(source_key, *toolchain);

    if (disk) {
      if (auto hit = disk->load(a.info.key)) {
        fill_from_meta(hit->meta);
        a.info.key = cache::cache_key(source_key, *toolchain);  // the entry's name, whatever its record says
        a.cubin = std::move(hit->cubin);
        a.info.source = ArtifactSource::disk_cache;
        remember(a);
        return a;
      }
    }
    require_compiler();
    const std::string nvrtc = compile::nvrtc_version();

    const std::string file_name = fmt::format("{}_{}.cu", a.info.entry, source_key.substr(0, 8));
    compile::CompileResult c = compile::compile_cubin(r.source, file_name, r.headers, nvrtc_options);
    a.cubin = std::move(c.cubin);
    a.info.source = ArtifactSource::nvrtc;
    a.info.compile_seconds = c.seconds;
    a.info.registers = c.registers;
    a.info.spill_bytes = c.spill_bytes;
    a.info.stack_bytes = c.stack_bytes;
    if (c.stack_bytes > 0)
      log::warn(fmt::format("{} on {} uses {} bytes of local memory per thread ({} of them spills)", a.info.entry, arch_name,
                            c.stack_bytes, std::max(c.spill_bytes, 0)));
    a.info.performance_warnings = c.performance_warnings;
    if (!c.performance_warnings.empty())
      log::warn(fmt::format("{} on {}: ptxas: {}", a.info.entry, arch_name, c.performance_warnings));
    if (disk) disk->store(a.info.key, {detail::artifact_metadata(a.info, nvrtc, nvrtc_options), a.cubin});
    remember(a);
    return a;
  }

  std::string current_arch() {
    std::lock_guard lock(mutex);
    if (arch.empty()) arch = options.arch.empty() ? runtime::device_arch(runtime::current_device()) : options.arch;
    return arch;
  }
};

Engine::Engine(EngineOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  EngineOptions& o = impl_->options;
  if (const char* off = std::getenv("KJIT_DISABLE_NVRTC"); off && *off && std::string_view(off) != "0") o.allow_nvrtc = false;
  if (o.bundle_dir.empty())
    if (const char* b = std::getenv("KJIT_BUNDLE"); b && *b) o.bundle_dir = b;
  if (!o.bundle_dir.empty()) impl_->bundle.emplace(o.bundle_dir);
  if (o.disk_cache) {
    if (o.cache_dir.empty()) o.cache_dir = cache::DiskCache::default_dir();
    impl_->disk.emplace(o.cache_dir, o.cache_size_limit);
  }
  if (!o.arch.empty()) o.arch = compile::normalize_arch(o.arch);
}

Engine::~Engine() = default;

Kernel Engine::get(std::string_view spec_json) {
  Impl& m = *impl_;
  const std::string arch_name = arch();
  std::string memo_key = std::string(spec_json) + '\n' + arch_name;
  {
    std::lock_guard lock(m.mutex);
    if (auto it = m.kernels.find(memo_key); it != m.kernels.end()) return it->second;
  }
  std::vector<families::LaunchRule> launches;
  Artifact a = m.build(spec_json, arch_name, &launches);
  const std::string canonical_key = a.info.spec + '\n' + arch_name;
  auto state = std::make_shared<detail::KernelState>(a.info, std::move(a.cubin), std::move(launches));
  state->function(runtime::current_device());  // load now, so errors surface at get()
  Kernel k(std::move(state));
  std::lock_guard lock(m.mutex);
  auto [it, inserted] = m.kernels.emplace(canonical_key, k);
  m.kernels.emplace(memo_key, it->second);
  return it->second;
}

Artifact Engine::build(std::string_view spec_json, std::string_view arch_name) {
  return impl_->build(spec_json, arch_name.empty() ? arch() : std::string(arch_name));
}

std::string Engine::render(std::string_view spec_json) { return impl_->render(spec_json).source; }

std::string Engine::arch() { return impl_->current_arch(); }

const EngineOptions& Engine::options() const { return impl_->options; }

std::string Engine::cache_dir() const { return impl_->disk && impl_->disk->writable() ? impl_->disk->dir() : ""; }

}  // namespace kjit
