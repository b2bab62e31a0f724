#include "compile/nvrtc.hpp"

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <regex>
#include <sstream>

#include <fmt/format.h>
#include <nvrtc.h>

#include "kjit/kjit.hpp"

namespace kjit::compile {
namespace {

struct NvrtcApi {
  void* handle = nullptr;
  std::string error;  // why it is unavailable
  std::string path;
  decltype(&::nvrtcVersion) version = nullptr;
  decltype(&::nvrtcGetErrorString) error_string = nullptr;
  decltype(&::nvrtcCreateProgram) create = nullptr;
  decltype(&::nvrtcDestroyProgram) destroy = nullptr;
  decltype(&::nvrtcCompileProgram) compile = nullptr;
  decltype(&::nvrtcGetProgramLogSize) log_size = nullptr;
  decltype(&::nvrtcGetProgramLog) log = nullptr;
  decltype(&::nvrtcGetCUBINSize) cubin_size = nullptr;
  decltype(&::nvrtcGetCUBIN) cubin = nullptr;
  decltype(&::nvrtcGetNumSupportedArchs) num_archs = nullptr;
  decltype(&::nvrtcGetSupportedArchs) archs = nullptr;
};

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

std::string nvrtc_library_path() {
  static const std::string path = [] {
    if (const char* p = std::getenv("KJIT_NVRTC_LIBRARY"); p && *p) return std::string(p);
    std::vector<std::string> dirs;
    if (const char* lib = std::getenv("LD_LIBRARY_PATH"); lib && *lib) {
      std::string all = lib;
      for (std::size_t b = 0, e; b <= all.size(); b = e + 1) {
        e = all.find(':', b);
        if (e == std::string::npos) e = all.size();
        if (e > b) dirs.push_back(all.substr(b, e - b));
      }
    }
    for (const char* env : {"CUDA_HOME", "CUDA_PATH"})
      if (const char* root = std::getenv(env); root && *root) dirs.push_back(fmt::format("{}/lib64", root));
    for (const char* d : {"/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"}) dirs.push_back(d);
    for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"})
      for (const auto& d : dirs)
        if (file_exists(d + "/" + name)) return d + "/" + name;
    return std::string();
  }();
  return path;
}

namespace {

const NvrtcApi& api() {
  static const NvrtcApi instance = [] {
    NvrtcApi a;
    const char* disabled = std::getenv("KJIT_DISABLE_NVRTC");
    if (disabled && *disabled && std::string_view(disabled) != "0") {
      a.error = "NVRTC is disabled (KJIT_DISABLE_NVRTC is set): only the bundle and the cache can provide kernels";
      return a;
    }
    std::string tried;
    std::string path = nvrtc_library_path();
    std::vector<std::string> candidates;
    if (!path.empty()) candidates.push_back(path);
    else for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) candidates.push_back(name);
    for (const auto& c : candidates) {
      a.handle = ::dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (a.handle) { a.path = c; break; }
      tried += (tried.empty() ? "" : ", ") + c;
    }
    if (!a.handle) {
      a.error = fmt::format("libnvrtc could not be loaded (tried {}); install the CUDA toolkit's NVRTC or set "
                            "KJIT_NVRTC_LIBRARY, or use a bundle made by `kjit pregen`", tried);
      return a;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(a.handle, name));
      if (!fn && a.error.empty()) a.error = fmt::format("{} lacks the symbol {}", a.path, name);
    };
    sym(a.version, "nvrtcVersion");
    sym(a.error_string, "nvrtcGetErrorString");
    sym(a.create, "nvrtcCreateProgram");
    sym(a.destroy, "nvrtcDestroyProgram");
    sym(a.compile, "nvrtcCompileProgram");
    sym(a.log_size, "nvrtcGetProgramLogSize");
    sym(a.log, "nvrtcGetProgramLog");
    sym(a.cubin_size, "nvrtcGetCUBINSize");
    sym(a.cubin, "nvrtcGetCUBIN");
    sym(a.num_archs, "nvrtcGetNumSupportedArchs");
    sym(a.archs, "nvrtcGetSupportedArchs");
    return a;
  }();
  return instance;
}

const NvrtcApi& loaded_api() {
  const NvrtcApi& a = api();
  if (!a.error.empty()) throw UnavailableError(a.error);
  return a;
}

// Quotes the generated source around each line NVRTC's log complains about.
std::string annotate(const std::string& log, const std::string& name, const std::string& source, const HeaderList& headers) {
  std::string out = log;
  std::regex where(R"(([^\s()]+)\((\d+)\): (error|catastrophic error))");
  int shown = 0;
  for (std::sregex_iterator it(log.begin(), log.end(), where), end; it != end && shown < 5; ++it, ++shown) {
    std::string file = (*it)[1];
    int line = std::stoi((*it)[2]);
    const std::string* text = file == name ? &source : nullptr;
    for (const auto& [h, body] : headers)
      if (file == h) text = &body;
    if (!text) continue;
    std::istringstream in(*text);
    std::string l;
    out += fmt::format("\n--- {} around line {} ---\n", file, line);
    for (int n = 1; std::getline(in, l); ++n)
      if (n >= line - 3 && n <= line + 2) out += fmt::format("{}{:5} | {}\n", n == line ? ">" : " ", n, l);
  }
  return out;
}

}  // namespace

std::string performance_warnings(const std::string& ptxas_log) {
  static const std::regex note(R"(Potential Performance Loss: ([^\n]*))");
  std::string notes;
  for (std::sregex_iterator it(ptxas_log.begin(), ptxas_log.end(), note), end; it != end; ++it) {
    if (!notes.empty()) notes += '\n';
    notes += (*it)[1].str();
  }
  return notes;
}

bool nvrtc_available(std::string* why) {
  const NvrtcApi& a = api();
  if (why) *why = a.error;
  return a.error.empty();
}

std::string nvrtc_version() {
  const NvrtcApi& a = loaded_api();
  int major = 0, minor = 0;
  a.version(&major, &minor);
  return fmt::format("{}.{}", major, minor);
}

std::string normalize_arch(std::string_view arch) {
  static const std::regex pattern(R"(sm_(\d+)([af]?))");
  std::cmatch m;
  std::string a(arch);
  if (!std::regex_match(a.c_str(), m, pattern))
    throw SpecError(fmt::format("arch \"{}\" is not an sm_XY[a] name (e.g. sm_80, sm_89, sm_90a, sm_100a)", arch));
  int number = std::stoi(m[1]);
  if (number < 80)
    throw SpecError(fmt::format("arch \"{}\" is not supported: kjit targets sm_80 and newer", arch));
  return a;
}

std::string cuda_include_dir() {
  static const std::string dir = [] {
    std::vector<std::string> candidates;
    if (const char* p = std::getenv("KJIT_CUDA_INCLUDE"); p && *p) candidates.push_back(p);
    for (const char* env : {"CUDA_HOME", "CUDA_PATH"})
      if (const char* root = std::getenv(env); root && *root) candidates.push_back(fmt::format("{}/include", root));
    candidates.push_back("/usr/local/cuda/include");
    candidates.push_back(KJIT_DEFAULT_CUDA_INCLUDE);
    for (const auto& c : candidates)
      if (file_exists(c + "/cuda_fp16.h")) return c;
    return std::string();
  }();
  return dir;
}

std::vector<std::string> compile_options(std::string_view arch) {
  return {fmt::format("--gpu-architecture={}", arch), "--std=c++17", "--device-as-default-execution-space",
          "-DNDEBUG", "--ptxas-options=-v"};
}

CompileResult compile_cubin(const std::string& source, const std::string& name, const HeaderList& headers,
                            const std::vector<std::string>& options) {
  const NvrtcApi& a = loaded_api();
  std::string include = cuda_include_dir();
  if (include.empty())
    throw UnavailableError("the CUDA headers (cuda_fp16.h) were not found: set KJIT_CUDA_INCLUDE or CUDA_HOME");
  std::vector<const char*> header_texts, header_names;
  for (const auto& [n, text] : headers) {
    header_names.push_back(n.c_str());
    header_texts.push_back(text.c_str());
  }
  std::vector<std::string> all = options;
  all.push_back("-I" + include);
  std::vector<const char*> opts;
  for (const auto& o : all) opts.push_back(o.c_str());

  auto start = std::chrono::steady_clock::now();
  nvrtcProgram program = nullptr;
  nvrtcResult r = a.create(&program, source.c_str(), name.c_str(), static_cast<int>(headers.size()),
                           header_texts.data(), header_names.data());
  if (r != NVRTC_SUCCESS) throw CompileError(fmt::format("nvrtcCreateProgram failed: {}", a.error_string(r)));
  struct Guard {
    const NvrtcApi& a;
    nvrtcProgram& p;
    ~Guard() { a.destroy(&p); }
  } guard{a, program};

  r = a.compile(program, static_cast<int>(opts.size()), opts.data());
  std::size_t log_size = 0;
  a.log_size(program, &log_size);
  std::string log(log_size, '\0');
  if (log_size) a.log(program, log.data());
  while (!log.empty() && (log.back() == '\0' || log.back() == '\n')) log.pop_back();
  if (r != NVRTC_SUCCESS)
    throw CompileError(fmt::format("NVRTC could not compile {} ({}):\n{}", name, a.error_string(r),
                                   annotate(log, name, source, headers)));
  CompileResult result;
  std::size_t size = 0;
  a.cubin_size(program, &size);
  result.cubin.resize(size);
  a.cubin(program, result.cubin.data());
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  auto largest = [&log](const std::regex& pattern) {
    int value = -1;
    for (std::sregex_iterator it(log.begin(), log.end(), pattern), end; it != end; ++it) value = std::max(value, std::stoi((*it)[1]));
    return value;
  };
  static const std::regex regs(R"(Used (\d+) registers)"), spills(R"((\d+) bytes spill stores)"),
      stack(R"((\d+) bytes stack frame)");
  result.registers = largest(regs);
  result.spill_bytes = largest(spills);
  result.stack_bytes = largest(stack);
  result.performance_warnings = performance_warnings(log);
  result.log = std::move(log);
  return result;
}

}  // namespace kjit::compile

