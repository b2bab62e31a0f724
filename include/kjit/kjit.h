/* kjit C ABI: opaque handles, status codes, and kjit_last_error().
 *
 *   kjit_engine* engine;
 *   if (kjit_engine_create(NULL, &engine) != KJIT_OK) puts(kjit_last_error());
 *   kjit_kernel* norm;
 *   kjit_get(engine, "{\"op\":\"rmsnorm\",\"hidden_size\":4096,\"dtype\":\"bfloat16\"}", &norm);
 *   kjit_arg args[] = {kjit_arg_tensor(&x), kjit_arg_tensor(&w), kjit_arg_tensor(&y),
 *                      kjit_arg_int(rows), kjit_arg_float(1e-6)};
 *   kjit_launch(norm, args, 5, stream);
 *
 * Every function returns a kjit_status; on failure the calling thread's
 * kjit_last_error() holds the message until its next failing call.
 */
#ifndef KJIT_KJIT_H
#define KJIT_KJIT_H

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h>

#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(default)

typedef enum kjit_status {
  KJIT_OK = 0,
  KJIT_ERROR_SPEC = 1,
  KJIT_ERROR_TEMPLATE = 2,
  KJIT_ERROR_COMPILE = 3,
  KJIT_ERROR_CACHE = 4,
  KJIT_ERROR_CUDA = 5,
  KJIT_ERROR_UNAVAILABLE = 6,
  KJIT_ERROR_ARGUMENT = 7,
  KJIT_ERROR_INTERNAL = 8,
} kjit_status;

typedef struct kjit_engine kjit_engine;
typedef struct kjit_kernel kjit_kernel;

typedef enum kjit_arg_kind {
  KJIT_ARG_POINTER = 0,
  KJIT_ARG_TENSOR = 1,
  KJIT_ARG_INT = 2,
  KJIT_ARG_FLOAT = 3,
} kjit_arg_kind;

typedef struct kjit_arg {
  int32_t kind; /* kjit_arg_kind */
  union {
    const void* pointer;
    const DLTensor* tensor;
    int64_t integer;
    double real;
  } value;
} kjit_arg;

static inline kjit_arg kjit_arg_pointer(const void* p) { kjit_arg a; a.kind = KJIT_ARG_POINTER; a.value.pointer = p; return a; }
static inline kjit_arg kjit_arg_tensor(const DLTensor* t) { kjit_arg a; a.kind = KJIT_ARG_TENSOR; a.value.tensor = t; return a; }
static inline kjit_arg kjit_arg_int(int64_t v) { kjit_arg a; a.kind = KJIT_ARG_INT; a.value.integer = v; return a; }
static inline kjit_arg kjit_arg_float(double v) { kjit_arg a; a.kind = KJIT_ARG_FLOAT; a.value.real = v; return a; }

/* Options: a JSON object with any of "cache_dir", "disk_cache", "cache_size_limit",
 * "bundle_dir", "arch", "allow_nvrtc"; NULL or "" for the defaults. */
kjit_status kjit_engine_create(const char* options_json, kjit_engine** out);
void kjit_engine_destroy(kjit_engine* engine);

kjit_status kjit_get(kjit_engine* engine, const char* spec_json, kjit_kernel** out);
void kjit_kernel_release(kjit_kernel* kernel);

/* stream: a CUstream (NULL: the default stream). */
kjit_status kjit_launch(const kjit_kernel* kernel, const kjit_arg* args, size_t num_args, void* stream);

/* JSON describing the kernel: op, entry, arch, key, registers, spills, params.
 * The string lives as long as the kernel handle. */
const char* kjit_kernel_info(const kjit_kernel* kernel);

/* Writes the generated CUDA source into a buffer owned by the caller;
 * *size receives the length needed (including the terminating NUL). */
kjit_status kjit_render(kjit_engine* engine, const char* spec_json, char* buffer, size_t* size);

/* Batch decode over a paged KV cache with a plan/run split (kjit/attention.hpp).
 * plan: host copies of kv_indptr (batch_size + 1) and kv_last_page_len (batch_size);
 * run: device pointers; lse may be NULL when the spec has "return_lse": false;
 * workspace: plan.workspace_bytes of device memory (NULL when 0); a "combined" KV cache
 * is passed as k_cache with v_cache NULL; k_scale and v_scale dequantize an fp8 KV cache
 * (pass 1.0 otherwise). */
typedef struct kjit_batch_decode kjit_batch_decode;
typedef struct kjit_decode_plan {
  int64_t batch_size;
  int64_t num_chunks;
  int64_t chunk_size;
  uint64_t workspace_bytes;
} kjit_decode_plan;
kjit_status kjit_batch_decode_create(kjit_engine* engine, const char* spec_json, kjit_batch_decode** out);
void kjit_batch_decode_destroy(kjit_batch_decode* decode);
kjit_status kjit_batch_decode_plan(const kjit_batch_decode* decode, const int32_t* kv_indptr,
                                   const int32_t* kv_last_page_len, int64_t batch_size, kjit_decode_plan* out);
/* The same with the KV split fixed at num_chunks per request (1..65535; 0: the planner's
 * choice), for variant sweeps. */
kjit_status kjit_batch_decode_plan_chunks(const kjit_batch_decode* decode, const int32_t* kv_indptr,
                                          const int32_t* kv_last_page_len, int64_t batch_size, int64_t num_chunks,
                                          kjit_decode_plan* out);
kjit_status kjit_batch_decode_run(const kjit_batch_decode* decode, const kjit_decode_plan* plan, const void* q,
                                  const void* k_cache, const void* v_cache, const int32_t* kv_indptr,
                                  const int32_t* kv_indices, const int32_t* kv_last_page_len, void* output,
                                  float* lse, void* workspace, double sm_scale, double k_scale, double v_scale,
                                  void* stream);

/* The work list of a batch_prefill kernel whose spec has "work_list": true
 * (kjit::plan_prefill_work): host copies of qo_indptr and kv_indptr (batch_size + 1 each)
 * and, paged, kv_last_page_len (batch_size; NULL otherwise); num_sms is ignored (the list
 * is a queue that serves any grid). Writes *size int32 values into buffer (the caller's);
 * with buffer NULL or *size too small, only *size (the count needed) is set, and the call
 * fails in the latter case (with buffer NULL it is counted from qo_indptr without
 * planning). The kernel handle keeps the spec's geometry from its first call
 * (kjit::PrefillWorkPlanner).
 * Copy the list to the device and pass it as the kernel's work_list argument; the kernel
 * updates and resets its queue position there, so a copy serves one launch at a time. */
kjit_status kjit_plan_prefill_work(const kjit_kernel* prefill, const int32_t* qo_indptr, const int32_t* kv_indptr,
                                   const int32_t* kv_last_page_len, int64_t batch_size, int num_sms, int32_t* buffer,
                                   size_t* size);

const char* kjit_last_error(void);
const char* kjit_version(void);

#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif

#endif /* KJIT_KJIT_H */
