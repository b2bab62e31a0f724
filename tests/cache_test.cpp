#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <thread>

#include "cache/bundle.hpp"
#include "cache/disk_cache.hpp"
#include "kjit/kjit.hpp"
#include "test_util.hpp"

using Catch::Contains;
using kjit::test::ScratchDir;

namespace {
const std::string kSpec = R"({"op": "rmsnorm", "hidden_size": 2048, "dtype": "bfloat16"})";
const std::string kCli = KJIT_CLI;
const std::string kSource = KJIT_SOURCE_DIR;

kjit::EngineOptions with_cache(const std::string& dir) {
  kjit::EngineOptions o;
  o.cache_dir = dir;
  return o;
}
}  // namespace

TEST_CASE("miss compiles, then memory and disk hits", "[cache]") {
  ScratchDir dir("hits");
  std::string key;
  {
    kjit::Engine engine(with_cache(dir.str()));
    auto a = engine.build(kSpec, "sm_90a");
    CHECK(a.info.source == kjit::ArtifactSource::nvrtc);
    key = a.info.key;
    CHECK(key.size() == 32);
    CHECK(engine.build(kSpec, "sm_90a").info.source == kjit::ArtifactSource::memory);
    // The same spec written differently is the same kernel.
    CHECK(engine.build(R"({"dtype": "bf16", "op": "rmsnorm", "hidden_size": 2048})", "sm_90a").info.key == key);
  }
  CHECK(std::filesystem::exists(dir / (key + ".kjit")));
  kjit::Engine fresh(with_cache(dir.str()));  // a new engine sees the disk entry
  auto b = fresh.build(kSpec, "sm_90a");
  CHECK(b.info.source == kjit::ArtifactSource::disk_cache);
  CHECK(b.info.key == key);
  CHECK(b.info.registers > 0);
  CHECK(b.info.compile_seconds > 0);
  // Another arch or spec is another key.
  CHECK(fresh.build(kSpec, "sm_80").info.key != key);
  CHECK(fresh.build(R"({"op": "rmsnorm", "hidden_size": 2048, "dtype": "float16"})", "sm_90a").info.key != key);
}

TEST_CASE("the key does not depend on paths or time", "[cache]") {
  ScratchDir a("key-a"), b("key-b");
  std::string k1 = kjit::Engine(with_cache(a.str())).build(kSpec, "sm_90a").info.key;
  std::string k2 = kjit::Engine(with_cache(b.str())).build(kSpec, "sm_90a").info.key;
  CHECK(k1 == k2);
}

TEST_CASE("a damaged or truncated entry is detected and rebuilt", "[cache]") {
  ScratchDir dir("damaged");
  std::string key = kjit::Engine(with_cache(dir.str())).build(kSpec, "sm_90a").info.key;
  const std::string path = dir / (key + ".kjit");
  auto original = *kjit::cache::read_file(path);

  SECTION("one flipped byte in the cubin") {
    std::string bytes = original;
    bytes[bytes.size() / 2] ^= 0x40;
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }
  SECTION("truncated") { std::filesystem::resize_file(path, original.size() / 3); }
  SECTION("empty") { std::filesystem::resize_file(path, 0); }

  kjit::Engine engine(with_cache(dir.str()));
  auto a = engine.build(kSpec, "sm_90a");
  CHECK(a.info.source == kjit::ArtifactSource::nvrtc);  // rebuilt
  CHECK(*kjit::cache::read_file(path) != "");
  CHECK(kjit::cache::DiskCache::decode(*kjit::cache::read_file(path)).has_value());
  CHECK(kjit::Engine(with_cache(dir.str())).build(kSpec, "sm_90a").info.source == kjit::ArtifactSource::disk_cache);
}

TEST_CASE("cache verify removes damaged entries; prune keeps the most recently used", "[cache]") {
  ScratchDir dir("prune");
  kjit::cache::DiskCache cache(dir.str(), 1 << 30);
  for (int i = 0; i < 5; ++i) cache.store(fmt::format("key{}", i), {{{"i", i}}, std::string(10000, static_cast<char>('a' + i))});
  auto files = cache.list();
  REQUIRE(files.size() == 5);
  // Age them: key0 oldest ... key4 newest; then use key0.
  for (int i = 0; i < 5; ++i) {
    struct timespec times[2] = {{1000000 + i * 10, 0}, {1000000 + i * 10, 0}};
    ::utimensat(AT_FDCWD, (dir / fmt::format("key{}.kjit", i)).c_str(), times, 0);
  }
  CHECK(cache.load("key0").has_value());  // refreshes its last-used time
  CHECK(cache.prune(3 * 10100) > 0);
  std::set<std::string> left;
  for (const auto& f : cache.list()) left.insert(f.key);
  CHECK(left == std::set<std::string>{"key0", "key3", "key4"});

  std::ofstream(dir / "key3.kjit", std::ios::binary | std::ios::trunc) << "KJITCUBIN1\ngarbage";
  auto [ok, damaged] = cache.verify();
  CHECK(ok == 2);
  CHECK(damaged == 1);
  CHECK(cache.list().size() == 2);
  CHECK(cache.clear() == 2);
  CHECK(cache.list().empty());
}

TEST_CASE("a size limit prunes on store", "[cache]") {
  ScratchDir dir("limit");
  kjit::cache::DiskCache cache(dir.str(), 50000);
  for (int i = 0; i < 10; ++i) cache.store(fmt::format("k{}", i), {{}, std::string(10000, 'x')});
  std::uint64_t total = 0;
  for (const auto& f : cache.list()) total += f.bytes;
  CHECK(total <= 50000);
  CHECK(cache.load("k9").has_value());  // the newest survives
}

TEST_CASE("an unusable cache directory degrades to memory with no crash", "[cache]") {
  ScratchDir dir("readonly");
  std::string bad_dir;
  SECTION("below a regular file") {
    std::ofstream(dir / "file") << "x";
    bad_dir = dir / "file/cache";
  }
  SECTION("read-only directory") {
    if (::geteuid() == 0) {
      // root writes through permission bits; /sys refuses mkdir even to root.
      bad_dir = "/sys/kjit-cache-test";
    } else {
      std::filesystem::create_directories(dir / "ro");
      std::filesystem::permissions(dir / "ro", std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
      bad_dir = dir / "ro";
    }
  }
  kjit::Engine engine(with_cache(bad_dir));
  auto a = engine.build(kSpec, "sm_90a");
  CHECK(a.info.source == kjit::ArtifactSource::nvrtc);
  CHECK(engine.build(kSpec, "sm_90a").info.source == kjit::ArtifactSource::memory);
  CHECK(engine.cache_dir().empty());  // reported off after the failure
  CHECK_FALSE(std::filesystem::exists(bad_dir + "/" + a.info.key + ".kjit"));
}

TEST_CASE("after a failed write the cache still serves what it holds", "[cache]") {
  ScratchDir dir("after-failure");
  kjit::cache::DiskCache cache(dir.str(), 1 << 30);
  cache.store("present", {{{"x", 1}}, "cubin bytes"});
  REQUIRE(cache.writable());
  cache.store("no-such-subdir/key", {{}, "x"});  // the write fails: ENOENT
  CHECK_FALSE(cache.writable());
  auto hit = cache.load("present");
  REQUIRE(hit);
  CHECK(hit->cubin == "cubin bytes");
  cache.store("later", {{}, "y"});  // no further writes
  CHECK_FALSE(std::filesystem::exists(dir / "later.kjit"));
}

TEST_CASE("concurrent processes compiling one key all succeed and leave one valid file", "[cache][process]") {
  ScratchDir dir("concurrent");
  const int n = 6;
  std::vector<std::thread> threads;
  std::vector<kjit::test::CommandResult> results(n);
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      results[i] = kjit::test::run_command(fmt::format("'{}' compile --arch sm_90a --cache-dir '{}' '{}'", kCli, dir.str(), kSpec));
    });
  for (auto& t : threads) t.join();
  for (const auto& r : results) {
    INFO(r.output);
    CHECK(r.exit_code == 0);
  }
  CHECK(kjit::test::count_files(dir.path, ".kjit") == 1);
  CHECK(kjit::test::count_files(dir.path, ".tmp") == 0);
  for (const auto& e : std::filesystem::directory_iterator(dir.path))
    if (e.path().extension() == ".kjit") CHECK(kjit::cache::DiskCache::decode(*kjit::cache::read_file(e.path())).has_value());
}

TEST_CASE("pregen writes a bundle; the runtime uses it with NVRTC disabled", "[cache][bundle]") {
  ScratchDir dir("bundle");
  const std::string bundle = dir / "bundle";
  // The norms of the shipped config, for two archs (its sampling kernels use sm_90 clusters).
  const std::string config = dir / "norms.json";
  {
    std::ofstream out(config);
    out << R"({"name": "norms", "grids": [{"op": ["rmsnorm", "fused_add_rmsnorm", "rmsnorm_fp8_quant",
              "fused_add_rmsnorm_fp8_quant"], "hidden_size": 4096, "dtype": ["bfloat16", "float16"]}]})";
  }
  auto r = kjit::test::run_command(fmt::format("'{}' pregen '{}' --arch sm_90a,sm_80 --out '{}' --cache-dir '{}' -j 2", kCli,
                                               config, bundle, dir / "cache"));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(kjit::test::count_files(bundle, ".cubin") == 16);
  kjit::cache::Bundle b(bundle);
  CHECK(b.size() == 16);

  kjit::EngineOptions o;
  o.bundle_dir = bundle;
  o.disk_cache = false;
  o.allow_nvrtc = false;
  kjit::Engine engine(o);
  for (const char* arch : {"sm_90a", "sm_80"})
    for (const char* op : {"rmsnorm", "fused_add_rmsnorm", "rmsnorm_fp8_quant", "fused_add_rmsnorm_fp8_quant"})
      for (const char* dtype : {"bfloat16", "float16"}) {
        auto spec = fmt::format(R"({{"op": "{}", "hidden_size": 4096, "dtype": "{}"}})", op, dtype);
        INFO(spec << " " << arch);
        auto a = engine.build(spec, arch);
        CHECK(a.info.source == kjit::ArtifactSource::bundle);
        CHECK(a.cubin.size() > 1000);
        CHECK(a.info.registers > 0);
      }
  // What the bundle does not cover fails clearly instead of compiling.
  CHECK_THROWS_WITH(engine.build(R"({"op": "rmsnorm", "hidden_size": 1024, "dtype": "bfloat16"})", "sm_90a"),
                    Contains("no cubin for") && Contains("hidden_size\":1024") && Contains("NVRTC is disabled"));

  // The same through the CLI in a fresh process with NVRTC switched off by the environment.
  auto hit = kjit::test::run_command(fmt::format(
      "KJIT_DISABLE_NVRTC=1 '{}' compile --arch sm_90a --no-disk-cache --bundle '{}' "
      "'{{\"op\": \"fused_add_rmsnorm\", \"hidden_size\": 4096, \"dtype\": \"float16\"}}'", kCli, bundle));
  INFO(hit.output);
  CHECK(hit.exit_code == 0);
  CHECK_THAT(hit.output, Contains("hit (bundle)"));

  // A damaged cubin in the bundle is not used.
  for (const auto& e : std::filesystem::directory_iterator(bundle))
    if (e.path().extension() == ".cubin") std::filesystem::resize_file(e.path(), 100);
  CHECK_THROWS_AS(kjit::Engine(o).build(R"({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})", "sm_90a"),
                  kjit::UnavailableError);
  // A directory that is not a bundle is refused when the engine is made.
  o.bundle_dir = dir.str();
  CHECK_THROWS_WITH(kjit::Engine(o), Contains("manifest.json cannot be read"));
}
