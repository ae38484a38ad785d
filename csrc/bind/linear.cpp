// Bindings of the ternary-linear family. Pointers arrive as Python ints and the stream as
// torch.cuda.current_stream().cuda_stream; qsparse_infer/kernels/linear.py validates everything first.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/common.cuh"
#include "linear/api.cuh"

namespace py = pybind11;

namespace qsparse {
namespace {

using uptr = uintptr_t;

EpilogueArgs make_epilogue(uptr colinfo, uptr scales, int epi, uptr residual, uptr out, int out_ld, uptr raw) {
  EpilogueArgs e;
  e.colinfo = as_ptr<const int32_t>(colinfo);
  e.scales = as_ptr<const float>(scales);
  e.epi = epi;
  e.residual = as_ptr<const float>(residual);
  e.out = as_ptr<float>(out);
  e.out_ld = out_ld;
  e.raw = as_ptr<int32_t>(raw);
  return e;
}

SelectArgs make_select(uptr x, int x_bf16, uptr norm_w, float eps, int T, int D, int K) {
  SelectArgs s;
  s.x = as_ptr<const void>(x);
  s.x_bf16 = x_bf16;
  s.norm_w = as_ptr<const float>(norm_w);
  s.eps = eps;
  s.T = T;
  s.D = D;
  s.K = K;
  return s;
}

}  // namespace

void register_linear(py::module_& m) {
  m.def("ternary_pack",
        [](uptr w, uptr colinfo, uptr packed, uptr err, int N, int D, int RB, uptr stream) {
          require_gpu();
          launch_pack(as_ptr<const int8_t>(w), as_ptr<const int32_t>(colinfo), as_ptr<uint8_t>(packed),
                      as_ptr<int32_t>(err), N, D, RB, as_stream(stream));
        },
        "Pack int8 ternary [N, D] into uint8 [D, RB] (format v1) through a column-info map.");
  m.def("ternary_unpack",
        [](uptr packed, uptr colinfo, uptr w, uptr err, int D, int RB, uptr stream) {
          require_gpu();
          launch_unpack(as_ptr<const uint8_t>(packed), as_ptr<const int32_t>(colinfo), as_ptr<int8_t>(w),
                        as_ptr<int32_t>(err), D, RB, as_stream(stream));
        },
        "Unpack uint8 [D, RB] (format v1) into int8 ternary [N, D].");
  m.def("quantize_topk",
        [](uptr x, int x_bf16, uptr norm_w, float eps, int T, int D, int K, uptr idx, uptr q, int ld, uptr gamma,
           uptr qdense, int ldd, uptr stream, int threads) {
          require_gpu();
          SelectArgs s = make_select(x, x_bf16, norm_w, eps, T, D, K);
          s.idx = as_ptr<int32_t>(idx);
          s.q = as_ptr<int8_t>(q);
          s.ld = ld;
          s.gamma = as_ptr<float>(gamma);
          s.qdense = as_ptr<int8_t>(qdense);
          s.ldd = ldd;
          launch_select(s, as_stream(stream), threads);
        },
        py::arg("x"), py::arg("x_bf16"), py::arg("norm_w"), py::arg("eps"), py::arg("T"), py::arg("D"), py::arg("K"),
        py::arg("idx"), py::arg("q"), py::arg("ld"), py::arg("gamma"), py::arg("qdense"), py::arg("ldd"),
        py::arg("stream"), py::arg("threads") = 0,
        "Per-token absmax int8 + exact top-K (ties: lower index), optionally RMSNorm-fused; threads: the CTA size "
        "per token (0 = by T: 1024 up to 2 tokens per SM, else 256; both give the same bits).");
  m.def("ternary_gemv",
        [](int fused, uptr x, int x_bf16, uptr norm_w, float eps, int T, int D, int K, uptr idx, uptr q, int ld,
           uptr gamma, uptr packed, int RB, uptr colinfo, uptr scales, int epi, uptr residual, uptr out, int out_ld,
           uptr raw, int chunks_per_tile, int splits, uptr ws, uptr counters, uptr stream) {
          require_gpu();
          GemvArgs a;
          a.fused = fused;
          a.sel = make_select(x, x_bf16, norm_w, eps, T, D, K);
          a.sel.idx = as_ptr<int32_t>(idx);
          a.sel.q = as_ptr<int8_t>(q);
          a.sel.ld = ld;
          a.sel.gamma = as_ptr<float>(gamma);
          a.packed = as_ptr<const uint8_t>(packed);
          a.RB = RB;
          a.ep = make_epilogue(colinfo, scales, epi, residual, out, out_ld, raw);
          a.chunks_per_tile = chunks_per_tile;
          a.splits = splits;
          a.ws = as_ptr<int32_t>(ws);
          a.counters = as_ptr<uint32_t>(counters);
          launch_gemv(a, as_stream(stream));
        },
        "Gather-GEMV over packed ternary rows for T <= 8 tokens (fused or from a prior quantize_topk).");
  m.def("ternary_gemv_t1",
        [](uptr x, int x_bf16, uptr norm_w, float eps, int D, int K, uptr packed, int RB, uptr colinfo, uptr scales,
           int nseg, int epi, uptr residual, uptr out, int out_ld, uptr raw, int R, uptr stream, int threads,
           int variant) {
          require_gpu();
          SelectArgs s = make_select(x, x_bf16, norm_w, eps, 1, D, K);
          launch_gemv_t1(s, as_ptr<const uint8_t>(packed), RB,
                         make_epilogue(colinfo, scales, epi, residual, out, out_ld, raw), nseg, R,
                         as_stream(stream), threads, variant);
        },
        py::arg("x"), py::arg("x_bf16"), py::arg("norm_w"), py::arg("eps"), py::arg("D"), py::arg("K"),
        py::arg("packed"), py::arg("RB"), py::arg("colinfo"), py::arg("scales"), py::arg("nseg"), py::arg("epi"),
        py::arg("residual"), py::arg("out"), py::arg("out_ld"), py::arg("raw"), py::arg("R"), py::arg("stream"),
        py::arg("threads") = 0, py::arg("variant") = 2,
        "One-token gather-GEMV with the selection fused; R CTAs per 512 columns (a cluster); threads: CTA size "
        "(0 = chosen from D; 128, 256 or 512 for the kernel lab); variant 2 (rows loaded after the selection) "
        "or 3 (rows prefetched into shared memory during it).");
  m.def("gemv_t1p_smem_bytes", &gemv_t1p_smem_bytes, "Shared memory of the one-token GEMV variant 3.");
  m.def("gemv_t1p_max_smem_bytes", &gemv_t1p_max_smem_bytes, "Most shared memory variant 3 may use.");
  m.def("gemv_t1_max_d", &gemv_t1_max_d, "Largest input dimension of the one-token GEMV.");
  m.def("gemv_fused_smem_bytes", &gemv_fused_smem_bytes, "Dynamic shared memory of the fused GEMV.");
  m.def("ternary_gemm",
        [](uptr qdense, int ldq, uptr gamma, int T, int D, uptr packed, int RB, uptr colinfo, uptr scales, int epi,
           uptr residual, uptr out, int out_ld, uptr raw, uptr stream, int variant, int splits, int tile_tokens) {
          require_gpu();
          GemmArgs a;
          a.qdense = as_ptr<const int8_t>(qdense);
          a.ldq = ldq;
          a.gamma = as_ptr<const float>(gamma);
          a.T = T;
          a.D = D;
          a.packed = as_ptr<const uint8_t>(packed);
          a.RB = RB;
          a.ep = make_epilogue(colinfo, scales, epi, residual, out, out_ld, raw);
          if (variant == 2) launch_gemm_skinny(a, splits, as_stream(stream));
          else if (variant == 1) launch_gemm(a, as_stream(stream));
          else if (variant == 3) launch_gemm_prefill(a, tile_tokens, as_stream(stream));
          else throw std::invalid_argument("ternary_gemm: variant must be 1 (tiled), 2 (skinny) or 3 (prefill)");
        },
        py::arg("qdense"), py::arg("ldq"), py::arg("gamma"), py::arg("T"), py::arg("D"), py::arg("packed"),
        py::arg("RB"), py::arg("colinfo"), py::arg("scales"), py::arg("epi"), py::arg("residual"), py::arg("out"),
        py::arg("out_ld"), py::arg("raw"), py::arg("stream"), py::arg("variant") = 1, py::arg("splits") = 1,
        py::arg("tile_tokens") = 128,
        "Tensor-core (mma.sync s8) ternary GEMM over masked int8 activations: variant 1 (64-token tiles), 2 "
        "(decode widths: 16 tokens per CTA, k split over `splits` CTAs of a cluster) or 3 (prefill widths: "
        "`tile_tokens` (64 or 128) tokens x 128 columns per CTA through a cp.async pipeline).");
  m.def("gemm_skinny_max_splits", &gemm_skinny_max_splits, "Most k-splits (cluster size) of GEMM variant 2.");
}

}  // namespace qsparse
