#include "kjit/kjit.hpp"

namespace kjit {

Error::Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

namespace {
struct DTypeEntry {
  DType dtype;
  std::string_view name;
  std::size_t size;
  DLDataType dlpack;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::float16, "float16", 2, {kDLFloat, 16, 1}},
    {DType::bfloat16, "bfloat16", 2, {kDLBfloat, 16, 1}},
    {DType::float32, "float32", 4, {kDLFloat, 32, 1}},
    {DType::float64, "float64", 8, {kDLFloat, 64, 1}},
    {DType::float8_e4m3, "float8_e4m3", 1, {kDLUInt, 8, 1}},  // DLPack 0.6 has no fp8 code
    {DType::float8_e5m2, "float8_e5m2", 1, {kDLUInt, 8, 1}},
    {DType::int8, "int8", 1, {kDLInt, 8, 1}},
    {DType::uint8, "uint8", 1, {kDLUInt, 8, 1}},
    {DType::int32, "int32", 4, {kDLInt, 32, 1}},
    {DType::int64, "int64", 8, {kDLInt, 64, 1}},
};
const DTypeEntry& entry(DType d) { return kDTypes[static_cast<int>(d)]; }
}  // namespace

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& e : kDTypes)
    if (e.name == name) return e.dtype;
  if (name == "half" || name == "fp16") return DType::float16;
  if (name == "bf16") return DType::bfloat16;
  if (name == "float" || name == "fp32") return DType::float32;
  if (name == "float8_e4m3fn" || name == "fp8_e4m3" || name == "e4m3") return DType::float8_e4m3;
  if (name == "fp8_e5m2" || name == "e5m2") return DType::float8_e5m2;
  return std::nullopt;
}
std::string_view dtype_name(DType d) { return entry(d).name; }
std::size_t dtype_size(DType d) { return entry(d).size; }
DLDataType to_dlpack(DType d) { return entry(d).dlpack; }

std::string_view to_string(ArtifactSource s) {
  switch (s) {
    case ArtifactSource::nvrtc: return "nvrtc";
    case ArtifactSource::disk_cache: return "disk";
    case ArtifactSource::bundle: return "bundle";
    case ArtifactSource::memory: return "memory";
  }
  return "?";
}

std::string_view version() { return KJIT_VERSION; }

}  // namespace kjit
