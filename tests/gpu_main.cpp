// GPU tests: skipped (exit 77, which ctest reports as skipped) where no GPU is usable.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "runtime/driver.hpp"

int main(int argc, char** argv) {
  std::string why;
  if (!kjit::runtime::driver_available(&why)) {
    std::printf("SKIPPED: the GPU tests need a GPU: %s\n", why.c_str());
    return 77;
  }
  auto info = kjit::runtime::device_info(kjit::runtime::current_device());
  std::printf("GPU tests on %s (sm_%d%d)\n", info.name.c_str(), info.major, info.minor);
  return Catch::Session().run(argc, argv);
}
