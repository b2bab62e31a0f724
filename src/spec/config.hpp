// Model presets and sweep grids: the specs a model needs.
//
//   {"name": "Llama-3.1-8B", "arch": ["sm_90a"],
//    "specs": [{"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"}, ...],
//    "grids": [{"op": ["rmsnorm", "fused_add_rmsnorm"], "hidden_size": [4096], "dtype": "bfloat16"}],
//    "shapes": {"batch_size": [1, 128, 16384]}}
//
// A grid is expanded to the cartesian product of its list-valued fields.
// "shapes" gives the run-time axis values used when the config is benchmarked (every
// combination of them; a list of such objects for several sets); a spec or grid may carry
// its own "shapes" (e.g. kv_len for decode, a smaller batch for 128k-wide sampling rows),
// which replace the config's for its specs.
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
  using Shapes = std::map<std::string, std::vector<std::int64_t>>;  // axis -> values
  std::vector<nlohmann::json> specs;        // explicit specs, then grids expanded; duplicates removed
  std::vector<Shapes> shapes;               // the config's shape sets
  std::vector<std::vector<Shapes>> spec_shapes;  // one per spec: its own sets, else empty

  const std::vector<Shapes>& shapes_of(std::size_t spec) const {
    return spec_shapes[spec].empty() ? shapes : spec_shapes[spec];
  }
};

ModelConfig parse_config(const nlohmann::json& config, const std::string& where);
ModelConfig load_config(const std::string& path);  // SpecError on a bad file

}  // namespace kjit::spec
