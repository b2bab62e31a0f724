#include "codegen/template_store.hpp"

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "kjit/kjit.hpp"

namespace kjit::codegen {

std::optional<std::string> load_template_file(std::string_view name) {
  if (name.find("..") != std::string_view::npos) return std::nullopt;
  if (const char* dir = std::getenv("KJIT_TEMPLATE_DIR"); dir && *dir) {
    std::ifstream in(fmt::format("{}/{}", dir, name), std::ios::binary);
    if (in) {
      std::ostringstream s;
      s << in.rdbuf();
      return s.str();
    }
  }
  for (std::size_t i = 0; i < kEmbeddedFileCount; ++i)
    if (kEmbeddedFiles[i].name == name) return std::string(kEmbeddedFiles[i].text);
  return std::nullopt;
}

namespace {
// Calls visit(name, is_system) for every #include directive in text.
template <class Visit>
void scan_includes(std::string_view text, Visit visit) {
  std::size_t pos = 0;
  while ((pos = text.find("#include", pos)) != std::string_view::npos) {
    pos += 8;
    std::size_t b = text.find_first_not_of(" \t", pos);
    if (b == std::string_view::npos) break;
    char open = text[b];
    if (open != '"' && open != '<') continue;
    char close = open == '"' ? '"' : '>';
    std::size_t e = text.find(close, b + 1);
    if (e == std::string_view::npos) break;
    visit(std::string(text.substr(b + 1, e - b - 1)), open == '<');
    pos = e;
  }
}

void walk(std::string_view text, std::map<std::string, std::string>& local, std::set<std::string>& system) {
  scan_includes(text, [&](const std::string& name, bool is_system) {
    if (is_system) { system.insert(name); return; }
    if (local.count(name)) return;
    auto body = load_template_file(name);
    if (!body) throw TemplateError(fmt::format("generated source includes \"{}\", which is not a kjit header", name));
    auto& slot = local[name] = std::move(*body);
    walk(slot, local, system);
  });
}
}  // namespace

std::vector<std::pair<std::string, std::string>> collect_headers(std::string_view source) {
  std::map<std::string, std::string> local;
  std::set<std::string> system;
  walk(source, local, system);
  return {local.begin(), local.end()};
}

std::vector<std::string> collect_system_headers(std::string_view source) {
  std::map<std::string, std::string> local;
  std::set<std::string> system;
  walk(source, local, system);
  return {system.begin(), system.end()};
}

}  // namespace kjit::codegen
