#include "spec/definition.hpp"

#include <fmt/format.h>

namespace kjit::spec {

using nlohmann::json;

namespace {
std::vector<DefinitionTensor> read_tensors(const json& j, const std::string& where, const std::string& def) {
  std::vector<DefinitionTensor> out;
  if (!j.is_object()) throw SpecError(fmt::format("definition \"{}\": \"{}\" must be an object", def, where));
  for (auto it = j.begin(); it != j.end(); ++it) {
    DefinitionTensor t;
    t.name = it.key();
    const json& v = it.value();
    if (!v.is_object() || !v.contains("dtype") || !v["dtype"].is_string())
      throw SpecError(fmt::format("definition \"{}\": {}.{} needs a string \"dtype\"", def, where, t.name));
    t.dtype = v["dtype"].get<std::string>();
    if (v.contains("shape") && v["shape"].is_array()) {
      for (const auto& a : v["shape"]) {
        if (a.is_string()) t.shape.push_back(a.get<std::string>());
        else if (a.is_number_integer()) t.shape.push_back(std::to_string(a.get<std::int64_t>()));
        else throw SpecError(fmt::format("definition \"{}\": {}.{} has a bad shape entry {}", def, where, t.name, a.dump()));
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}
}  // namespace

Definition parse_definition(const Spec& spec) {
  const json& j = spec.fields;
  Definition d;
  d.name = j.value("name", std::string("<unnamed>"));
  d.op_type = spec.op;
  if (!j["axes"].is_object()) throw SpecError(fmt::format("definition \"{}\": \"axes\" must be an object", d.name));
  for (auto it = j["axes"].begin(); it != j["axes"].end(); ++it) {
    const json& a = it.value();
    std::string type = a.is_object() ? a.value("type", std::string()) : std::string();
    if (type == "const") {
      if (!a.contains("value") || !a["value"].is_number_integer())
        throw SpecError(fmt::format("definition \"{}\": const axis \"{}\" needs an integer \"value\"", d.name, it.key()));
      d.axes[it.key()] = a["value"].get<std::int64_t>();
    } else if (type == "var") {
      d.axes[it.key()] = std::nullopt;
    } else {
      throw SpecError(fmt::format("definition \"{}\": axis \"{}\" must have \"type\" const or var", d.name, it.key()));
    }
  }
  d.inputs = read_tensors(j["inputs"], "inputs", d.name);
  if (j.contains("outputs")) d.outputs = read_tensors(j["outputs"], "outputs", d.name);
  if (j.contains("constraints") && j["constraints"].is_array())
    for (const auto& c : j["constraints"])
      if (c.is_string()) d.constraints.push_back(c.get<std::string>());
  d.reference = j.value("reference", std::string());
  return d;
}

std::int64_t Definition::const_axis(const std::string& axis) const {
  auto it = axes.find(axis);
  if (it == axes.end()) throw SpecError(fmt::format("definition \"{}\": has no axis \"{}\"", name, axis));
  if (!it->second) throw SpecError(fmt::format("definition \"{}\": axis \"{}\" must be const for op type \"{}\"", name, axis, op_type));
  return *it->second;
}

const DefinitionTensor* Definition::input(const std::string& t) const {
  for (const auto& x : inputs)
    if (x.name == t) return &x;
  return nullptr;
}

const DefinitionTensor* Definition::output(const std::string& t) const {
  for (const auto& x : outputs)
    if (x.name == t) return &x;
  return nullptr;
}

DType Definition::tensor_dtype(const std::string& t) const {
  const DefinitionTensor* x = input(t);
  if (!x) x = output(t);
  if (!x) throw SpecError(fmt::format("definition \"{}\": has no tensor \"{}\"", name, t));
  auto d = parse_dtype(x->dtype);
  if (!d) throw SpecError(fmt::format("definition \"{}\": tensor \"{}\" has unknown dtype \"{}\"", name, t, x->dtype));
  return *d;
}

}  // namespace kjit::spec
