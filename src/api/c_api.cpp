// The C ABI over the C++ API: exceptions become status codes plus a
// thread-local message for kjit_last_error().
#include "kjit/kjit.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "kjit/attention.hpp"
#include "kjit/kjit.hpp"

struct kjit_engine {
  kjit::Engine engine;
  explicit kjit_engine(kjit::EngineOptions o) : engine(std::move(o)) {}
};
struct kjit_kernel {
  kjit::Kernel kernel;
  std::string info_json;
  // kjit_plan_prefill_work's planner, built on its first call (a server plans every step).
  mutable std::mutex planner_mutex;
  mutable std::unique_ptr<kjit::PrefillWorkPlanner> work_planner;
};
struct kjit_batch_decode {
  kjit::BatchDecode decode;
};

namespace {
thread_local std::string last_error;

template <class F>
kjit_status guarded(F&& body) {
  try {
    body();
    return KJIT_OK;
  } catch (const kjit::Error& e) {
    last_error = e.what();
    return static_cast<kjit_status>(e.code());
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
  } catch (...) {
    last_error = "internal error: unknown exception";
  }
  return KJIT_ERROR_INTERNAL;
}

kjit_status null_argument(const char* name) {
  last_error = std::string("argument ") + name + " is NULL";
  return KJIT_ERROR_ARGUMENT;
}

kjit::EngineOptions parse_options(const char* text) {
  kjit::EngineOptions o;
  if (!text || !*text) return o;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw kjit::SpecError(std::string("engine options are not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw kjit::SpecError("engine options must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    try {
      if (k == "cache_dir") o.cache_dir = it->get<std::string>();
      else if (k == "disk_cache") o.disk_cache = it->get<bool>();
      else if (k == "cache_size_limit") o.cache_size_limit = it->get<std::uint64_t>();
      else if (k == "bundle_dir") o.bundle_dir = it->get<std::string>();
      else if (k == "arch") o.arch = it->get<std::string>();
      else if (k == "allow_nvrtc") o.allow_nvrtc = it->get<bool>();
      else throw kjit::SpecError("engine option \"" + k + "\" is unknown; known: cache_dir, disk_cache, "
                                 "cache_size_limit, bundle_dir, arch, allow_nvrtc");
    } catch (const nlohmann::json::exception&) {
      throw kjit::SpecError("engine option \"" + k + "\" has the wrong type: " + it->dump());
    }
  }
  return o;
}

std::string info_json(const kjit::KernelInfo& i) {
  nlohmann::json params = nlohmann::json::array();
  for (const auto& p : i.params) {
    const char* kind = p.kind == kjit::Param::Kind::tensor ? "tensor" : p.kind == kjit::Param::Kind::integer ? "int" : "float";
    nlohmann::json e = {{"name", p.name}, {"kind", kind}};
    if (p.kind == kjit::Param::Kind::tensor) {
      e["dtype"] = std::string(kjit::dtype_name(p.dtype));
      e["shape"] = p.shape;
      e["access"] = p.access == kjit::Param::Access::read ? "read" : p.access == kjit::Param::Access::write ? "write" : "read_write";
      e["alignment"] = p.alignment;
    }
    params.push_back(e);
  }
  return nlohmann::json{{"op", i.op}, {"spec", nlohmann::json::parse(i.spec)}, {"entry", i.entry}, {"arch", i.arch},
                        {"key", i.key}, {"source_key", i.source_key}, {"source", std::string(kjit::to_string(i.source))},
                        {"registers", i.registers}, {"spill_bytes", i.spill_bytes},
                        {"stack_bytes", i.stack_bytes}, {"performance_warnings", i.performance_warnings},
                        {"params", params}}
      .dump();
}
}  // namespace

extern "C" {

kjit_status kjit_engine_create(const char* options_json, kjit_engine** out) {
  if (!out) return null_argument("out");
  *out = nullptr;
  return guarded([&] { *out = new kjit_engine(parse_options(options_json)); });
}

void kjit_engine_destroy(kjit_engine* engine) { delete engine; }

kjit_status kjit_get(kjit_engine* engine, const char* spec_json, kjit_kernel** out) {
  if (!engine) return null_argument("engine");
  if (!spec_json) return null_argument("spec_json");
  if (!out) return null_argument("out");
  *out = nullptr;
  return guarded([&] {
    kjit::Kernel k = engine->engine.get(spec_json);
    *out = new kjit_kernel{k, info_json(k.info())};
  });
}

void kjit_kernel_release(kjit_kernel* kernel) { delete kernel; }

kjit_status kjit_launch(const kjit_kernel* kernel, const kjit_arg* args, size_t num_args, void* stream) {
  if (!kernel) return null_argument("kernel");
  if (!args && num_args) return null_argument("args");
  return guarded([&] {
    kjit::Arg converted[32];
    if (num_args > 32) throw kjit::ArgumentError("too many arguments (at most 32)");
    for (size_t i = 0; i < num_args; ++i) {
      switch (args[i].kind) {
        case KJIT_ARG_POINTER: converted[i] = kjit::Arg(args[i].value.pointer); break;
        case KJIT_ARG_TENSOR: converted[i] = kjit::Arg(args[i].value.tensor); break;
        case KJIT_ARG_INT: converted[i] = kjit::Arg(static_cast<std::int64_t>(args[i].value.integer)); break;
        case KJIT_ARG_FLOAT: converted[i] = kjit::Arg(args[i].value.real); break;
        default: throw kjit::ArgumentError("argument " + std::to_string(i) + " has an unknown kind");
      }
    }
    kernel->kernel.launch(std::span<const kjit::Arg>(converted, num_args), stream);
  });
}

const char* kjit_kernel_info(const kjit_kernel* kernel) { return kernel ? kernel->info_json.c_str() : ""; }

kjit_status kjit_render(kjit_engine* engine, const char* spec_json, char* buffer, size_t* size) {
  if (!engine) return null_argument("engine");
  if (!spec_json) return null_argument("spec_json");
  if (!size) return null_argument("size");
  return guarded([&] {
    std::string source = engine->engine.render(spec_json);
    size_t capacity = *size;
    *size = source.size() + 1;
    if (!buffer) return;
    if (capacity < source.size() + 1) throw kjit::ArgumentError("buffer too small: " + std::to_string(*size) + " bytes needed");
    std::memcpy(buffer, source.c_str(), source.size() + 1);
  });
}

kjit_status kjit_plan_prefill_work(const kjit_kernel* prefill, const int32_t* qo_indptr, const int32_t* kv_indptr,
                                   const int32_t* kv_last_page_len, int64_t batch_size, int num_sms, int32_t* buffer,
                                   size_t* size) {
  if (!prefill) return null_argument("prefill");
  if (!qo_indptr) return null_argument("qo_indptr");
  if (!kv_indptr) return null_argument("kv_indptr");
  if (!size) return null_argument("size");
  return guarded([&] {
    if (batch_size < 0) throw kjit::ArgumentError("batch_size is negative");
    const auto n = static_cast<std::size_t>(batch_size);
    std::span<const std::int32_t> last;
    if (kv_last_page_len) last = {kv_last_page_len, n};
    const kjit::PrefillWorkPlanner* planner = nullptr;
    {
      const std::lock_guard<std::mutex> lock(prefill->planner_mutex);
      if (!prefill->work_planner) prefill->work_planner = std::make_unique<kjit::PrefillWorkPlanner>(prefill->kernel.info());
      planner = prefill->work_planner.get();
    }
    const size_t capacity = *size;
    if (!buffer) {  // the size alone, without planning (callers ask, then plan)
      *size = planner->list_size({qo_indptr, n + 1});
      return;
    }
    static_cast<void>(num_sms);  // (the queue serves any grid)
    const std::vector<std::int32_t> list = planner->plan({qo_indptr, n + 1}, {kv_indptr, n + 1}, last);
    *size = list.size();
    if (capacity < list.size()) throw kjit::ArgumentError("buffer too small: " + std::to_string(list.size()) + " values needed");
    std::copy(list.begin(), list.end(), buffer);
  });
}

kjit_status kjit_batch_decode_create(kjit_engine* engine, const char* spec_json, kjit_batch_decode** out) {
  if (!engine) return null_argument("engine");
  if (!spec_json) return null_argument("spec_json");
  if (!out) return null_argument("out");
  *out = nullptr;
  return guarded([&] { *out = new kjit_batch_decode{kjit::BatchDecode(engine->engine, spec_json)}; });
}

void kjit_batch_decode_destroy(kjit_batch_decode* decode) { delete decode; }

kjit_status kjit_batch_decode_plan(const kjit_batch_decode* decode, const int32_t* kv_indptr,
                                   const int32_t* kv_last_page_len, int64_t batch_size, kjit_decode_plan* out) {
  return kjit_batch_decode_plan_chunks(decode, kv_indptr, kv_last_page_len, batch_size, 0, out);
}

kjit_status kjit_batch_decode_plan_chunks(const kjit_batch_decode* decode, const int32_t* kv_indptr,
                                          const int32_t* kv_last_page_len, int64_t batch_size, int64_t num_chunks,
                                          kjit_decode_plan* out) {
  if (!decode) return null_argument("decode");
  if (!kv_indptr) return null_argument("kv_indptr");
  if (!kv_last_page_len && batch_size > 0) return null_argument("kv_last_page_len");
  if (!out) return null_argument("out");
  return guarded([&] {
    if (batch_size < 0) throw kjit::ArgumentError("batch_size is negative");
    const auto n = static_cast<std::size_t>(batch_size);
    const kjit::DecodePlan p = decode->decode.plan({kv_indptr, n + 1}, {kv_last_page_len, n}, num_chunks);
    *out = kjit_decode_plan{p.batch_size, p.num_chunks, p.chunk_size, p.workspace_bytes};
  });
}

kjit_status kjit_batch_decode_run(const kjit_batch_decode* decode, const kjit_decode_plan* plan, const void* q,
                                  const void* k_cache, const void* v_cache, const int32_t* kv_indptr,
                                  const int32_t* kv_indices, const int32_t* kv_last_page_len, void* output,
                                  float* lse, void* workspace, double sm_scale, double k_scale, double v_scale,
                                  void* stream) {
  if (!decode) return null_argument("decode");
  if (!plan) return null_argument("plan");
  return guarded([&] {
    const kjit::DecodePlan p{plan->batch_size, plan->num_chunks, plan->chunk_size, plan->workspace_bytes};
    decode->decode.run(p,
                       {q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, output, lse, workspace,
                        static_cast<float>(k_scale), static_cast<float>(v_scale)},
                       sm_scale, stream);
  });
}

const char* kjit_last_error(void) { return last_error.c_str(); }
const char* kjit_version(void) { return KJIT_VERSION; }

}  // extern "C"
