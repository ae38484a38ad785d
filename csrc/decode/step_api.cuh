// The persistent decode step (issue 16): the layers of one batch-1 decode step as ONE kernel launch, one CTA
// per SM, walking a schedule of ops that the host builds once at load time (qsparse_infer/gpu/persistent.py).
// Host-side types and entry points; the kernel is step_kernel.cuh.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace qsparse {
namespace step {

enum OpKind : int { kOpGemv = 0, kOpAttention = 1 };
constexpr int kProfWords = 8;

// One op of the schedule, copied to the device as raw bytes (the host packs it with pack_gemv_op /
// pack_attention_op, so Python never needs the layout).
// Dependencies: before its first read of an input, a tile waits until ready[wait_idx] >= wait_target; the op
// adds 1 to ready[signal_idx] for every finished output unit (a 512-column block of a projection, a kv head
// of attention), so its consumer waits for (column blocks) or (kv heads) arrivals. Counters only ever grow
// within a launch; the last CTA to finish resets them all for the next launch.
struct alignas(16) StepOp {
  int kind;
  int wait_idx;
  unsigned wait_target;
  int signal_idx;
  int tile0;                      // tile t runs on CTA (t + tile0) % grid (spreads ops over the SMs)
  // projection (ternary gather-GEMV over packed rows [D, RB]; see linear/api.cuh)
  int D, K, RB, nseg, epi, out_ld;
  int R;                          // tiles (split-K shares of the selected rows) per 512-column block
  int ncb;                        // 512-column blocks
  int prefetch;                   // 1: prefetch this tile's possible rows into L2 before waiting
  float eps;
  const float* x;                 // fp32 [D], written earlier in this launch (read through L2)
  const float* norm_w;            // nullptr: no fused RMSNorm
  const uint8_t* packed;
  const int32_t* colinfo;
  const float* scales;
  const float* residual;          // residual epilogue (may alias out)
  float* out;
  int32_t* acc;                   // [ncb * 512] split-K sums; zero between uses (the last arriver zeroes)
  unsigned* arrive;               // [ncb] arrivals per column block; zero between uses
  int32_t* raw;                   // optional [ncb * 512] raw int32 sums (tests)
  // attention (layer caches; the rest is StepAttention)
  void* kc;
  void* vc;
};

// What every attention op of a step shares (the layer's caches are in its StepOp).
struct StepAttention {
  const float* qkv;
  int stride, nq, nkv, hd, max_len, max_splits, min_chunk;
  const int32_t* positions;  // [1]: the new token's position
  const int32_t* slots;      // [1]: 0 (a one-slot cache per layer)
  const float* cos_t;
  const float* sin_t;
  float* out;
  float* ws;
  int* counters;
  float scale;
};

struct StepLaunch {
  const StepOp* ops;   // device array
  int nops;
  StepAttention at;
  unsigned* ready;     // [nready], zero on entry, left zero
  int nready;
  unsigned* done;      // [1], zero on entry, left zero
  // optional [nops][grid][kProfWords] (globaltimer ns): first-tile start (before its wait), tiles run, last-tile
  // end, SM id, then the first tile's phases: wait done, selection done, product issued, tile end (attention:
  // wait done, 0, 0, end). Rows of CTAs without a tile in an op are left as they were.
  unsigned long long* prof;
  int grid;
  int max_d;           // the largest D of the schedule (shared memory)
};

// cache_dtype: kDBF16 or kDF32 (decode/kernels.cuh). Throws std::invalid_argument for a shape the kernel
// was not built for (supported() says which).
bool supported(int cache_dtype, int hd, int G, int max_d, const char** why);
int max_grid(int cache_dtype, int hd, int G, int max_d);  // CTAs that are co-resident (one per SM)
void launch(const StepLaunch& a, int cache_dtype, cudaStream_t stream);

}  // namespace step
}  // namespace qsparse
