// Python bindings of the benchmark helper kernels (bench_stream.cu); qsparse_infer/kernels/ceilings.py wraps them.
#include <pybind11/pybind11.h>

#include "bench/stream.cuh"

namespace py = pybind11;

namespace qsparse {

void register_bench(py::module_& m) {
  m.def(
      "stream_read_blocks",
      []() {
        require_gpu();
        return stream_read_blocks();
      },
      "grid size (blocks) that fills the GPU once for stream_read");
  m.def(
      "stream_read",
      [](uintptr_t data, long long nbytes, uintptr_t out, int blocks, uintptr_t stream) {
        require_gpu();
        stream_read(reinterpret_cast<const void*>(data), nbytes, reinterpret_cast<uint32_t*>(out), blocks,
                    as_stream(stream));
      },
      "read nbytes once with 16-byte streaming loads; out[b] = wrapping uint32 sum of block b's words");
}

}  // namespace qsparse
