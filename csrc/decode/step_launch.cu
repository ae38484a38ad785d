// Host side of the persistent decode step (step_api.cuh): what it supports, how many CTAs it may use, the
// launch.
#include <stdexcept>
#include <string>

#include "common/common.cuh"
#include "decode/kernels.cuh"
#include "decode/step_api.cuh"

namespace qsparse {
namespace step {

void launch_bf16(const StepLaunch& a, cudaStream_t stream);
void launch_f32(const StepLaunch& a, cudaStream_t stream);
int occupancy_bf16(int hd, int G, int max_d);
int occupancy_f32(int hd, int G, int max_d);

namespace {
constexpr int kMaxD = 256 * 56;  // step_kernel.cuh's with_kpt
}

bool supported(int cache_dtype, int hd, int G, int max_d, const char** why) {
  const char* r = nullptr;
  if (cache_dtype != kDBF16 && cache_dtype != kDF32) r = "the KV cache must be bfloat16 or float32";
  else if (hd < 2 || hd > 128 || hd % 2) r = "head_dim must be even and at most 128";
  else if ((hd * (cache_dtype == kDBF16 ? 2 : 4)) % 16) r = "a cache row (head_dim) must be a multiple of 16 bytes";
  else if (G < 1 || G > 8) r = "at most 8 query heads per kv head";
  else if (max_d < 1 || max_d > kMaxD) r = "a projection input wider than 14336 channels";
  if (why) *why = r;
  return r == nullptr;
}

int max_grid(int cache_dtype, int hd, int G, int max_d) {
  const char* why = nullptr;
  if (!supported(cache_dtype, hd, G, max_d, &why)) throw std::invalid_argument(std::string("decode_step: ") + why);
  int dev = 0, sms = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  QS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int per_sm = cache_dtype == kDBF16 ? occupancy_bf16(hd, G, max_d) : occupancy_f32(hd, G, max_d);
  if (per_sm < 1) throw std::invalid_argument("decode_step: the kernel does not fit on an SM at this shape");
  return sms;  // one CTA per SM: more would share an SM's issue slots between tiles that wait on each other
}

void launch(const StepLaunch& a, int cache_dtype, cudaStream_t stream) {
  const char* why = nullptr;
  if (a.at.nkv < 1 || a.at.nq % a.at.nkv) throw std::invalid_argument("decode_step: nq must be a multiple of nkv");
  if (!supported(cache_dtype, a.at.hd, a.at.nq / a.at.nkv, a.max_d, &why))
    throw std::invalid_argument(std::string("decode_step: ") + why);
  if (a.nops < 0 || (a.nops > 0 && a.ops == nullptr)) throw std::invalid_argument("decode_step: no schedule");
  if (a.ready == nullptr || a.done == nullptr || a.nready < 1) throw std::invalid_argument("decode_step: no counters");
  if (a.grid < 1 || a.grid > max_grid(cache_dtype, a.at.hd, a.at.nq / a.at.nkv, a.max_d))
    throw std::invalid_argument("decode_step: grid must be in [1, max_grid]: its CTAs wait on each other, so all "
                                "of them must be resident at once");
  if (a.at.max_splits < 1 || a.at.max_splits > 128 || a.at.min_chunk < 1)
    throw std::invalid_argument("decode_step: attention split parameters out of range");
  if (a.nops == 0) return;
  if (cache_dtype == kDBF16) launch_bf16(a, stream);
  else launch_f32(a, stream);
}

}  // namespace step
}  // namespace qsparse
