// The metadata kept with a cubin (disk cache entries, bundles) and what a hit reads back
// from it, in one place, so a KernelInfo field that is written is also read.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kjit/kjit.hpp"

namespace kjit::detail {

inline nlohmann::json artifact_metadata(const KernelInfo& info, const std::string& nvrtc_version,
                                        const std::vector<std::string>& nvrtc_options) {
  return {{"spec", nlohmann::json::parse(info.spec)}, {"op", info.op}, {"entry", info.entry},
          {"arch", info.arch}, {"key", info.key}, {"source_key", info.source_key},
          {"nvrtc", nvrtc_version}, {"options", nvrtc_options}, {"kjit_version", std::string(kjit::version())},
          {"compile_seconds", info.compile_seconds}, {"registers", info.registers},
          {"spill_bytes", info.spill_bytes}, {"stack_bytes", info.stack_bytes},
          {"performance_warnings", info.performance_warnings}};
}

// The fields a hit takes from the metadata (the rest come from the spec's plan).
inline void read_artifact_metadata(const nlohmann::json& meta, KernelInfo& info) {
  info.key = meta.value("key", std::string());
  info.compile_seconds = meta.value("compile_seconds", 0.0);
  info.registers = meta.value("registers", -1);
  info.spill_bytes = meta.value("spill_bytes", -1);
  info.stack_bytes = meta.value("stack_bytes", -1);
  info.performance_warnings = meta.value("performance_warnings", std::string());
}

}  // namespace kjit::detail
