// RMSNorm, fused add + RMSNorm, and both with FP8 e4m3 output plus a per-row scale.
//
//   {"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"}
//   ops: rmsnorm, fused_add_rmsnorm, rmsnorm_fp8_quant, fused_add_rmsnorm_fp8_quant
//   fields: hidden_size (1..16384), dtype (float16 | bfloat16)
//   tuning: vectors_per_thread (1..8): 16-byte accesses each thread makes per row;
//           the default comes from H100 measurements (2, or 4 for long rows and unfused FP8)
//
// eps and the row count are run-time arguments. FlashInfer-Bench definitions of
// op type "rmsnorm" are accepted (a "residual" input selects the fused form).
#include <algorithm>

#include <fmt/format.h>

#include "families/family.hpp"

namespace kjit::families {
namespace {

constexpr std::int64_t kMaxHidden = 16384;
constexpr DType kDTypes[] = {DType::float16, DType::bfloat16};

struct Variant {
  std::string_view op;
  bool fused_add;
  bool quant_fp8;
};
constexpr Variant kVariants[] = {
    {"rmsnorm", false, false},
    {"fused_add_rmsnorm", true, false},
    {"rmsnorm_fp8_quant", false, true},
    {"fused_add_rmsnorm_fp8_quant", true, true},
};

int ceil_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

class NormalizationFamily final : public Family {
 public:
  std::string_view name() const override { return "normalization"; }
  std::vector<std::string_view> ops() const override {
    std::vector<std::string_view> out;
    for (const auto& v : kVariants) out.push_back(v.op);
    return out;
  }
  std::vector<std::string_view> definition_op_types() const override { return {"rmsnorm"}; }

  nlohmann::json spec_from_definition(const spec::Definition& d) const override {
    const bool fused = d.input("residual") != nullptr;
    if (!d.input("hidden_states") || !d.input("weight"))
      throw SpecError(fmt::format("definition \"{}\": an rmsnorm definition needs inputs \"hidden_states\" and \"weight\"", d.name));
    return {{"op", fused ? "fused_add_rmsnorm" : "rmsnorm"},
            {"hidden_size", d.const_axis("hidden_size")},
            {"dtype", dtype_name(d.tensor_dtype("hidden_states"))}};
  }

  KernelPlan plan(const spec::Spec& s) const override {
    const Variant* variant = nullptr;
    for (const auto& v : kVariants)
      if (v.op == s.op) variant = &v;
    spec::FieldReader fields(s);
    const std::int64_t hidden = fields.integer("hidden_size", 1, kMaxHidden);
    const DType dtype = fields.dtype("dtype", kDTypes);
    // Widest access (up to 16 bytes) that divides the row.
    const int vec = widest_vector(dtype, hidden);
    const int vecs_per_row = static_cast<int>(hidden / vec);
    // Measured on the H100 (docs/benchmarks.md): two 16-byte accesses per thread
    // are best up to 4096 bf16 elements a row, four above that and for the
    // unfused FP8 form (a third of its bytes are writes).
    const bool unfused_fp8 = variant->quant_fp8 && !variant->fused_add;
    const int default_vectors = vecs_per_row > 512 || unfused_fp8 ? 4 : 2;
    const int vectors_per_thread = static_cast<int>(fields.integer("vectors_per_thread", 1, 8, default_vectors));
    fields.finish();

    // Short rows get a power-of-two group of lanes and share a block; longer
    // rows get whole warps, each thread making about vectors_per_thread accesses.
    int threads_per_row;
    if (vecs_per_row <= 32 * vectors_per_thread) {
      threads_per_row = std::min(32, ceil_pow2((vecs_per_row + vectors_per_thread - 1) / vectors_per_thread));
    } else {
      const int items = std::max(vectors_per_thread, (vecs_per_row + 1023) / 1024);
      threads_per_row = std::min(1024, ((vecs_per_row + items - 1) / items + 31) / 32 * 32);
    }
    const int rows_per_block = std::max(1, 256 / threads_per_row);

    KernelPlan plan;
    plan.op = std::string(variant->op);
    plan.spec = {{"op", plan.op}, {"hidden_size", hidden}, {"dtype", dtype_name(dtype)}};
    if (vectors_per_thread != default_vectors) plan.spec["vectors_per_thread"] = vectors_per_thread;
    plan.template_name = "norm.cu.j2";
    plan.entry = fmt::format("kjit_{}", variant->op);
    plan.template_params = {{"op", plan.op},
                            {"hidden_size", hidden},
                            {"dtype", dtype_name(dtype)},
                            {"ctype", cuda_type(dtype)},
                            {"vec", vec},
                            {"threads_per_row", threads_per_row},
                            {"rows_per_block", rows_per_block},
                            {"fused_add", variant->fused_add},
                            {"quant_fp8", variant->quant_fp8}};

    const std::string h = std::to_string(hidden);
    auto& p = plan.params;
    const int vector_bytes = vec * static_cast<int>(dtype_size(dtype));  // every row moves in vectors of vec elements
    p.push_back(vector_param("input", dtype, {"batch_size", h}, vector_bytes));
    if (variant->fused_add) p.push_back(vector_param("residual", dtype, {"batch_size", h}, vector_bytes, Param::Access::read_write));
    p.push_back(vector_param("weight", dtype, {h}, vector_bytes));
    if (variant->quant_fp8) {
      p.push_back(vector_param("output", DType::float8_e4m3, {"batch_size", h}, vec, Param::Access::write));
      p.push_back(tensor_param("scale", DType::float32, {"batch_size"}, Param::Access::write));
    } else {
      p.push_back(vector_param("output", dtype, {"batch_size", h}, vector_bytes, Param::Access::write));
    }
    p.push_back(integer_param("batch_size"));
    p.push_back(real_param("eps", 0.0));

    plan.launch.block[0] = static_cast<std::uint32_t>(threads_per_row);
    plan.launch.block[1] = static_cast<std::uint32_t>(rows_per_block);
    plan.launch.grid[0] = GridDim{param_index(p, "batch_size"), rows_per_block};
    return plan;
  }
};

}  // namespace

std::unique_ptr<Family> make_normalization_family() { return std::make_unique<NormalizationFamily>(); }

}  // namespace kjit::families
