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
  auto read_shapes = [&](const json& object) {
    std::vector<ModelConfig::Shapes> sets;
    if (!object.contains("shapes")) return sets;
    const json& all = object["shapes"];
    for (const json& s : all.is_array() ? all : json::array({all})) {
      if (!s.is_object())
        throw SpecError(fmt::format("config {}: \"shapes\" must be an object or a list of objects", where));
      ModelConfig::Shapes shapes;
      for (auto it = s.begin(); it != s.end(); ++it) {
        for (const auto& v : it.value().is_array() ? it.value() : json::array({it.value()})) {
          if (!v.is_number_integer()) throw SpecError(fmt::format("config {}: shape {} must hold integers", where, it.key()));
          shapes[it.key()].push_back(v.get<std::int64_t>());
        }
      }
      sets.push_back(std::move(shapes));
    }
    return sets;
  };
  std::set<std::string> seen;
  auto add = [&](json s, const std::vector<ModelConfig::Shapes>& shapes) {
    if (!s.is_object()) throw SpecError(fmt::format("config {}: every spec must be an object, got {}", where, s.dump()));
    s.erase("shapes");  // benchmark axes, not a spec field
    if (seen.insert(s.dump()).second) {
      c.specs.push_back(std::move(s));
      c.spec_shapes.push_back(shapes);
    }
  };
  if (j.contains("specs")) {
    if (!j["specs"].is_array()) throw SpecError(fmt::format("config {}: \"specs\" must be a list", where));
    for (const auto& s : j["specs"]) add(s, s.is_object() ? read_shapes(s) : std::vector<ModelConfig::Shapes>{});
  }
  if (j.contains("grids")) {
    if (!j["grids"].is_array()) throw SpecError(fmt::format("config {}: \"grids\" must be a list", where));
    for (json g : j["grids"]) {
      if (!g.is_object()) throw SpecError(fmt::format("config {}: every grid must be an object", where));
      const std::vector<ModelConfig::Shapes> shapes = read_shapes(g);
      g.erase("shapes");
      std::vector<json> expanded;
      expand(g, g.begin(), json::object(), expanded);
      for (const auto& s : expanded) add(s, shapes);
    }
  }
  c.shapes = read_shapes(j);
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
