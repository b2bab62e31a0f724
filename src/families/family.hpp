// A kernel family turns a validated spec into a KernelPlan: which template,
// with which constants, launched how, taking which arguments. One file per
// family; registry.cpp lists them.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kjit/kjit.hpp"
#include "spec/definition.hpp"
#include "spec/spec.hpp"

namespace kjit::families {

// One grid dimension: ceil(integer argument / divisor) * multiplier, or a constant.
struct GridDim {
  int param = -1;  // index into the signature; -1 for a constant
  std::int64_t divisor = 1;
  std::uint32_t constant = 1;
  std::int64_t multiplier = 1;  // e.g. the blocks of a cluster that share one row
};

// A TMA descriptor (CUtensorMap) that each launch builds from a tensor argument and passes
// after the arguments (a `const __grid_constant__ kjit::bulk::TensorMap` in the entry
// point), for kernels that copy tiles with the tensor memory accelerator: the contiguous
// tensor seen as `dims` (elements, innermost first), copied in boxes of `box` elements with
// the 128-byte swizzle. One dim may be 0: as many as the tensor holds, or, where the launch
// cannot know that (a pointer argument), as many as addresses allow: the kernel copies
// only boxes inside its data there.
struct TensorMapRule {
  int param = -1;                  // the tensor argument
  std::vector<std::int64_t> dims;  // the view, innermost first
  std::vector<std::uint32_t> box;  // per dim
};

struct LaunchRule {
  std::uint32_t block[3] = {1, 1, 1};
  GridDim grid[3];
  std::uint32_t dynamic_shared_bytes = 0;
  // Conditional rules launch another entry point of the same module, while integer
  // argument `when_param` is at most `at_most` (e.g. a form for small batches).
  std::string entry;  // empty: the plan's entry
  int when_param = -1;
  std::int64_t at_most = 0;
  // The entry waits for the previous kernel in the stream itself (griddepcontrol.wait
  // before its first read), so it is launched to overlap that kernel's tail
  // (programmatic stream serialization) where the driver supports it.
  bool waits_for_previous_grid = false;
  // > 0: a persistent kernel. The grid above is its work (blocks it would have launched);
  // it is launched as min(work, this many blocks per SM) blocks along x, and each block
  // walks the work items blockIdx.x, + gridDim.x, ... in the order of their linear index,
  // recomputing the work grid from its own arguments.
  int persistent_blocks_per_sm = 0;
  std::vector<TensorMapRule> tensor_maps;  // passed after the arguments, in this order
};

struct KernelPlan {
  std::string op;
  nlohmann::json spec;             // canonical kjit spec: every field, defaults filled in
  std::string template_name;       // entry template, e.g. "norm.cu.j2"
  nlohmann::json template_params;  // the template's context ("entry" is added)
  std::string entry;               // extern "C" symbol
  std::vector<Param> params;       // in the entry point's order
  LaunchRule launch;                          // unconditional, the plan's entry
  std::vector<LaunchRule> conditional_launches;  // tried first, in order
};

class Family {
 public:
  virtual ~Family() = default;
  virtual std::string_view name() const = 0;
  virtual std::vector<std::string_view> ops() const = 0;
  // FlashInfer-Bench op types this family can build from a definition file.
  virtual std::vector<std::string_view> definition_op_types() const { return {}; }
  virtual KernelPlan plan(const spec::Spec& spec) const = 0;
  // A definition file -> the equivalent kjit spec.
  virtual nlohmann::json spec_from_definition(const spec::Definition& definition) const;
};

// Helpers for declaring signatures.
Param tensor_param(std::string name, DType dtype, std::vector<std::string> shape,
                   Param::Access access = Param::Access::read);
// A tensor the kernel moves in vectors of vector_bytes (16-byte loads, cp.async): its
// address must be a multiple of vector_bytes, which every launch checks.
Param vector_param(std::string name, DType dtype, std::vector<std::string> shape, int vector_bytes,
                   Param::Access access = Param::Access::read);
Param integer_param(std::string name, double min = 0, double max = std::numeric_limits<double>::infinity());
Param real_param(std::string name, double min = -std::numeric_limits<double>::infinity(),
                 double max = std::numeric_limits<double>::infinity(), bool min_exclusive = false);
int param_index(const std::vector<Param>& params, std::string_view name);

// Helpers for template parameters.
std::string_view cuda_type(DType dtype);           // "float", "__half", "__nv_bfloat16", ...
int widest_vector(DType dtype, std::int64_t count);  // elements per access: <= 16 bytes, divides count

// The family for an op (kjit op or definition op type); SpecError lists the known ones.
const Family& find_family(const spec::Spec& spec);
std::vector<const Family*> all_families();

// Spec (kjit or definition) -> plan.
KernelPlan plan_spec(const spec::Spec& spec);

}  // namespace kjit::families
