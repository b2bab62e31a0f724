// FlashInfer-Bench definition files: named axes (const or var), input and
// output tensors over those axes, constraints, and a PyTorch reference.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "spec/spec.hpp"

namespace kjit::spec {

struct DefinitionTensor {
  std::string name;
  std::vector<std::string> shape;  // axis names; empty for a scalar
  std::string dtype;               // as written in the file
};

struct Definition {
  std::string name;
  std::string op_type;
  std::map<std::string, std::optional<std::int64_t>> axes;  // value set for const axes
  std::vector<DefinitionTensor> inputs;
  std::vector<DefinitionTensor> outputs;
  std::vector<std::string> constraints;
  std::string reference;

  // The value of a const axis; SpecError naming the definition if absent or var.
  std::int64_t const_axis(const std::string& axis) const;
  const DefinitionTensor* input(const std::string& tensor) const;
  const DefinitionTensor* output(const std::string& tensor) const;
  // The dtype of a tensor (input or output); SpecError if absent or unknown.
  DType tensor_dtype(const std::string& tensor) const;
};

Definition parse_definition(const Spec& spec);

}  // namespace kjit::spec
