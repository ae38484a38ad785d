// Bindings of the full-precision (bf16 weights) linear family. Pointers arrive as Python ints and the stream as
// torch.cuda.current_stream().cuda_stream; qsparse_infer/kernels/dense.py validates everything first.
#include <pybind11/pybind11.h>

#include "common/common.cuh"
#include "dense/api.cuh"

namespace py = pybind11;

namespace qsparse {

void register_dense(py::module_& m) {
  m.def("dense_gemv",
        [](uintptr_t x, int x_bf16, uintptr_t norm_w, float eps, int D, int k0, int k1, int nseg, uintptr_t w, int ld,
           int N, int col1, int rescale, int epi, uintptr_t bias, uintptr_t residual, uintptr_t out, int splits,
           uintptr_t ws, uintptr_t counters, uintptr_t stream) {
          require_gpu();
          DenseGemvArgs a;
          a.sel.x = as_ptr<const void>(x);
          a.sel.x_bf16 = x_bf16;
          a.sel.norm_w = as_ptr<const float>(norm_w);
          a.sel.eps = eps;
          a.sel.T = 1;
          a.sel.D = D;
          a.sel.K = k0;
          a.K[0] = k0;
          a.K[1] = k1;
          a.nseg = nseg;
          a.w = as_ptr<const uint16_t>(w);
          a.ld = ld;
          a.N = N;
          a.col1 = col1;
          a.rescale = rescale;
          a.epi = epi;
          a.bias = as_ptr<const float>(bias);
          a.residual = as_ptr<const float>(residual);
          a.out = as_ptr<float>(out);
          a.splits = splits;
          a.ws = as_ptr<float>(ws);
          a.counters = as_ptr<uint32_t>(counters);
          launch_dense_gemv(a, as_stream(stream));
        },
        "One-token top-K gather-GEMV over bf16 weights [D, ld] (fused RMSNorm, selection, re-scale, epilogue).");
  m.def("dense_gemv_smem_bytes", &dense_gemv_smem_bytes, "Dynamic shared memory of dense_gemv (0: cannot run).");
  m.def("dense_gemv_max_d", &dense_gemv_max_d);
}

}  // namespace qsparse
