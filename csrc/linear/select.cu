// Standalone per-token absmax-int8 + top-K kernel: one CTA per token. Used by quantize_topk, by the
// two-launch GEMV variant for large D (where re-reading x in every GEMV CTA costs too much), and to
// build the masked dense int8 activations of the tensor-core GEMM.
#include "common/common.cuh"
#include "linear/device.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

constexpr int kSelectThreads = 1024;  // one CTA per token: use the whole SM (large D)

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs a) {
  extern __shared__ float xs[];
  __shared__ lin::SelectScratch s;
  const int t = blockIdx.x;
  pdl::launch_dependents();
  pdl::wait();  // x is written, and idx/q/qdense read, by neighbouring kernels
  lin::load_row<kSelectThreads>(a, t, xs, s);
  float scale;
  const float gamma = lin::block_select<kSelectThreads>(xs, a.D, a.K, s, &scale);
  if (threadIdx.x == 0) a.gamma[t] = gamma;
  const size_t o = static_cast<size_t>(t) * a.ld;
  int8_t* qd = a.qdense ? a.qdense + static_cast<size_t>(t) * a.ldd : nullptr;
  lin::block_compact<kSelectThreads>(xs, a.D, a.K, scale, s, a.idx + o, a.q + o, a.ld, qd, a.ldd, s.redi);
}

}  // namespace

void launch_select(const SelectArgs& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(a.D) * sizeof(float);
  static bool configured[64] = {};  // per device: the opt-in is a per-device function attribute
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    configured[dev & 63] = true;
  }
  QS_CUDA_CHECK(pdl::launch(select_kernel, dim3(a.T), dim3(kSelectThreads), smem, stream, a));
}

}  // namespace qsparse
