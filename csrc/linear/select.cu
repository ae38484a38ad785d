// Standalone per-token absmax-int8 + top-K kernel: one CTA per token. Used by quantize_topk, by the
// two-launch GEMV variant for large D (where re-reading x in every GEMV CTA costs too much), and to
// build the masked dense int8 activations of the tensor-core GEMM.
#include "common/common.cuh"
#include "linear/device.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

// One CTA per token. Up to 2 tokens per SM (decode, the split GEMV, short prompts): 1024 threads, the whole SM
// on one row in one wave, the shortest latency. More (prefill, mixed serving steps): 256 threads, so up to 8
// rows share an SM at once instead of queueing for a second wave. Measured on an H200 (bench/NOTES-serving.md
// section 4): 256 tokens, 18.5 us at 1024 threads against 20.2 at 256; 512 tokens, 34.3 against 22.8; 2048,
// 134 against 65 (D = 2560). Both sizes give the same bits: the selection is exact, and the fused norm's sum of
// squares is formed in one order for any CTA size >= 256 (lin::load_row).
constexpr int kFewTokensThreads = 1024;
constexpr int kManyTokensThreads = 256;
constexpr int kFewTokensPerSm = 2;

template <int NT>
__global__ void __launch_bounds__(NT) select_kernel(SelectArgs a) {
  extern __shared__ float xs[];
  __shared__ lin::SelectScratch s;
  const int t = blockIdx.x;
  pdl::launch_dependents();
  pdl::wait();  // x is written, and idx/q/qdense read, by neighbouring kernels
  lin::load_row<NT>(a, t, xs, s);
  float scale;
  const float gamma = lin::block_select<NT>(xs, a.D, a.K, s, &scale);
  if (threadIdx.x == 0) a.gamma[t] = gamma;
  const size_t o = static_cast<size_t>(t) * a.ld;
  int8_t* qd = a.qdense ? a.qdense + static_cast<size_t>(t) * a.ldd : nullptr;
  lin::block_compact<NT>(xs, a.D, a.K, scale, s, a.idx + o, a.q + o, a.ld, qd, a.ldd, s.redi);
}

template <int NT>
void launch_select_t(const SelectArgs& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(a.D) * sizeof(float);
  static bool configured[64] = {};  // per device: the opt-in is a per-device function attribute
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  if (!configured[dev & 63]) {
    QS_CUDA_CHECK(cudaFuncSetAttribute(select_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    configured[dev & 63] = true;
  }
  QS_CUDA_CHECK(pdl::launch(select_kernel<NT>, dim3(a.T), dim3(NT), smem, stream, a));
}

}  // namespace

void launch_select(const SelectArgs& a, cudaStream_t stream, int threads) {
  if (threads == 0) {
    static int sms[64] = {};  // per device, looked up once
    int dev = 0;
    QS_CUDA_CHECK(cudaGetDevice(&dev));
    if (sms[dev & 63] == 0) QS_CUDA_CHECK(cudaDeviceGetAttribute(&sms[dev & 63], cudaDevAttrMultiProcessorCount, dev));
    threads = a.T > kFewTokensPerSm * sms[dev & 63] ? kManyTokensThreads : kFewTokensThreads;
  }
  if (threads == kManyTokensThreads) launch_select_t<kManyTokensThreads>(a, stream);
  else if (threads == kFewTokensThreads) launch_select_t<kFewTokensThreads>(a, stream);
  else throw std::invalid_argument("select: threads must be 0 (by T), 256 or 1024");
}

}  // namespace qsparse
