// Model presets and sweep grids: the specs a model needs.
//
//   {"name": "Llama-3.1-8B", "arch": ["sm_90a"],
//    "specs": [{"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"}, ...],
//    "grids": [{"op": ["rmsnorm", "fused_add_rmsnorm"], "hidden_size": [4096], "dtype": "bfloat16"}],
//    "shapes": {"batch_size": [1, 128, 16384]}}
//
// A grid is expanded to the cartesian product of its list-valued fields.
// "shapes" gives the run-time axis values used when the config is benchmarked.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace kjit::spec {

struct ModelConfig {
  std::string name;
  std::vector<std::string> archs;
  std::vector<nlohmann::json> specs;  // explicit specs, then grids expanded; duplicates removed
  std::map<std::string, std::vector<std::int64_t>> shapes;
};

ModelConfig parse_config(const nlohmann::json& config, const std::string& where);
ModelConfig load_config(const std::string& path);  // SpecError on a bad file

}  // namespace kjit::spec
