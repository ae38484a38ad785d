// GPU sampling: one block of 1024 threads per row picks that row's next token from its logits.
//
// Rules (mirrored exactly by qsparse_infer/generate/sampling.py on the CPU):
//  1. x = logits; tokens marked in `seen` get the repetition penalty: x < 0 ? x * rp : x / rp; then tokens
//     generated c > 0 times (counts) lose frequency * c + presence (OpenAI's additive penalties), each
//     operation an explicitly rounded fp32 intrinsic so that nvcc cannot contract it into an fma.
//  2. temperature <= 0: greedy, argmax of x, the lower index wins ties.
//  3. else z = x / temperature. Keep the tokens with z >= tau, where
//     tau_k = the top_k-th largest z (top_k > 0; ties at the threshold are all kept), and
//     tau_p = the largest value such that the softmax mass of {z >= tau_p} (within the top-k set) is at
//     least top_p (top_p < 1); tau = max of those that apply.
//  4. Draw with Gumbel-max: argmax over kept tokens of z + g, g = -log(-log(u)), u from a counter-based
//     hash of (seed, step, index) (splitmix64), so a captured graph replays deterministically.
// Thresholds are found by radix selection on order-preserving float keys (4 passes of 8 bits); the
// softmax mass is accumulated in 2^-40 fixed point with integer atomics, so the result does not depend
// on the order threads add (bit-reproducible run to run).
#include <cmath>

#include "decode/common.cuh"
#include "common/pdl.cuh"

namespace qsparse {
namespace {

constexpr int kSampleThreads = 1024;
constexpr float kFixedOne = 1099511627776.0f;  // 2^40

__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t step, uint32_t i) {
  uint64_t x = (seed ^ (step * 0xD1B54A32D192ED03ull)) + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return ((float)(x >> 41) + 0.5f) * (1.0f / 8388608.0f);  // 23 random bits, u in (0, 1), exact in fp32
}

struct Ctx {
  const float* logits;
  const uint8_t* seen;
  float rp, temp;
  const int32_t* counts;  // nullptr: no additive penalties for this row
  float presence, frequency;
  // The rule-1 value of logit i, given its raw value (already loaded).
  __device__ __forceinline__ float fix(int i, float v) const {
    if (v != v) v = -INFINITY;  // a NaN logit never wins
    if (rp != 1.f && seen[i]) v = v < 0.f ? v * rp : v / rp;
    if (counts != nullptr) {
      const int c = counts[i];
      if (c > 0) v = __fsub_rn(v, __fadd_rn(__fmul_rn(frequency, static_cast<float>(c)), presence));
    }
    return v;
  }
  __device__ __forceinline__ float x(int i) const { return fix(i, logits[i]); }
};

// f(i, x_i) for every i in [0, V) this thread owns, in increasing i (argmax ties rely on it). The logits are
// in L2 (the head just wrote them), so one block is bound by round trips, not bytes: each thread keeps kUnroll
// 16-byte loads in flight (a scalar loop took ~35 us for 128k logits, one L2 round trip per element).
constexpr int kUnroll = 4;
template <typename F>
__device__ __forceinline__ void for_each_logit(const Ctx& c, int V, F f) {
  const int n4 = (reinterpret_cast<uintptr_t>(c.logits) & 15u) == 0 ? V >> 2 : 0;
  const float4* l4 = reinterpret_cast<const float4*>(c.logits);
  const int nt = blockDim.x;
  for (int q0 = threadIdx.x; q0 < n4; q0 += kUnroll * nt) {
    float4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + u * nt;
      r[u] = q < n4 ? l4[q] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + u * nt;
      if (q < n4) {
        f(4 * q, c.fix(4 * q, r[u].x));
        f(4 * q + 1, c.fix(4 * q + 1, r[u].y));
        f(4 * q + 2, c.fix(4 * q + 2, r[u].z));
        f(4 * q + 3, c.fix(4 * q + 3, r[u].w));
      }
    }
  }
  for (int i = 4 * n4 + threadIdx.x; i < V; i += nt) f(i, c.x(i));
}

// Block argmax of score(i, x_i) over i in [0, V) (lower index wins ties). Returns the index to every thread.
template <typename F>
__device__ int block_argmax(int V, const Ctx& c, F score, float* sv, int* si) {
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for_each_logit(c, V, [&](int i, float x) {
    const float v = score(i, x);
    if (v > bv || (bi == 0x7fffffff && v == -INFINITY && i < bi)) {
      bv = v;
      bi = i;
    }
  });
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
      if (sv[w] > bv || (sv[w] == bv && si[w] < bi)) {
        bv = sv[w];
        bi = si[w];
      }
    }
    si[0] = bi;
  }
  __syncthreads();
  const int r = si[0];
  __syncthreads();
  return r;
}

__device__ float block_max(int V, const Ctx& c, float* sv) {
  float m = -INFINITY;
  for_each_logit(c, V, [&](int, float x) { m = fmaxf(m, x / c.temp); });
  m = dec::warp_max(m);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, sv[w]);
    sv[0] = m;
  }
  __syncthreads();
  m = sv[0];
  __syncthreads();
  return m;
}

// Largest key tau with W({i : key_i >= tau}) >= target, where W sums weight(i, key) (integers).
template <typename Wf>
__device__ uint32_t radix_select(int V, const Ctx& c, Wf weight, unsigned long long target,
                                 unsigned long long* hist, unsigned long long* sh) {
  uint32_t prefix = 0, mask = 0;
  unsigned long long remaining = target;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for_each_logit(c, V, [&](int, float x) {
      const float zi = x / c.temp;
      const uint32_t key = float_key(zi);
      if ((key & mask) == prefix) {
        const unsigned long long w = weight(zi, key);
        if (w) atomicAdd(&hist[(key >> shift) & 255u], w);
      }
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long cum = 0;
      int sel = 0;
      for (int b = 255; b >= 0; --b) {
        if (cum + hist[b] >= remaining) {
          sel = b;
          break;
        }
        cum += hist[b];
      }
      sh[0] = (unsigned long long)sel;
      sh[1] = remaining - cum;
    }
    __syncthreads();
    prefix |= (uint32_t)sh[0] << shift;
    mask |= 255u << shift;
    remaining = sh[1];
    __syncthreads();
  }
  return prefix;
}

// One block per row b: logits row b; the sampling state of row slots[b] (slots == nullptr: row b), so a
// batched decode step samples every active sequence in one launch without gathering its state.
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(const float* __restrict__ logits_all, int V,
                                                                const int32_t* __restrict__ slots, uint8_t* seen_all,
                                                                const float* __restrict__ fparams_all,
                                                                const int32_t* __restrict__ iparams_all,
                                                                int64_t* rng_all, int32_t* pos_all, int advance,
                                                                int32_t* token_all, int32_t* history_all,
                                                                int hist_len, int32_t* counts_all,
                                                                const float* __restrict__ penalties_all) {
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long sh[2];
  pdl::launch_dependents();  // the next kernel may start its prologue
  pdl::wait();  // every input below may come from the previous kernel (pdl.cuh)
  __shared__ unsigned long long wsum[32];
  const int b = blockIdx.x;
  const int r = slots != nullptr ? slots[b] : b;
  const float* logits = logits_all + (size_t)b * V;
  uint8_t* seen = seen_all + (size_t)r * V;
  const float* fparams = fparams_all + 3 * (size_t)r;
  const int32_t* iparams = iparams_all + r;
  int64_t* rng = rng_all + 2 * (size_t)r;
  int32_t* pos = pos_all + r;
  int32_t* token = token_all + r;
  int32_t* history = history_all != nullptr ? history_all + (size_t)r * hist_len : nullptr;
  int32_t* counts = counts_all != nullptr ? counts_all + (size_t)r * V : nullptr;
  Ctx c{logits, seen, 1.f, 1.f, nullptr, 0.f, 0.f};
  const float temp = fparams[0], top_p = fparams[1];
  c.rp = fparams[2];
  if (counts != nullptr && penalties_all != nullptr) {
    c.presence = penalties_all[2 * (size_t)r];
    c.frequency = penalties_all[2 * (size_t)r + 1];
    if (c.presence != 0.f || c.frequency != 0.f) c.counts = counts;
  }
  const int top_k = iparams[0];
  int best;
  if (!(temp > 0.f)) {
    best = block_argmax(V, c, [](int, float x) { return x; }, sv, si);
  } else {
    c.temp = temp;
    const float m = block_max(V, c, sv);
    uint32_t tau = 0;
    if (top_k > 0 && top_k < V) {
      tau = radix_select(V, c, [](float, uint32_t) { return 1ull; }, (unsigned long long)top_k, hist, sh);
    }
    if (top_p < 1.f) {
      const uint32_t tau_k = tau;
      auto w = [&](float zi, uint32_t key) -> unsigned long long {
        return key >= tau_k ? (unsigned long long)(expf(zi - m) * kFixedOne) : 0ull;
      };
      unsigned long long total = 0;
      for_each_logit(c, V, [&](int, float x) {
        const float zi = x / c.temp;
        total += w(zi, float_key(zi));
      });
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
      if ((threadIdx.x & 31) == 0) wsum[threadIdx.x >> 5] = total;
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned long long t = 0;
        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) t += wsum[k];
        double target = ceil((double)top_p * (double)t);
        sh[0] = target < 1.0 ? 1ull : (unsigned long long)target;
      }
      __syncthreads();
      const unsigned long long target = sh[0];
      __syncthreads();
      const uint32_t tau_p = radix_select(V, c, w, target, hist, sh);
      tau = tau_p > tau ? tau_p : tau;
    }
    const uint64_t seed = (uint64_t)rng[0], step = (uint64_t)rng[1];
    best = block_argmax(
        V, c,
        [&](int i, float x) {
          const float zi = x / c.temp;
          if (float_key(zi) < tau) return -INFINITY;
          const float u = hash_uniform(seed, step, (uint32_t)i);
          return zi + (-logf(-logf(u)));
        },
        sv, si);
  }
  if (threadIdx.x == 0) {
    if (best < 0 || best >= V) best = 0;  // only when every logit is NaN/-inf: keep the index valid
    token[0] = best;
    seen[best] = 1;
    if (counts != nullptr) counts[best] += 1;
    const int np = *pos + advance;
    if (history != nullptr && np >= 0 && np < hist_len) history[np] = best;
    *pos = np;
    rng[1] += 1;
  }
}

}  // namespace

void sample_batch(const float* logits, int B, int V, const int32_t* slots, uint8_t* seen, const float* fparams,
                  const int32_t* iparams, int64_t* rng, int32_t* pos, int advance, int32_t* token, int32_t* history,
                  int hist_len, int32_t* counts, const float* penalties, cudaStream_t stream) {
  if (V <= 0) throw std::invalid_argument("sample: empty vocabulary");
  if (B <= 0) return;
  QS_CUDA_CHECK(pdl::launch(sample_kernel, dim3(B), dim3(kSampleThreads), 0, stream, logits, V, slots, seen, fparams,
                            iparams, rng, pos, advance, token, history, hist_len, counts, penalties));
  QS_LAUNCH_CHECK("sample_kernel");
}

void sample(const float* logits, int V, uint8_t* seen, const float* fparams, const int32_t* iparams, int64_t* rng,
            int32_t* pos, int advance, int32_t* token, int32_t* history, int hist_len, cudaStream_t stream) {
  sample_batch(logits, 1, V, nullptr, seen, fparams, iparams, rng, pos, advance, token, history, hist_len, nullptr,
               nullptr, stream);
}

}  // namespace qsparse
