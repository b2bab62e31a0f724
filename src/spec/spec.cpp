#include "spec/spec.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace kjit::spec {

using nlohmann::json;

Spec parse_spec(std::string_view text) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    std::string what = e.what();  // "[json.exception.parse_error.101] parse error at line L, column C: ..."
    if (auto p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    throw SpecError("spec is not valid JSON: " + what);
  }
  return spec_from_json(j);
}

Spec spec_from_json(const json& j) {
  if (!j.is_object()) throw SpecError(fmt::format("spec must be a JSON object, got {}", j.type_name()));
  Spec s;
  if (j.contains("op")) {
    if (!j["op"].is_string()) throw SpecError("spec field \"op\" must be a string");
    s.op = j["op"].get<std::string>();
    s.fields = j;
    s.fields.erase("op");
    return s;
  }
  const char* type_field = j.contains("op_type") ? "op_type" : j.contains("type") ? "type" : nullptr;
  if (type_field && j.contains("axes") && j.contains("inputs")) {
    if (!j[type_field].is_string())
      throw SpecError(fmt::format("definition field \"{}\" must be a string", type_field));
    s.op = j[type_field].get<std::string>();
    s.fields = j;
    s.is_definition = true;
    return s;
  }
  throw SpecError("spec has no \"op\" field (and is not a FlashInfer-Bench definition with "
                  "\"op_type\", \"axes\" and \"inputs\")");
}

FieldReader::FieldReader(const Spec& spec) : spec_(spec) {}

void FieldReader::fail(std::string_view name, const std::string& problem) const {
  throw SpecError(fmt::format("spec for op \"{}\": field \"{}\" {}", spec_.op, name, problem));
}

const json* FieldReader::find(std::string_view name, bool required) {
  read_.emplace(name);
  auto it = spec_.fields.find(std::string(name));
  if (it == spec_.fields.end()) {
    if (required) fail(name, "is missing");
    return nullptr;
  }
  return &*it;
}

std::int64_t FieldReader::integer(std::string_view name, std::int64_t min, std::int64_t max,
                                  std::optional<std::int64_t> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return *fallback;
  if (!v->is_number_integer()) fail(name, fmt::format("must be an integer, got {}", v->dump()));
  auto x = v->get<std::int64_t>();
  if (x < min || x > max) fail(name, fmt::format("= {} is out of range: allowed {}..{}", x, min, max));
  return x;
}

std::int64_t FieldReader::integer_of(std::string_view name, std::span<const std::int64_t> allowed,
                                     std::optional<std::int64_t> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return *fallback;
  if (!v->is_number_integer()) fail(name, fmt::format("must be an integer, got {}", v->dump()));
  auto x = v->get<std::int64_t>();
  for (auto a : allowed)
    if (a == x) return x;
  fail(name, fmt::format("= {} is not supported: allowed {}", x, fmt::join(allowed, ", ")));
}

double FieldReader::number(std::string_view name, double min, double max, std::optional<double> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return *fallback;
  if (!v->is_number()) fail(name, fmt::format("must be a number, got {}", v->dump()));
  double x = v->get<double>();
  if (!(x >= min && x <= max)) fail(name, fmt::format("= {} is out of range: allowed {}..{}", x, min, max));
  return x;
}

bool FieldReader::has(std::string_view name) const { return spec_.fields.contains(std::string(name)); }

bool FieldReader::boolean(std::string_view name, std::optional<bool> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return *fallback;
  if (!v->is_boolean()) fail(name, fmt::format("must be true or false, got {}", v->dump()));
  return v->get<bool>();
}

std::string FieldReader::choice(std::string_view name, std::span<const std::string_view> allowed,
                                std::optional<std::string_view> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return std::string(*fallback);
  if (!v->is_string()) fail(name, fmt::format("must be a string, got {}", v->dump()));
  auto x = v->get<std::string>();
  for (auto a : allowed)
    if (a == x) return x;
  fail(name, fmt::format("= \"{}\" is not supported: allowed {}", x, fmt::join(allowed, ", ")));
}

DType FieldReader::dtype(std::string_view name, std::span<const DType> allowed, std::optional<DType> fallback) {
  const json* v = find(name, !fallback);
  if (!v) return *fallback;
  std::vector<std::string_view> names;
  for (auto d : allowed) names.push_back(dtype_name(d));
  if (!v->is_string()) fail(name, fmt::format("must be a dtype string ({}), got {}", fmt::join(names, ", "), v->dump()));
  auto text = v->get<std::string>();
  auto d = parse_dtype(text);
  for (auto a : allowed)
    if (d && *d == a) return a;
  fail(name, fmt::format("= \"{}\" is not a supported dtype: allowed {}", text, fmt::join(names, ", ")));
}

void FieldReader::finish() {
  std::vector<std::string> unknown;
  for (auto it = spec_.fields.begin(); it != spec_.fields.end(); ++it)
    if (!read_.count(it.key())) unknown.push_back(it.key());
  if (unknown.empty()) return;
  throw SpecError(fmt::format("spec for op \"{}\": unknown field{} \"{}\"; fields of this op: {}", spec_.op,
                              unknown.size() > 1 ? "s" : "", fmt::join(unknown, "\", \""),
                              fmt::join(read_, ", ")));
}

}  // namespace kjit::spec
