// JSON text -> Spec, and the field reader families use to validate their fields.
// Every refusal is a SpecError naming the op, the field, the value and what is allowed.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "kjit/kjit.hpp"

namespace kjit::spec {

struct Spec {
  std::string op;          // kjit op, or a definition's op_type
  nlohmann::json fields;   // kjit spec: every field but "op"; definition: the whole file
  bool is_definition = false;
};

// Accepts kjit's own spec ({"op": ...}) and FlashInfer-Bench definition files
// ("op_type" or the older "type", with "axes", "inputs", "outputs").
Spec parse_spec(std::string_view json_text);
Spec spec_from_json(const nlohmann::json& json);

// Reads and validates a kjit spec's fields; finish() refuses any field not read.
class FieldReader {
 public:
  explicit FieldReader(const Spec& spec);

  std::int64_t integer(std::string_view name, std::int64_t min, std::int64_t max,
                       std::optional<std::int64_t> fallback = std::nullopt);
  std::int64_t integer_of(std::string_view name, std::span<const std::int64_t> allowed,
                          std::optional<std::int64_t> fallback = std::nullopt);
  double number(std::string_view name, double min, double max, std::optional<double> fallback = std::nullopt);
  bool boolean(std::string_view name, std::optional<bool> fallback = std::nullopt);
  std::string choice(std::string_view name, std::span<const std::string_view> allowed,
                     std::optional<std::string_view> fallback = std::nullopt);
  DType dtype(std::string_view name, std::span<const DType> allowed,
              std::optional<DType> fallback = std::nullopt);
  // Whether the spec gives the field (to refuse fields that do not go together).
  bool has(std::string_view name) const;
  void finish();

  [[noreturn]] void fail(std::string_view name, const std::string& problem) const;

 private:
  const nlohmann::json* find(std::string_view name, bool required);
  const Spec& spec_;
  std::set<std::string, std::less<>> read_;
};

}  // namespace kjit::spec
