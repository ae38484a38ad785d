#include <pybind11/pybind11.h>

#include "common.cuh"

namespace py = pybind11;

namespace qsparse {

void register_linear(py::module_& m) {
}

}  // namespace qsparse
