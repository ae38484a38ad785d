// The persistent decode step for a bf16 KV cache (step_kernel.cuh; one file per cache type, so the two
// instantiation sets compile in parallel).
#include "decode/step_kernel.cuh"

namespace qsparse {
namespace step {

void launch_bf16(const StepLaunch& a, cudaStream_t stream) {
  dispatch<__nv_bfloat16>(a.at.hd, a.at.nq / a.at.nkv, [&](auto, auto hdmax, auto gmax) {
    launch_typed<__nv_bfloat16, decltype(hdmax)::value, decltype(gmax)::value>(a, stream);
  });
}

int occupancy_bf16(int hd, int G, int max_d) {
  int n = 0;
  dispatch<__nv_bfloat16>(hd, G, [&](auto, auto hdmax, auto gmax) {
    n = occupancy<__nv_bfloat16, decltype(hdmax)::value, decltype(gmax)::value>(max_d);
  });
  return n;
}

}  // namespace step
}  // namespace qsparse
