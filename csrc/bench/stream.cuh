// The streaming-read ceiling kernel (bench_stream.cu), shared by bench/kernels.py and `qsparse bench`.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/common.cuh"

namespace qsparse {

// Blocks that fill the GPU once (SMs x resident blocks per SM): the grid stream_read should use.
int stream_read_blocks();

// Reads nbytes (a multiple of 16; data 16-byte aligned) once; out[b] = uint32 (wrapping) sum of the 32-bit
// words block b read. The sum of out[0 .. blocks) mod 2^32 is the wrapping sum of all words.
void stream_read(const void* data, long long nbytes, uint32_t* out, int blocks, cudaStream_t stream);

}  // namespace qsparse
