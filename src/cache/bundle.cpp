#include "cache/bundle.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

#include "api/log.hpp"
#include "cache/cache_key.hpp"
#include "cache/disk_cache.hpp"
#include "kjit/kjit.hpp"

namespace kjit::cache {
namespace {
constexpr int kFormat = 1;

void remove_tree(const std::string& dir) {
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") ::unlink((dir + "/" + name).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(dir.c_str());
}
}  // namespace

Bundle::Bundle(std::string dir) : dir_(std::move(dir)) {
  auto text = read_file(dir_ + "/manifest.json");
  if (!text) throw CacheError(fmt::format("bundle {}: manifest.json cannot be read", dir_));
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(*text);
  } catch (const std::exception& e) {
    throw CacheError(fmt::format("bundle {}: manifest.json is not valid JSON: {}", dir_, e.what()));
  }
  if (manifest.value("format", 0) != kFormat || !manifest["entries"].is_array())
    throw CacheError(fmt::format("bundle {}: unsupported manifest format (expected {})", dir_, kFormat));
  for (const auto& e : manifest["entries"])
    if (e.contains("source_key") && e["source_key"].is_string()) entries_[e["source_key"].get<std::string>()] = e;
}

std::optional<Bundle::Hit> Bundle::find(const std::string& source_key) const {
  auto it = entries_.find(source_key);
  if (it == entries_.end()) return std::nullopt;
  const auto& meta = it->second;
  std::string path = dir_ + "/" + meta.value("file", source_key + ".cubin");
  auto cubin = read_file(path);
  if (!cubin || checksum(*cubin) != meta.value("checksum", "")) {
    log::warn(fmt::format("bundle cubin {} is missing or damaged; ignoring it", path));
    return std::nullopt;
  }
  return Hit{meta, std::move(*cubin)};
}

BundleWriter::BundleWriter(std::string dir) : dir_(std::move(dir)) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  std::string parent = dir_.find('/') == std::string::npos ? "." : dir_.substr(0, dir_.rfind('/'));
  if (!parent.empty()) {
    if (std::string why = make_directories(parent); !why.empty())
      throw CacheError(fmt::format("bundle {}: {}", dir_, why));
  }
  staging_ = fmt::format("{}.staging.{}", dir_, ::getpid());
  remove_tree(staging_);
  if (::mkdir(staging_.c_str(), 0755) != 0)
    throw CacheError(fmt::format("bundle {}: cannot create {}", dir_, staging_));
}

BundleWriter::~BundleWriter() {
  if (!finished_) remove_tree(staging_);
}

void BundleWriter::add(const std::string& source_key, const nlohmann::json& meta, const std::string& cubin) {
  std::string file = source_key + ".cubin";
  if (std::string why = write_file_atomically(staging_ + "/" + file, cubin); !why.empty())
    throw CacheError(fmt::format("bundle {}: {}", dir_, why));
  nlohmann::json e = meta;
  e["source_key"] = source_key;
  e["file"] = file;
  e["checksum"] = checksum(cubin);
  std::lock_guard lock(mutex_);
  entries_.push_back(std::move(e));
}

void BundleWriter::finish() {
  std::lock_guard lock(mutex_);
  std::sort(entries_.begin(), entries_.end(),
            [](const nlohmann::json& a, const nlohmann::json& b) { return a["source_key"] < b["source_key"]; });
  nlohmann::json manifest = {{"format", kFormat}, {"kjit_version", std::string(kjit::version())}, {"entries", entries_}};
  if (std::string why = write_file_atomically(staging_ + "/manifest.json", manifest.dump(1)); !why.empty())
    throw CacheError(fmt::format("bundle {}: {}", dir_, why));
  // Publish: move any old bundle aside, rename the new one into place, drop the old.
  std::string old = fmt::format("{}.old.{}", dir_, ::getpid());
  struct stat st;
  bool had_old = ::stat(dir_.c_str(), &st) == 0;
  if (had_old && ::rename(dir_.c_str(), old.c_str()) != 0)
    throw CacheError(fmt::format("bundle {}: cannot move the existing bundle aside", dir_));
  if (::rename(staging_.c_str(), dir_.c_str()) != 0) {
    if (had_old) ::rename(old.c_str(), dir_.c_str());
    throw CacheError(fmt::format("bundle {}: cannot publish {}", dir_, staging_));
  }
  if (had_old) remove_tree(old);
  finished_ = true;
}

}  // namespace kjit::cache
