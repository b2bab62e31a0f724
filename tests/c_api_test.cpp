#include <catch2/catch.hpp>

#include <string>

#include "kjit/kjit.h"
#include "kjit/kjit.hpp"
#include "runtime/driver.hpp"
#include "test_util.hpp"

using Catch::Contains;

TEST_CASE("C ABI: status codes and kjit_last_error", "[c_api]") {
  kjit_engine* engine = nullptr;
  CHECK(kjit_engine_create("{\"cache_dir\": 5}", &engine) == KJIT_ERROR_SPEC);
  CHECK(engine == nullptr);
  CHECK_THAT(std::string(kjit_last_error()), Contains("engine option \"cache_dir\" has the wrong type"));
  CHECK(kjit_engine_create("{\"colour\": \"red\"}", &engine) == KJIT_ERROR_SPEC);
  CHECK_THAT(std::string(kjit_last_error()), Contains("engine option \"colour\" is unknown"));
  CHECK(kjit_engine_create("not json", &engine) == KJIT_ERROR_SPEC);
  CHECK(kjit_engine_create("{}", nullptr) == KJIT_ERROR_ARGUMENT);

  kjit::test::ScratchDir dir("capi");
  std::string options = "{\"cache_dir\": \"" + dir.str() + "\", \"arch\": \"sm_90a\"}";
  REQUIRE(kjit_engine_create(options.c_str(), &engine) == KJIT_OK);

  const char* spec = "{\"op\": \"rmsnorm\", \"hidden_size\": 1024, \"dtype\": \"float16\"}";
  size_t size = 0;
  CHECK(kjit_render(engine, spec, nullptr, &size) == KJIT_OK);
  CHECK(size > 100);
  std::string buffer(size, '\0');
  CHECK(kjit_render(engine, spec, buffer.data(), &size) == KJIT_OK);
  CHECK_THAT(buffer, Contains("kjit_rmsnorm"));
  size_t small = 10;
  char tiny[10];
  CHECK(kjit_render(engine, spec, tiny, &small) == KJIT_ERROR_ARGUMENT);
  CHECK_THAT(std::string(kjit_last_error()), Contains("buffer too small"));

  CHECK(kjit_render(engine, "{\"op\": \"nope\"}", nullptr, &size) == KJIT_ERROR_SPEC);
  CHECK_THAT(std::string(kjit_last_error()), Contains("unknown op \"nope\""));

  kjit_kernel* kernel = nullptr;
  std::string why;
  if (!kjit::runtime::driver_available(&why)) {
    CHECK(kjit_get(engine, spec, &kernel) == KJIT_ERROR_UNAVAILABLE);
    CHECK(kernel == nullptr);
    CHECK_FALSE(std::string(kjit_last_error()).empty());
  }
  CHECK(kjit_get(engine, nullptr, &kernel) == KJIT_ERROR_ARGUMENT);
  CHECK(kjit_launch(nullptr, nullptr, 0, nullptr) == KJIT_ERROR_ARGUMENT);
  const int32_t indptr[2] = {0, 1};
  size_t list_size = 0;
  CHECK(kjit_plan_prefill_work(nullptr, indptr, indptr, nullptr, 1, 132, nullptr, &list_size) == KJIT_ERROR_ARGUMENT);
  CHECK_THAT(std::string(kjit_last_error()), Contains("prefill"));
  CHECK(std::string(kjit_version()) == std::string(kjit::version()));
  kjit_engine_destroy(engine);
}
