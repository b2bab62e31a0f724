#include "families/family.hpp"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace kjit::families {

nlohmann::json Family::spec_from_definition(const spec::Definition& d) const {
  throw SpecError(fmt::format("definition \"{}\": family {} cannot import op type \"{}\"", d.name, name(), d.op_type));
}

Param tensor_param(std::string name, DType dtype, std::vector<std::string> shape, Param::Access access) {
  Param p{std::move(name), Param::Kind::tensor, dtype, std::move(shape), access};
  p.alignment = static_cast<std::uint32_t>(dtype_size(dtype));
  return p;
}
Param vector_param(std::string name, DType dtype, std::vector<std::string> shape, int vector_bytes,
                   Param::Access access) {
  Param p = tensor_param(std::move(name), dtype, std::move(shape), access);
  p.alignment = std::max(p.alignment, static_cast<std::uint32_t>(vector_bytes));
  return p;
}
Param integer_param(std::string name, double min, double max) {
  Param p{std::move(name), Param::Kind::integer, DType::int64, {}};
  p.min = min;
  p.max = max;
  return p;
}
Param real_param(std::string name, double min, double max, bool min_exclusive) {
  Param p{std::move(name), Param::Kind::real, DType::float32, {}};
  p.min = min;
  p.max = max;
  p.min_exclusive = min_exclusive;
  return p;
}

int param_index(const std::vector<Param>& params, std::string_view name) {
  for (std::size_t i = 0; i < params.size(); ++i)
    if (params[i].name == name) return static_cast<int>(i);
  return -1;
}

std::string_view cuda_type(DType d) {
  switch (d) {
    case DType::float16: return "__half";
    case DType::bfloat16: return "__nv_bfloat16";
    case DType::float32: return "float";
    case DType::float64: return "double";
    case DType::int32: return "int";
    case DType::int64: return "long long";
    case DType::int8: return "signed char";
    case DType::float8_e4m3: return "__nv_fp8_e4m3";
    default: return "unsigned char";  // uint8 and e5m2 travel as bytes
  }
}

int widest_vector(DType dtype, std::int64_t count) {
  int vec = 16 / static_cast<int>(dtype_size(dtype));
  while (vec > 1 && count % vec != 0) vec /= 2;
  return vec;
}

const Family& find_family(const spec::Spec& spec) {
  std::vector<std::string_view> known;
  for (const Family* f : all_families()) {
    auto names = spec.is_definition ? f->definition_op_types() : f->ops();
    for (auto op : names) {
      if (op == spec.op) return *f;
      known.push_back(op);
    }
  }
  if (spec.is_definition)
    throw SpecError(fmt::format("definition op type \"{}\" is not supported; supported op types: {}", spec.op,
                                fmt::join(known, ", ")));
  throw SpecError(fmt::format("unknown op \"{}\"; known ops: {}", spec.op, fmt::join(known, ", ")));
}

KernelPlan plan_spec(const spec::Spec& s) {
  const Family& family = find_family(s);
  if (!s.is_definition) return family.plan(s);
  nlohmann::json converted = family.spec_from_definition(spec::parse_definition(s));
  return family.plan(spec::spec_from_json(converted));
}

}  // namespace kjit::families
