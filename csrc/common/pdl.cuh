// Programmatic dependent launch (PDL, sm_90+): lets a kernel start while the kernel before it in the
// stream is still running, so its launch latency and its prologue (loads of weights, which no earlier
// kernel writes) overlap the predecessor's tail. A decode step is ~180 dependent kernels of a few
// microseconds each, where that overlap is a measurable share of the step.
//
// The contract every kernel launched with `pdl::attrs` must keep:
//  - call pdl::wait() in every thread before it reads or writes any memory that an earlier kernel in
//    the stream writes or reads (activations, residual stream, KV cache, sampling state); only
//    constant inputs (weights, norm weights, column maps, scales) may be touched before it;
//  - call pdl::wait() on every path, even one that does nothing else: a kernel that never waits may
//    finish before its predecessor, and then its own successor would no longer be ordered after that
//    predecessor (ordering is transitive only through the waits).
// pdl::launch_dependents() tells the hardware the next kernel may be scheduled; it only lets the next
// kernel run up to its own wait(), so it is safe to call first thing. Safe is not always fast: the next
// kernel's CTAs then sit resident beside this one's from the start. For the sparse one-token GEMV (an
// issue-bound selection) and the decode attention that cost the S = 0.6 step 0.6 ms of 2.2 on the H200, so
// those two trigger after their selection / tile loop (bench/NOTES-latency.md, session 4).
// Below sm_90, and when the launch carries no PDL attribute, both instructions are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace qsparse {
namespace pdl {

__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Host side: whether launches carry the PDL attribute (default on where the device supports it;
// qsparse_infer._C.set_pdl(False) turns it off, e.g. to measure its effect).
bool enabled_for_current_device();
void set_enabled(bool on);
bool get_enabled();

// Appends the PDL attribute to attrs[n] (when enabled) and returns the new count.
inline int add_attr(cudaLaunchAttribute* attrs, int n) {
  if (!enabled_for_current_device()) return n;
  attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[n].val.programmaticStreamSerializationAllowed = 1;
  return n + 1;
}

// Launch `kernel<<<grid, block, smem, stream>>>(args...)` with the PDL attribute when enabled.
template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[1];
  cfg.numAttrs = add_attr(attrs, 0);
  cfg.attrs = attrs;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace pdl
}  // namespace qsparse
