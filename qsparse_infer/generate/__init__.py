"""Text generation for one sequence: `generation` (the token loop behind Engine.generate / stream / chat, on
the GPU decoder or the CPU reference), `sampling` (the sampling rules, CPU twin of the GPU sampler) and
`textstream` (incremental detokenization with stop strings, shared with the serving scheduler). Takes an
engine-like object and never imports `engine.py` or `gpu/`."""
