// The kernel families kjit knows. Adding a family: one file in src/families/,
// its templates, and one line here.
#include "families/family.hpp"

namespace kjit::families {

std::unique_ptr<Family> make_normalization_family();
std::unique_ptr<Family> make_sampling_family();
std::unique_ptr<Family> make_attention_family();

std::vector<const Family*> all_families() {
  static const auto families = [] {
    std::vector<std::unique_ptr<Family>> list;
    list.push_back(make_normalization_family());
    list.push_back(make_sampling_family());
    list.push_back(make_attention_family());
    return list;
  }();
  std::vector<const Family*> out;
  for (const auto& f : families) out.push_back(f.get());
  return out;
}

}  // namespace kjit::families
