"""`qsparse bench --profile` bookkeeping on the CPU: kernel names -> kinds (robust to renames and new kernels),
projections named by launch order, per-step times and floors, and the bench markdown with the new keys."""
from __future__ import annotations

import pytest

from qsparse_infer.bench.e2e import markdown
from qsparse_infer.bench.profile import base_name, kernel_kind, summarize, table

NS = "qsparse::(anonymous namespace)::"


def test_base_name_strips_namespaces_templates_and_arguments():
    assert base_name(f"void {NS}gemv_t1_kernel<256, 16>({NS}T1Args)") == "gemv_t1_kernel"
    assert base_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)") == \
        "vectorized_elementwise_kernel"
    assert base_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD"


def test_kinds_match_on_the_function_name():
    cases = {
        f"void {NS}select_kernel({NS}SelectArgs)": "selection",
        f"void {NS}gemv_t1_kernel<1024, 32>({NS}T1Args)": "projection",
        f"void {NS}gemv_kernel<true>({NS}GemvArgs)": "projection",
        f"void {NS}attention_kernel<__nv_bfloat16, 4>(float const*, int)": "attention",
        f"void {NS}flash_decode_attention_v2<128>(float const*)": "attention",  # a renamed attention kernel
        f"void {NS}rope_append_kernel<float>(float*, int)": "rope/append",
        f"void {NS}rmsnorm_kernel(float const*, float const*, float*, int, float)": "norm",
        f"void {NS}lm_head_kernel<__nv_bfloat16, true>(float const*)": "lm_head",
        f"void {NS}lm_head_int8_kernel<true>(float const*, float const*, float, signed char const*)": "lm_head",
        f"void {NS}sample_kernel(float const*, int)": "sampling",
        f"void {NS}embedding_kernel<__nv_bfloat16>(__nv_bfloat16 const*, int const*, int, int, float*)": "embedding",
        "void at::native::sort_kernel(float*)": "other",
        "void at::native::indexSelectLargeIndex<float, long, 2>(float*)": "other",  # not ours: never "selection"
        "void at::native::rmsnorm_fwd(float*)": "other",
        # argument types never decide the kind
        f"void {NS}mystery_kernel({NS}AttentionArgs, {NS}RmsNormArgs)": "other",
    }
    for name, kind in cases.items():
        assert kernel_kind(name) == kind, name


def _fake_step_kernels(layers: int):
    out = [f"void {NS}embedding_kernel<float>(float const*)"]
    for _ in range(layers):
        out += [f"void {NS}gemv_t1_kernel<256, 16>(A)", f"void {NS}rope_append_kernel<float>(B)",
                f"void {NS}attention_kernel<float, 4>(C)"]
        out += [f"void {NS}gemv_t1_kernel<256, 16>(A)"] * 3
    out += [f"void {NS}lm_head_int8_kernel<true>(D)", "void at::native::weird_op(float*)", f"void {NS}sample_kernel(E)"]
    return out


def test_summarize_names_projections_by_launch_order():
    layers, steps = 3, 2
    names = _fake_step_kernels(layers) * steps
    # durations: every qkv call 1 us, o 2, gate_up 3, down 4, anything else 0.5
    per_layer = [1.0, 0.5, 0.5, 2.0, 3.0, 4.0]
    durs = ([0.5] + per_layer * layers + [0.5, 0.5, 0.5]) * steps
    kernels = [(float(i), d, n) for i, (d, n) in enumerate(zip(durs, names))]
    floors = {"proj.qkv": 4000, "proj.o": 4000, "proj.gate_up": 8000, "proj.down": 8000, "projection": 24000,
              "lm_head": 400_000, "attention": 1000, "embedding": 10}
    prof = summarize(kernels, steps, layers, floors, streaming_gbps=4000.0)
    rows = {r["kind"]: r for r in prof["rows"]}
    assert prof["projections_named_by_order"]
    for name, us in (("qkv", 1.0), ("o", 2.0), ("gate_up", 3.0), ("down", 4.0)):
        assert rows[f"proj.{name}"]["us_per_step"] == us * layers
        assert rows[f"proj.{name}"]["calls_per_step"] == layers
    assert abs(rows["lm_head"]["floor_us"] - 0.1) < 1e-12  # 400 kB at 4000 GB/s = 0.1 us
    assert rows["other"]["kernels"] == ["weird_op"] and "void at::native::weird_op(float*)" in \
        prof["other_kernels_us_per_step"]
    assert abs(prof["kernel_us_per_step"] - sum(durs) / steps) < 1e-9
    text = table(prof)
    assert "proj.gate_up" in text and "weird_op" in text


def test_summarize_falls_back_when_launch_counts_differ():
    names = _fake_step_kernels(2)[:-4]  # a projection missing: cannot name them by order
    kernels = [(float(i), 1.0, n) for i, n in enumerate(names)]
    prof = summarize(kernels, 1, 2, {"projection": 100}, streaming_gbps=1000.0)
    kinds = {r["kind"] for r in prof["rows"]}
    assert "projection" in kinds and not any(k.startswith("proj.") for k in kinds)
    assert "not named" in table(prof)


def test_bench_markdown_with_streaming_int8_rows_and_profile():
    run = {"decode_tok_s": 400.0, "decode_ms_per_token": 2.5, "prefill_tok_s": 9000.0,
           "bytes_per_token": {"total": 5e8}, "achieved_gbps": 200.0, "pct_of_streaming": 4.8,
           "peak_gpu_bytes": 2**30, "peak_over_ideal": 1.05, "lm_head": "bf16"}
    prof = summarize([(0.0, 3.0, f"void {NS}lm_head_kernel<float, true>(X)")], 1, 1, {"lm_head": 3000},
                     streaming_gbps=4200.0)
    res = {"model": "2b4t", "card": "H200", "prompt_len": 128, "new_tokens": 256, "reps": 3, "kv_dtype": "bf16",
           "streaming_gbps": 4200.0, "copy_gbps": 4100.0, "read_gbps": 4200.0,
           "runs": {"0": run, "0 int8-head": dict(run, lm_head="int8")}, "profile": {"0": prof}}
    md = markdown(res)
    assert "% of streaming" in md and "4200 GB/s" in md and "| 0 int8-head |" in md
    assert "Per-phase breakdown" in md and "lm_head" in md


@pytest.mark.parametrize("model", ["2b4t", "8b", "70b"])
def test_bench_markdown_states_issue_16_targets(model):
    """The report checks the issue's own targets for its shape (2B4T: S=0 >= 1800 tok/s and 5x torch, S=0.6 >=
    1.05x our S=0, 2400 tok/s with the int8 head; 8B: 1000 tok/s and 1.3x; 70B: 75% of streaming and 1.8x);
    met/missed follows the numbers."""
    def run(tok_s: float, head: str = "bf16", pct: float = 4.8) -> dict:
        return {"decode_tok_s": tok_s, "decode_ms_per_token": 1e3 / tok_s, "prefill_tok_s": 9000.0,
                "bytes_per_token": {"total": 5e8}, "achieved_gbps": 200.0, "pct_of_streaming": pct,
                "peak_gpu_bytes": 2**30, "peak_over_ideal": 1.05, "lm_head": head}
    runs = {"0": run(1200.0, pct=80.0), "0.6": run(1440.0), "0.6 int8-head": run(2500.0, "int8")}
    res = {"model": model, "card": "H200", "prompt_len": 128, "new_tokens": 256, "reps": 3, "kv_dtype": "bf16",
           "streaming_gbps": 4200.0, "copy_gbps": 4100.0, "read_gbps": 4200.0, "runs": runs,
           "speedup_vs_our_s0": {k: v["decode_tok_s"] / 1200.0 for k, v in runs.items()},
           "speedup_vs_torch_bf16": {k: v["decode_tok_s"] / 300.0 for k, v in runs.items()}}
    md = markdown(res)
    assert f"Targets (issue 16, {model} shape):" in md
    if model == "2b4t":
        assert "S=0 decode tok/s >= 1800: 1200 (missed)" in md
        assert "S=0 vs the torch bf16 peer >= 5.00x: 4.00x (missed)" in md
        assert "S=0.6 vs our S=0 >= 1.05x: 1.20x (met)" in md
        assert "S=0.6 with the int8 head, decode tok/s >= 2400: 2500 (met)" in md
    elif model == "8b":
        assert "S=0 decode tok/s >= 1000: 1200 (met)" in md and "S=0.6 vs our S=0 >= 1.30x: 1.20x (missed)" in md
        assert "int8 head" not in md.split("Targets")[1]
    else:
        assert "S=0 % of the streaming ceiling >= 75%: 80% (met)" in md
        assert "S=0.6 vs our S=0 >= 1.80x: 1.20x (missed)" in md
    assert "peak GPU memory <= 1.2x (packed + embeddings + head + KV): 1.050x (met)" in md
