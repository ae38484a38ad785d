// Python bindings of the persistent decode step (csrc/decode/step_api.cuh). The schedule's ops are packed
// here into raw bytes (Python concatenates them and copies them to the device), so the struct layout never
// leaves C++. qsparse_infer/gpu/persistent.py builds the schedule and validates the tensors.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/common.cuh"
#include "decode/step_api.cuh"

namespace py = pybind11;

namespace qsparse {

namespace {
py::bytes as_bytes(const step::StepOp& op) {
  return py::bytes(reinterpret_cast<const char*>(&op), sizeof(op));
}

// The fields every op kind has (its dependency and placement); the rest zeroed, so unused pointers are null.
step::StepOp op_header(int kind, int wait_idx, unsigned wait_target, int signal_idx, int tile0) {
  step::StepOp op;
  std::memset(&op, 0, sizeof(op));
  op.kind = kind;
  op.wait_idx = wait_idx;
  op.wait_target = wait_target;
  op.signal_idx = signal_idx;
  op.tile0 = tile0;
  return op;
}
}  // namespace

void register_step(py::module_& m) {
  m.attr("STEP_PROF_WORDS") = step::kProfWords;
  m.def("step_op_bytes", []() { return static_cast<int>(sizeof(step::StepOp)); },
        "bytes of one packed op of the persistent decode step's schedule");
  m.def(
      "step_pack_gemv",
      [](int wait_idx, unsigned wait_target, int signal_idx, int tile0, int D, int K, int RB, int nseg, int epi,
         int out_ld, int R, int ncb, int prefetch, float eps, uintptr_t x, uintptr_t norm_w, uintptr_t packed,
         uintptr_t colinfo, uintptr_t scales, uintptr_t residual, uintptr_t out, uintptr_t acc, uintptr_t arrive,
         uintptr_t raw) {
        if (D < 1 || K < 1 || K > D) throw std::invalid_argument("step_pack_gemv: need 1 <= K <= D");
        if (R < 1 || ncb < 1 || ncb * 512 < RB * 4) throw std::invalid_argument("step_pack_gemv: bad tiling");
        if (nseg < 1 || nseg > 4) throw std::invalid_argument("step_pack_gemv: 1 to 4 segments");
        if (!x || !packed || !colinfo || !scales || !out || !acc || !arrive || (epi == 1 && !residual))
          throw std::invalid_argument("step_pack_gemv: null device pointer");
        if (!std::isfinite(eps) || eps <= 0.f) throw std::invalid_argument("step_pack_gemv: eps must be > 0");
        step::StepOp op = op_header(step::kOpGemv, wait_idx, wait_target, signal_idx, tile0);
        op.D = D;
        op.K = K;
        op.RB = RB;
        op.nseg = nseg;
        op.epi = epi;
        op.out_ld = out_ld;
        op.R = R;
        op.ncb = ncb;
        op.prefetch = prefetch;
        op.eps = eps;
        op.x = as_ptr<const float>(x);
        op.norm_w = as_ptr<const float>(norm_w);
        op.packed = as_ptr<const uint8_t>(packed);
        op.colinfo = as_ptr<const int32_t>(colinfo);
        op.scales = as_ptr<const float>(scales);
        op.residual = as_ptr<const float>(residual);
        op.out = as_ptr<float>(out);
        op.acc = as_ptr<int32_t>(acc);
        op.arrive = as_ptr<unsigned>(arrive);
        op.raw = as_ptr<int32_t>(raw);
        return as_bytes(op);
      },
      "one projection op of the persistent decode step's schedule, as raw bytes");
  m.def(
      "step_pack_attention",
      [](int wait_idx, unsigned wait_target, int signal_idx, int tile0, uintptr_t kc, uintptr_t vc) {
        if (!kc || !vc) throw std::invalid_argument("step_pack_attention: null device pointer");
        step::StepOp op = op_header(step::kOpAttention, wait_idx, wait_target, signal_idx, tile0);
        op.kc = as_ptr<void>(kc);
        op.vc = as_ptr<void>(vc);
        return as_bytes(op);
      },
      "one attention op (a layer's RoPE + KV append + attention) of the schedule, as raw bytes");
  m.def(
      "step_unsupported",
      [](int cache_dtype, int hd, int G, int max_d) -> py::object {
        const char* why = nullptr;
        if (step::supported(cache_dtype, hd, G, max_d, &why)) return py::none();
        return py::str(why);
      },
      "None when the persistent decode step supports this shape, else the reason");
  m.def(
      "step_max_grid",
      [](int cache_dtype, int hd, int G, int max_d) {
        require_gpu();
        return step::max_grid(cache_dtype, hd, G, max_d);
      },
      "CTAs the persistent decode step may launch (all co-resident: one per SM)");
  m.def(
      "decode_step",
      [](uintptr_t ops, int nops, uintptr_t qkv, int stride, int nq, int nkv, int hd, int max_len, int max_splits,
         int min_chunk, uintptr_t positions, uintptr_t slots, uintptr_t cos_t, uintptr_t sin_t, uintptr_t out,
         uintptr_t ws, uintptr_t counters, uintptr_t ready, int nready, uintptr_t done, uintptr_t prof, int grid,
         int max_d, int cache_dtype, uintptr_t stream) {
        require_gpu();
        if (!qkv || !positions || !slots || !cos_t || !sin_t || !out || !ws || !counters)
          throw std::invalid_argument("decode_step: null device pointer");
        step::StepLaunch a;
        a.ops = as_ptr<const step::StepOp>(ops);
        a.nops = nops;
        a.at = step::StepAttention{as_ptr<const float>(qkv), stride, nq, nkv, hd, max_len, max_splits, min_chunk,
                                   as_ptr<const int32_t>(positions), as_ptr<const int32_t>(slots), as_ptr<const float>(cos_t),
                                   as_ptr<const float>(sin_t), as_ptr<float>(out), as_ptr<float>(ws), as_ptr<int>(counters),
                                   1.0f / std::sqrt(static_cast<float>(hd))};
        a.ready = as_ptr<unsigned>(ready);
        a.nready = nready;
        a.done = as_ptr<unsigned>(done);
        a.prof = as_ptr<unsigned long long>(prof);
        a.grid = grid;
        a.max_d = max_d;
        step::launch(a, cache_dtype, as_stream(stream));
      },
      "the layers of one batch-1 decode step as one persistent kernel (schedule: step_pack_* bytes on the device)");
}

}  // namespace qsparse
