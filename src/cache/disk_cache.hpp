// The on-disk cubin cache: one file per key, <dir>/<key>.kjit, holding a
// metadata record (JSON), the cubin, and a checksum over both.
//
// Writes go to a temp file in the same directory, are fsync'ed, then renamed
// into place: readers never see a partial file, and many processes writing the
// same key all succeed and leave one valid file. A damaged entry is detected
// by its checksum, removed, and rebuilt by the caller. A directory that cannot
// be written (read-only, missing parent, full) stops writes for this process
// with one warning; what it already holds is still read.
// Hits refresh the file's mtime, which pruning uses as "last used".
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace kjit::cache {

struct CacheEntry {
  nlohmann::json meta;  // spec, arch, options, nvrtc version, compile time, registers, spills
  std::string cubin;
};

struct CacheFile {
  std::string key;
  std::string path;
  std::uint64_t bytes = 0;
  std::int64_t last_used = 0;  // seconds since the epoch (mtime)
};

class DiskCache {
 public:
  DiskCache(std::string dir, std::uint64_t size_limit);

  const std::string& dir() const { return dir_; }
  bool writable() const;  // false once a write failed

  // nullopt on a miss or a damaged entry (which is removed).
  std::optional<CacheEntry> load(const std::string& key);
  // Best effort: a failure stops further writes, with one warning.
  void store(const std::string& key, const CacheEntry& entry);

  // Small named values kept beside the entries (the toolchain memo).
  std::optional<std::string> recall(const std::string& name);
  void remember(const std::string& name, const std::string& value);

  std::vector<CacheFile> list() const;
  // Removes least recently used entries until the total is <= limit; returns bytes freed.
  std::uint64_t prune(std::uint64_t limit);
  // Checks every entry; removes damaged ones; returns (ok, damaged).
  std::pair<int, int> verify();
  int clear();

  // Serialization, exposed for tests and bundles.
  static std::string encode(const CacheEntry& entry);
  static std::optional<CacheEntry> decode(const std::string& bytes, std::string* problem = nullptr);

  // $KJIT_CACHE_DIR, else $XDG_CACHE_HOME/kjit, else $HOME/.cache/kjit.
  static std::string default_dir();

 private:
  void stop_writing(const std::string& why);
  std::string path_for(const std::string& key) const { return dir_ + "/" + key + ".kjit"; }
  std::string dir_;
  std::uint64_t size_limit_;
  mutable std::mutex mutex_;
  bool read_only_ = false;
  bool dir_ready_ = false;
};

// Writes bytes to path atomically (temp file in the same directory, fsync,
// rename). Returns an errno-style message on failure, "" on success.
std::string write_file_atomically(const std::string& path, const std::string& bytes);
std::optional<std::string> read_file(const std::string& path);
// mkdir -p; "" on success, else the reason.
std::string make_directories(const std::string& path);

}  // namespace kjit::cache
