// Thread-block clusters (sm_90) and the bulk copy engine, as small inline-PTX
// helpers: kjit kernels do not depend on cooperative_groups.
#pragma once

namespace kjit::cluster {

// Every thread of every block in the cluster arrives and waits. Release/acquire:
// shared-memory writes into peer blocks before the barrier are visible after it.
__device__ __forceinline__ void sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The address of `local` (a __shared__ variable) in the cluster's block `rank`,
// usable with ordinary loads and stores.
template <typename T>
__device__ __forceinline__ T* map(T* local, unsigned rank) {
  unsigned long long out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<unsigned long long>(local)), "r"(rank));
  return reinterpret_cast<T*>(out);
}

}  // namespace kjit::cluster

namespace kjit::bulk {

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// An mbarrier that one thread arms with the bytes a bulk copy will deliver.
__device__ __forceinline__ void barrier_init(unsigned long long* barrier, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(barrier)), "r"(arrivals) : "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copy engine sees the initialized barrier
}
__device__ __forceinline__ void barrier_expect_bytes(unsigned long long* barrier, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes) : "memory");
}
// One arrival (release semantics: this thread's earlier reads of what the barrier guards are done).
__device__ __forceinline__ void barrier_arrive(unsigned long long* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(barrier)) : "memory");
}
__device__ __forceinline__ void barrier_wait(unsigned long long* barrier, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
  }
}

// Global -> this block's shared memory; 16-byte aligned addresses, a multiple of 16 bytes.
__device__ __forceinline__ void copy(void* shared_dst, const void* global_src, unsigned bytes, unsigned long long* barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(shared_dst)),
               "l"(global_src), "r"(bytes), "r"(shared_address(barrier))
               : "memory");
}

// This block's shared memory -> global, the thread's next bulk group (16-byte aligned
// addresses, a multiple of 16 bytes). The copy reads shared memory through the async proxy:
// a `fence.proxy.async.shared::cta` orders the writes that filled it first.
__device__ __forceinline__ void store(void* global_dst, const void* shared_src, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global_dst), "r"(shared_address(shared_src)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// The thread's committed stores have read their shared memory (it may be written again).
__device__ __forceinline__ void store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// The thread's committed stores are done, their writes performed.
__device__ __forceinline__ void store_wait() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// A TMA descriptor (CUtensorMap): the launch builds one per tensor a kernel copies in
// tiles and passes it as a `const __grid_constant__` parameter, which copies address.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

// The box of a 3-axis tensor map at coordinates (x innermost) -> shared memory (1024-byte
// aligned: the maps use the 128-byte swizzle), its bytes completing on `barrier`.
__device__ __forceinline__ void copy_tile(void* shared_dst, const TensorMap* map, int x, int y, int z,
                                          unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          shared_address(shared_dst)),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(z), "r"(shared_address(barrier))
      : "memory");
}

}  // namespace kjit::bulk
