// kjit: JIT-generated GPU kernels for LLM inference, behind a small handle API.
//
//   kjit::Engine engine;                                  // cache, bundle, arch
//   kjit::Kernel norm = engine.get(R"({"op": "rmsnorm", "hidden_size": 4096,
//                                      "dtype": "bfloat16"})");
//   norm.launch({x, weight, out, kjit::Arg(rows), kjit::Arg(1e-6f)}, stream);
//
// A spec (JSON) picks a kernel family; the family fills a CUDA template; NVRTC
// compiles it; the cubin is cached in memory and on disk; the CUDA driver loads
// it. `get` is thread-safe and does all of that once per spec; `launch` does
// no hashing, no allocation and no JSON.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "kjit/types.hpp"

#pragma GCC visibility push(default)  // the public API is what libkjit exports
namespace kjit {

// ---------------------------------------------------------------------------
// Errors. Every failure is a kjit::Error; the subclass says which stage failed
// and the message names the spec field, template line, source line or CUDA
// error name involved.
// ---------------------------------------------------------------------------
enum class ErrorCode : int {
  ok = 0,
  spec = 1,         // bad spec: unknown op, missing/extra field, bad value
  template_ = 2,    // template syntax or rendering error (template:line:col)
  compile = 3,      // NVRTC rejected the generated source
  cache = 4,        // cache or bundle could not be used (never for a mere miss)
  cuda = 5,         // a CUDA driver call failed
  unavailable = 6,  // libcuda / libnvrtc / a GPU is missing
  argument = 7,     // launch arguments do not match the kernel's signature
  internal = 8,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

struct SpecError : Error { explicit SpecError(const std::string& m) : Error(ErrorCode::spec, m) {} };
struct TemplateError : Error { explicit TemplateError(const std::string& m) : Error(ErrorCode::template_, m) {} };
struct CompileError : Error { explicit CompileError(const std::string& m) : Error(ErrorCode::compile, m) {} };
struct CacheError : Error { explicit CacheError(const std::string& m) : Error(ErrorCode::cache, m) {} };
struct CudaError : Error { explicit CudaError(const std::string& m) : Error(ErrorCode::cuda, m) {} };
struct UnavailableError : Error { explicit UnavailableError(const std::string& m) : Error(ErrorCode::unavailable, m) {} };
struct ArgumentError : Error { explicit ArgumentError(const std::string& m) : Error(ErrorCode::argument, m) {} };

// ---------------------------------------------------------------------------
// Launch arguments: a device pointer, a DLPack tensor (checked against the
// signature: dtype, rank, constant dims, dims bound to an axis argument), an
// integer or a float. Small and trivially copyable.
// ---------------------------------------------------------------------------
class Arg {
 public:
  enum class Kind : std::uint8_t { pointer, tensor, integer, real };

  Arg() : Arg(static_cast<const void*>(nullptr)) {}
  Arg(const void* pointer) : kind_(Kind::pointer) { value_.pointer = pointer; }
  Arg(const DLTensor* tensor) : kind_(Kind::tensor) { value_.tensor = tensor; }
  Arg(const DLTensor& tensor) : Arg(&tensor) {}
  Arg(std::int64_t v) : kind_(Kind::integer) { value_.integer = v; }
  Arg(int v) : Arg(static_cast<std::int64_t>(v)) {}
  Arg(double v) : kind_(Kind::real) { value_.real = v; }
  Arg(float v) : Arg(static_cast<double>(v)) {}

  Kind kind() const { return kind_; }
  const void* pointer() const { return value_.pointer; }
  const DLTensor* tensor() const { return value_.tensor; }
  std::int64_t integer() const { return value_.integer; }
  double real() const { return value_.real; }

 private:
  Kind kind_;
  union {
    const void* pointer;
    const DLTensor* tensor;
    std::int64_t integer;
    double real;
  } value_;
};

// One kernel parameter as the family declares it. Tensor shapes name axes:
// a number is a compile-time constant, a name refers to an integer parameter
// of the same name (e.g. "batch_size").
struct Param {
  enum class Kind : std::uint8_t { tensor, integer, real };
  enum class Access : std::uint8_t { read, write, read_write };  // tensors: how the kernel uses it
  std::string name;
  Kind kind = Kind::tensor;
  DType dtype = DType::float32;     // element type of a tensor
  std::vector<std::string> shape;   // tensors only
  Access access = Access::read;
  // Tensors: the byte multiple the address must be, at least the element size (more when
  // the kernel moves the tensor in vectors). Checked at every launch.
  std::uint32_t alignment = 1;
  // Numbers: the accepted range, checked at every launch (a NaN never passes).
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  bool min_exclusive = false;
};

enum class ArtifactSource : std::uint8_t { nvrtc, disk_cache, bundle, memory };
std::string_view to_string(ArtifactSource source);

// What was built for a spec: enough for `kjit compile` and for tuning tables.
struct KernelInfo {
  std::string op;
  std::string spec;          // canonical JSON of the spec
  std::string entry;         // extern "C" symbol
  std::string arch;          // e.g. "sm_90a"
  std::string key;           // cache key (hex)
  std::string source_key;    // bundle key: the same without the NVRTC version
  ArtifactSource source = ArtifactSource::nvrtc;
  double compile_seconds = 0;  // NVRTC time when it was compiled (from metadata on a hit)
  int registers = -1;          // per thread, from the cubin
  int spill_bytes = -1;        // spill stores per thread, from the cubin
  int stack_bytes = -1;        // local memory per thread (spills, arrays not kept in registers)
  // ptxas' "Potential Performance Loss" notes, one per line: wgmma serialized (a tensor-core
  // kernel several times slower than it should be), and the like. "" when none.
  std::string performance_warnings;
  std::size_t cubin_bytes = 0;
  std::vector<Param> params;
};

// A compiled cubin with its description; produced without any GPU.
struct Artifact {
  KernelInfo info;
  std::string cubin;
};

namespace detail { struct KernelState; }

// A loaded kernel. Cheap to copy (a shared pointer); usable from any thread.
// The function is loaded once per device, in that device's primary context, on
// first use there.
class Kernel {
 public:
  Kernel() = default;
  explicit Kernel(std::shared_ptr<const detail::KernelState> state) : state_(std::move(state)) {}

  // Arguments in signature order. `stream` is a CUstream (nullptr: legacy
  // default stream of the current context). Throws ArgumentError on a
  // mismatch, CudaError if the launch fails. A zero-sized grid launches nothing.
  void launch(std::span<const Arg> args, void* stream = nullptr) const;
  void launch(std::initializer_list<Arg> args, void* stream = nullptr) const {
    launch(std::span<const Arg>(args.begin(), args.size()), stream);
  }

  const KernelInfo& info() const;
  // Blocks of the kernel's (unconditional) launch that fit on one SM of the current
  // device at once: what a planner needs to size waves.
  int max_blocks_per_sm() const;
  explicit operator bool() const { return state_ != nullptr; }

 private:
  std::shared_ptr<const detail::KernelState> state_;
};

struct EngineOptions {
  std::string cache_dir;     // empty: $KJIT_CACHE_DIR, else $XDG_CACHE_HOME/kjit, else ~/.cache/kjit
  bool disk_cache = true;    // false: memory cache only
  std::uint64_t cache_size_limit = 4ull << 30;  // bytes; least recently used entries go first
  std::string bundle_dir;    // empty: $KJIT_BUNDLE (if set)
  std::string arch;          // empty: the current device's (sm_90 -> sm_90a)
  bool allow_nvrtc = true;   // false (or KJIT_DISABLE_NVRTC=1): bundle and cache only
};

class Engine {
 public:
  explicit Engine(EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Spec (kjit JSON or a FlashInfer-Bench definition) -> loaded kernel.
  // Thread-safe; a repeated spec is a memory-cache hit.
  Kernel get(std::string_view spec_json);

  // Spec -> cubin for `arch` (empty: the engine's arch), with no GPU needed.
  Artifact build(std::string_view spec_json, std::string_view arch = {});

  // Spec -> the generated CUDA source, as NVRTC would see it.
  std::string render(std::string_view spec_json);

  // The arch `get` compiles for: the option, else the current device's.
  std::string arch();
  const EngineOptions& options() const;
  std::string cache_dir() const;  // "" when the disk cache is off or cannot be written

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

std::string_view version();

}  // namespace kjit
#pragma GCC visibility pop
