#include "spec/config.hpp"

#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "kjit/kjit.hpp"

namespace kjit::spec {

using nlohmann::json;

namespace {
void expand(const json& grid, json::const_iterator it, json current, std::vector<json>& out) {
  if (it == grid.end()) {
    out.push_back(std::move(current));
    return;
  }
  auto next = std::next(it);
  if (it.value().is_array()) {
    for (const auto& v : it.value()) {
      json c = current;
      c[it.key()] = v;
      expand(grid, next, std::move(c), out);
    }
  } else {
    current[it.key()] = it.value();
    expand(grid, next, std::move(current), out);
  }
}
}  // namespace

ModelConfig parse_config(const json& j, const std::string& where) {
  if (!j.is_object()) throw SpecError(fmt::format("config {}: must be a JSON object", where));
  ModelConfig c;
  c.name = j.value("name", where);
  if (j.contains("arch")) {
    const json& a = j["arch"];
    if (a.is_string()) c.archs.push_back(a.get<std::string>());
    else if (a.is_array()) for (const auto& x : a) c.archs.push_back(x.get<std::string>());
    else throw SpecError(fmt::format("config {}: \"arch\" must be a string or a list", where));
  }
  std::set<std::string> seen;
  auto add = [&](const json& s) {
    if (!s.is_object()) throw SpecError(fmt::format("config {}: every spec must be an object, got {}", where, s.dump()));
    if (seen.insert(s.dump()).second) c.specs.push_back(s);
  };
  if (j.contains("specs")) {
    if (!j["specs"].is_array()) throw SpecError(fmt::format("config {}: \"specs\" must be a list", where));
    for (const auto& s : j["specs"]) add(s);
  }
  if (j.contains("grids")) {
    if (!j["grids"].is_array()) throw SpecError(fmt::format("config {}: \"grids\" must be a list", where));
    for (const auto& g : j["grids"]) {
      if (!g.is_object()) throw SpecError(fmt::format("config {}: every grid must be an object", where));
      std::vector<json> expanded;
      expand(g, g.begin(), json::object(), expanded);
      for (const auto& s : expanded) add(s);
    }
  }
  if (j.contains("shapes")) {
    if (!j["shapes"].is_object()) throw SpecError(fmt::format("config {}: \"shapes\" must be an object", where));
    for (auto it = j["shapes"].begin(); it != j["shapes"].end(); ++it) {
      for (const auto& v : it.value().is_array() ? it.value() : json::array({it.value()})) {
        if (!v.is_number_integer()) throw SpecError(fmt::format("config {}: shape {} must hold integers", where, it.key()));
        c.shapes[it.key()].push_back(v.get<std::int64_t>());
      }
    }
  }
  if (c.specs.empty()) throw SpecError(fmt::format("config {}: no specs (give \"specs\" or \"grids\")", where));
  return c;
}

ModelConfig load_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw SpecError(fmt::format("config {} cannot be read", path));
  std::stringstream s;
  s << in.rdbuf();
  json j;
  try {
    j = json::parse(s.str());
  } catch (const std::exception& e) {
    throw SpecError(fmt::format("config {} is not valid JSON: {}", path, e.what()));
  }
  return parse_config(j, path);
}

}  // namespace kjit::spec
