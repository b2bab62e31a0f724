// NVRTC, loaded with dlopen on first use: CUDA source -> cubin for one arch.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kjit::compile {

struct CompileResult {
  std::string cubin;
  std::string log;
  double seconds = 0;
  // From ptxas' report, the largest over the module's kernels:
  int registers = -1;    // per thread
  int spill_bytes = -1;  // spill stores, bytes per thread
  int stack_bytes = -1;  // local memory frame per thread: spills, and arrays not kept in registers
  // ptxas' "Potential Performance Loss" notes, one per line (e.g. wgmma serialized); "" if none.
  std::string performance_warnings;
};

using HeaderList = std::vector<std::pair<std::string, std::string>>;  // (include name, text)

// Where libnvrtc will be loaded from, found without loading it: $KJIT_NVRTC_LIBRARY,
// else the first libnvrtc.so.{13,12,} in $LD_LIBRARY_PATH, $CUDA_HOME/lib64,
// /usr/local/cuda/lib64 or the system lib dirs; "" if only the loader can find it.
std::string nvrtc_library_path();

// "13.0". Throws UnavailableError when libnvrtc cannot be loaded or NVRTC is
// disabled (KJIT_DISABLE_NVRTC=1).
std::string nvrtc_version();
bool nvrtc_available(std::string* why = nullptr);

// Checks an arch name: sm_XY with an optional a/f suffix, XY >= 80 (SpecError otherwise).
std::string normalize_arch(std::string_view arch);

// The options every compile uses for `arch` (part of the cache key).
std::vector<std::string> compile_options(std::string_view arch);

// The CUDA include directory for <cuda_fp16.h> & co: $KJIT_CUDA_INCLUDE,
// $CUDA_HOME/include, $CUDA_PATH/include, /usr/local/cuda/include, or the
// build-time one; "" if none has cuda_fp16.h.
std::string cuda_include_dir();

// ptxas' "Potential Performance Loss" notes in a compile log, one per line; "" if none.
std::string performance_warnings(const std::string& ptxas_log);

// Compiles; CompileError carries NVRTC's log and the source lines it names.
CompileResult compile_cubin(const std::string& source, const std::string& name, const HeaderList& headers,
                            const std::vector<std::string>& options);

}  // namespace kjit::compile
