// Content-addressed keys. Two levels:
//   source key = hash(rendered source, each kjit header by content, options, arch, kjit ABI version)
//   cache key  = hash(source key, NVRTC version, each CUDA system header by content)
// A bundle is indexed by source key, so a process with a bundle needs neither
// NVRTC nor the CUDA headers to find its cubins; the disk cache by cache key,
// so a new NVRTC or toolkit never reuses an old cubin. Paths and times never enter
// a key. Finding the toolchain id means loading NVRTC (~5 ms), so the disk cache
// remembers it under a fingerprint (path, size, mtime of libnvrtc and the headers):
// a warm process then needs no NVRTC at all.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kjit::cache {

// Bumped whenever generated code or the kernel ABI changes without the source changing.
inline constexpr int kAbiVersion = 1;

using HeaderList = std::vector<std::pair<std::string, std::string>>;

std::string source_key(std::string_view source, const HeaderList& headers, const std::vector<std::string>& options,
                       std::string_view arch);
std::string cache_key(std::string_view source_key, std::string_view toolchain_id);

// Exact: loads NVRTC (UnavailableError if it cannot) and hashes the headers.
std::string toolchain_id(const std::vector<std::string>& system_headers);
// Cheap (stat only); "" when libnvrtc's path is unknown.
std::string toolchain_fingerprint(const std::vector<std::string>& system_headers);

// xxh3-64 of bytes as 16 hex digits (entry checksums).
std::string checksum(std::string_view bytes);

}  // namespace kjit::cache
