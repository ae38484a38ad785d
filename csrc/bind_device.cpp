#include <pybind11/pybind11.h>

#include "common.cuh"

namespace py = pybind11;

namespace qsparse {

void register_device(py::module_& m) {
  m.def("gpu_count", &gpu_count, "Number of visible CUDA GPUs; 0 without a driver or device.");
  m.def("require_gpu", &require_gpu, "Raise RuntimeError with a clear message when there is no GPU.");
}

}  // namespace qsparse
