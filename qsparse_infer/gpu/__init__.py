"""The GPU runtime of one model: `weights` (upload, top-K counts, the layer stack and LM head over rows, shared
with the batched runner in `serving/gpu_runner.py`) and `model` (`GpuModel`: static buffers, KV cache, the
CUDA-graph decode step of one sequence)."""
