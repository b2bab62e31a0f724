#include "cache/cache_key.hpp"

#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include <sys/stat.h>

#include <fmt/format.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "compile/nvrtc.hpp"
#include "kjit/kjit.hpp"

namespace kjit::cache {
namespace {

// Length-prefixed fields, so ("ab","c") and ("a","bc") hash differently.
class Hasher {
 public:
  Hasher() { XXH3_128bits_reset(&state_); }
  Hasher& add(std::string_view field) {
    std::uint64_t n = field.size();
    XXH3_128bits_update(&state_, &n, sizeof n);
    XXH3_128bits_update(&state_, field.data(), field.size());
    return *this;
  }
  std::string hex() {
    XXH128_hash_t h = XXH3_128bits_digest(&state_);
    return fmt::format("{:016x}{:016x}", h.high64, h.low64);
  }

 private:
  XXH3_state_t state_;
};

// Content hash of a system header, computed once per process.
std::string system_header_hash(const std::string& dir, const std::string& name) {
  static std::mutex mutex;
  static std::map<std::string, std::string> memo;
  std::string path = dir + "/" + name;
  std::lock_guard lock(mutex);
  if (auto it = memo.find(path); it != memo.end()) return it->second;
  std::ifstream in(path, std::ios::binary);
  std::string value = "missing";
  if (in) {
    std::ostringstream s;
    s << in.rdbuf();
    value = checksum(s.str());
  }
  return memo[path] = value;
}

}  // namespace

std::string source_key(std::string_view source, const HeaderList& headers, const std::vector<std::string>& options,
                       std::string_view arch) {
  Hasher h;
  h.add("kjit-source").add(std::to_string(kAbiVersion)).add(kjit::version()).add(arch).add(source);
  for (const auto& [name, text] : headers) h.add(name).add(text);
  for (const auto& o : options) h.add(o);
  return h.hex();
}

std::string cache_key(std::string_view source_key, std::string_view toolchain) {
  return Hasher().add("kjit-cubin").add(source_key).add(toolchain).hex();
}

std::string toolchain_id(const std::vector<std::string>& system_headers) {
  Hasher h;
  h.add("kjit-toolchain").add(compile::nvrtc_version());
  const std::string dir = compile::cuda_include_dir();
  // The .h files include their .hpp companions; hash both so a toolkit update shows.
  for (const auto& name : system_headers) {
    h.add(name).add(system_header_hash(dir, name));
    if (name.size() > 2 && name.ends_with(".h")) h.add(system_header_hash(dir, name + "pp"));
  }
  return h.hex();
}

std::string toolchain_fingerprint(const std::vector<std::string>& system_headers) {
  const std::string library = compile::nvrtc_library_path();
  if (library.empty()) return "";
  Hasher h;
  auto add_stat = [&](const std::string& path) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) { h.add(path).add("missing"); return; }
    h.add(path).add(fmt::format("{}:{}:{}.{}", st.st_size, st.st_ino, st.st_mtim.tv_sec, st.st_mtim.tv_nsec));
  };
  add_stat(library);
  const std::string dir = compile::cuda_include_dir();
  for (const auto& name : system_headers) {
    add_stat(dir + "/" + name);
    if (name.ends_with(".h")) add_stat(dir + "/" + name + "pp");
  }
  return h.hex();
}

std::string checksum(std::string_view bytes) { return fmt::format("{:016x}", XXH3_64bits(bytes.data(), bytes.size())); }

}  // namespace kjit::cache
