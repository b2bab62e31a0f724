// A bundle: a read-only directory of cubins plus manifest.json, made by
// `kjit pregen` and shipped with a server. Indexed by source key (see
// cache_key.hpp), so looking a kernel up needs no NVRTC.
//
//   manifest.json  {"format": 1, "kjit_version": ..., "entries": [{"source_key", "file",
//                   "checksum", "arch", "spec", "entry", "registers", ...}, ...]}
//   <source_key>.cubin
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace kjit::cache {

class Bundle {
 public:
  // CacheError if the directory or its manifest cannot be read.
  explicit Bundle(std::string dir);

  const std::string& dir() const { return dir_; }
  std::size_t size() const { return entries_.size(); }

  struct Hit {
    nlohmann::json meta;
    std::string cubin;
  };
  // nullopt if absent; a damaged cubin is reported (warning) and treated as absent.
  std::optional<Hit> find(const std::string& source_key) const;

 private:
  std::string dir_;
  std::map<std::string, nlohmann::json> entries_;
};

// Collects cubins into a new bundle directory, then publishes it with one
// directory rename (an existing bundle at `dir` is replaced whole).
class BundleWriter {
 public:
  explicit BundleWriter(std::string dir);  // CacheError if the staging directory cannot be made
  ~BundleWriter();
  void add(const std::string& source_key, const nlohmann::json& meta, const std::string& cubin);  // thread-safe
  void finish();

 private:
  std::string dir_, staging_;
  std::mutex mutex_;
  nlohmann::json entries_ = nlohmann::json::array();
  bool finished_ = false;
};

}  // namespace kjit::cache
