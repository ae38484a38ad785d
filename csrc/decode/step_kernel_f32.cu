// The persistent decode step for a fp32 KV cache (step_kernel.cuh; one file per cache type, so the two
// instantiation sets compile in parallel).
#include "decode/step_kernel.cuh"

namespace qsparse {
namespace step {

void launch_f32(const StepLaunch& a, cudaStream_t stream) {
  dispatch<float>(a.at.hd, a.at.nq / a.at.nkv, [&](auto, auto hdmax, auto gmax) {
    launch_typed<float, decltype(hdmax)::value, decltype(gmax)::value>(a, stream);
  });
}

int occupancy_f32(int hd, int G, int max_d) {
  int n = 0;
  dispatch<float>(hd, G, [&](auto, auto hdmax, auto gmax) {
    n = occupancy<float, decltype(hdmax)::value, decltype(gmax)::value>(max_d);
  });
  return n;
}

}  // namespace step
}  // namespace qsparse
