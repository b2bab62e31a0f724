#include "cache/disk_cache.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "api/log.hpp"
#include "cache/cache_key.hpp"

namespace kjit::cache {
namespace {

constexpr std::string_view kMagic = "KJITCUBIN1\n";

void put_u64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
bool get_u64(const std::string& in, std::size_t& pos, std::uint64_t& v) {
  if (pos + 8 > in.size()) return false;
  v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(static_cast<unsigned char>(in[pos + i])) << (8 * i);
  pos += 8;
  return true;
}

std::string errno_text(int e) { return std::strerror(e); }

}  // namespace

std::string make_directories(const std::string& path) {
  if (path.empty()) return "empty path";
  std::string partial;
  std::size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    partial = path.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
      return fmt::format("cannot create {}: {}", partial, errno_text(errno));
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return fmt::format("{} is not a directory", path);
  return "";
}

std::optional<std::string> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buffer[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string write_file_atomically(const std::string& path, const std::string& bytes) {
  static std::atomic<unsigned> counter{0};
  std::string tmp = fmt::format("{}.tmp.{}.{}.{}", path, ::getpid(),
                                std::hash<std::thread::id>{}(std::this_thread::get_id()) % 100000, counter++);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return fmt::format("cannot create {}: {}", tmp, errno_text(errno));
  std::size_t done = 0;
  std::string problem;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) { problem = fmt::format("cannot write {}: {}", tmp, errno_text(n < 0 ? errno : ENOSPC)); break; }
    done += static_cast<std::size_t>(n);
  }
  // Flush before publishing: on NFS/Lustre the rename may otherwise become
  // visible before the data.
  if (problem.empty() && ::fsync(fd) != 0) problem = fmt::format("cannot fsync {}: {}", tmp, errno_text(errno));
  ::close(fd);
  if (problem.empty() && ::rename(tmp.c_str(), path.c_str()) != 0)
    problem = fmt::format("cannot rename {} to {}: {}", tmp, path, errno_text(errno));
  if (!problem.empty()) ::unlink(tmp.c_str());
  return problem;
}

std::string DiskCache::default_dir() {
  if (const char* d = std::getenv("KJIT_CACHE_DIR"); d && *d) return d;
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d && *d) return std::string(d) + "/kjit";
  if (const char* d = std::getenv("HOME"); d && *d) return std::string(d) + "/.cache/kjit";
  return "/tmp/kjit-cache";
}

DiskCache::DiskCache(std::string dir, std::uint64_t size_limit) : dir_(std::move(dir)), size_limit_(size_limit) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

bool DiskCache::writable() const {
  std::lock_guard lock(mutex_);
  return !read_only_;
}

void DiskCache::stop_writing(const std::string& why) {
  if (read_only_) return;
  read_only_ = true;
  log::warn(fmt::format("disk cache {} cannot be written ({}); new kernels are kept in memory only", dir_, why));
}

std::string DiskCache::encode(const CacheEntry& entry) {
  std::string meta = entry.meta.dump();
  std::string out(kMagic);
  put_u64(out, meta.size());
  out += meta;
  put_u64(out, entry.cubin.size());
  out += entry.cubin;
  out += checksum(out);
  return out;
}

std::optional<CacheEntry> DiskCache::decode(const std::string& bytes, std::string* problem) {
  auto bad = [&](const char* why) -> std::optional<CacheEntry> {
    if (problem) *problem = why;
    return std::nullopt;
  };
  if (bytes.size() < kMagic.size() + 16 + 16 || bytes.compare(0, kMagic.size(), kMagic) != 0) return bad("bad header");
  std::size_t body = bytes.size() - 16;
  if (checksum(std::string_view(bytes).substr(0, body)) != bytes.substr(body)) return bad("checksum mismatch");
  std::size_t pos = kMagic.size();
  std::uint64_t meta_size = 0, cubin_size = 0;
  if (!get_u64(bytes, pos, meta_size) || pos + meta_size > body) return bad("bad metadata length");
  CacheEntry e;
  try {
    e.meta = nlohmann::json::parse(bytes.substr(pos, meta_size));
  } catch (const std::exception&) {
    return bad("bad metadata");
  }
  pos += meta_size;
  if (!get_u64(bytes, pos, cubin_size) || pos + cubin_size != body) return bad("bad cubin length");
  e.cubin = bytes.substr(pos, cubin_size);
  return e;
}

std::optional<CacheEntry> DiskCache::load(const std::string& key) {
  std::string path = path_for(key);
  auto bytes = read_file(path);
  if (!bytes) return std::nullopt;
  std::string problem;
  auto entry = decode(*bytes, &problem);
  if (!entry) {
    log::warn(fmt::format("cache entry {} is damaged ({}); it is removed and rebuilt", path, problem));
    ::unlink(path.c_str());  // fails harmlessly in a read-only directory
    return std::nullopt;
  }
  ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);  // last used: now (best effort)
  return entry;
}

void DiskCache::store(const std::string& key, const CacheEntry& entry) {
  std::lock_guard lock(mutex_);
  if (read_only_) return;
  if (!dir_ready_) {
    if (std::string why = make_directories(dir_); !why.empty()) return stop_writing(why);
    dir_ready_ = true;
  }
  if (std::string why = write_file_atomically(path_for(key), encode(entry)); !why.empty()) return stop_writing(why);
  std::uint64_t total = 0;
  for (const auto& f : list()) total += f.bytes;
  if (total > size_limit_) prune(size_limit_ - size_limit_ / 5);  // headroom: the next store need not prune
}

std::optional<std::string> DiskCache::recall(const std::string& name) {
  auto text = read_file(dir_ + "/" + name + ".memo");
  if (!text || text->empty()) return std::nullopt;
  return text;
}

void DiskCache::remember(const std::string& name, const std::string& value) {
  std::lock_guard lock(mutex_);
  if (read_only_) return;
  if (!dir_ready_) {
    if (std::string why = make_directories(dir_); !why.empty()) return stop_writing(why);
    dir_ready_ = true;
  }
  if (std::string why = write_file_atomically(dir_ + "/" + name + ".memo", value); !why.empty()) stop_writing(why);
}

std::vector<CacheFile> DiskCache::list() const {
  std::vector<CacheFile> out;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.size() <= 5 || !name.ends_with(".kjit")) continue;
    CacheFile f;
    f.key = name.substr(0, name.size() - 5);
    f.path = dir_ + "/" + name;
    struct stat st;
    if (::stat(f.path.c_str(), &st) != 0) continue;
    f.bytes = static_cast<std::uint64_t>(st.st_size);
    f.last_used = st.st_mtim.tv_sec;
    out.push_back(std::move(f));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const CacheFile& a, const CacheFile& b) { return a.key < b.key; });
  return out;
}

std::uint64_t DiskCache::prune(std::uint64_t limit) {
  auto files = list();
  std::sort(files.begin(), files.end(), [](const CacheFile& a, const CacheFile& b) { return a.last_used < b.last_used; });
  std::uint64_t total = 0, freed = 0;
  for (const auto& f : files) total += f.bytes;
  for (const auto& f : files) {
    if (total <= limit) break;
    if (::unlink(f.path.c_str()) == 0) {
      total -= f.bytes;
      freed += f.bytes;
    }
  }
  return freed;
}

std::pair<int, int> DiskCache::verify() {
  int ok = 0, damaged = 0;
  for (const auto& f : list()) {
    auto bytes = read_file(f.path);
    if (bytes && decode(*bytes)) {
      ++ok;
    } else {
      ++damaged;
      ::unlink(f.path.c_str());
    }
  }
  return {ok, damaged};
}

int DiskCache::clear() {
  int n = 0;
  for (const auto& f : list()) n += ::unlink(f.path.c_str()) == 0;
  // Temp files left by killed writers.
  if (DIR* d = ::opendir(dir_.c_str())) {
    while (dirent* e = ::readdir(d))
      if (std::string_view(e->d_name).find(".tmp.") != std::string_view::npos ||
          std::string_view(e->d_name).ends_with(".memo"))
        ::unlink((dir_ + "/" + e->d_name).c_str());
    ::closedir(d);
  }
  return n;
}

}  // namespace kjit::cache
