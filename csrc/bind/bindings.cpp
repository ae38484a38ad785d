// The Python module qsparse_infer._C. Each kernel family registers its functions from its own
// bind_<family>.cpp; functions take device pointers (ints) and a stream handle, never torch tensors.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace qsparse {
void register_device(py::module_& m);  // bind_device.cpp: GPU presence
void register_linear(py::module_& m);  // bind_linear.cpp: packing, quantize+top-K, ternary GEMV/GEMM
void register_dense(py::module_& m);   // dense.cpp: the bf16 top-K gather-GEMV (full-precision family)
void register_decode(py::module_& m);  // bind_decode.cpp: norms, RoPE, attention, sampling
void register_step(py::module_& m);    // step.cpp: the persistent decode step
void register_bench(py::module_& m);   // bind_bench.cpp: the streaming-read ceiling
}  // namespace qsparse

PYBIND11_MODULE(_C, m) {
  m.doc() = "qsparse-infer CUDA kernels (links the CUDA runtime statically; no libtorch)";
  qsparse::register_device(m);
  qsparse::register_linear(m);
  qsparse::register_dense(m);
  qsparse::register_decode(m);
  qsparse::register_step(m);
  qsparse::register_bench(m);
}
