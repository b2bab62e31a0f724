// Small value types shared by the C++ API and the C ABI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include <dlpack/dlpack.h>

#pragma GCC visibility push(default)  // the public API is what libkjit exports
namespace kjit {

enum class DType : std::uint8_t {
  float16, bfloat16, float32, float64, float8_e4m3, float8_e5m2, int8, uint8, int32, int64,
};

// "bfloat16", "float8_e4m3fn" (torch's name) and "fp8_e4m3" are all accepted.
std::optional<DType> parse_dtype(std::string_view name);
std::string_view dtype_name(DType dtype);   // canonical: "bfloat16", "float8_e4m3", ...
std::size_t dtype_size(DType dtype);
DLDataType to_dlpack(DType dtype);

}  // namespace kjit
#pragma GCC visibility pop
