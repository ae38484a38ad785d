#include <pybind11/pybind11.h>

#include "common/common.cuh"
#include "common/pdl.cuh"

namespace py = pybind11;

namespace qsparse {

void register_device(py::module_& m) {
  m.def("gpu_count", &gpu_count, "Number of visible CUDA GPUs; 0 without a driver or device.");
  m.def("require_gpu", &require_gpu, "Raise RuntimeError with a clear message when there is no GPU.");
  m.def("set_pdl", &pdl::set_enabled, py::arg("enabled"),
        "Launch decode kernels with programmatic dependent launch (sm_90+; on by default). Takes effect for "
        "launches made (or CUDA graphs captured) afterwards.");
  m.def("get_pdl", &pdl::get_enabled, "Whether programmatic dependent launch is enabled.");
}

}  // namespace qsparse
