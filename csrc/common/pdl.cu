// Host state of programmatic dependent launch (see pdl.cuh).
#include "common/common.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace pdl {
namespace {
bool g_enabled = true;
int g_cc_major[64] = {};  // per device, 0 = not queried yet
}  // namespace

void set_enabled(bool on) { g_enabled = on; }
bool get_enabled() { return g_enabled; }

bool enabled_for_current_device() {
  if (!g_enabled) return false;
  int dev = 0;
  QS_CUDA_CHECK(cudaGetDevice(&dev));
  int& cc = g_cc_major[dev & 63];
  if (cc == 0) QS_CUDA_CHECK(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev));
  return cc >= 9;
}

}  // namespace pdl
}  // namespace qsparse
