// The templates and kernel headers under templates/, embedded at build time.
// KJIT_TEMPLATE_DIR, when set, is read first (for template development).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kjit::codegen {

struct EmbeddedFile {
  std::string_view name;  // path relative to templates/, e.g. "kjit/norm.cuh"
  std::string_view text;
};
extern const EmbeddedFile kEmbeddedFiles[];
extern const std::size_t kEmbeddedFileCount;

// The text of a template or header, or nullopt.
std::optional<std::string> load_template_file(std::string_view name);

// The kjit headers a source includes with #include "..." (transitively), as
// (name, text) pairs sorted by name; NVRTC gets them as in-memory headers.
std::vector<std::pair<std::string, std::string>> collect_headers(std::string_view source);

// Names of the system headers it includes with #include <...> (transitively).
std::vector<std::string> collect_system_headers(std::string_view source);

}  // namespace kjit::codegen
