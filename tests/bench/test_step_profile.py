"""The persistent step's profile analysis (qsparse_infer/bench/step_profile.py) on stamps made up here: the
critical path, spans, phases and the timeline come out of the numbers as defined, and the PNG is drawn."""
from __future__ import annotations

import torch

from qsparse_infer.bench.step_profile import analyze, markdown_lines, plot_timelines

OPS = [(0, "qkv"), (0, "attention"), (0, "o"), (0, "gate_up"), (0, "down"), (1, "qkv"), (1, "attention"), (1, "o"),
       (1, "gate_up"), (1, "down")]


def _stamps(grid: int = 3) -> torch.Tensor:
    """Op j's tile on CTA c: starts at 1000 j + 10 c ns, waits 200, selects 300, product 100, tail 50; the
    last CTA also ends the op 400 ns later. Attention uses only CTA 0."""
    prof = torch.zeros(len(OPS), grid, 8, dtype=torch.int64)
    for j, (_, name) in enumerate(OPS):
        for c in range(1 if name == "attention" else grid):
            s = 1_000_000 + 1000 * j + 10 * c
            first_end = s + 650
            prof[j, c] = torch.tensor([s, 1, first_end + (400 if c == grid - 1 else 0), 7 + c, s + 200, s + 500,
                                       s + 600, first_end])
            if name == "attention":
                prof[j, c, 5] = prof[j, c, 6] = 0
    return prof


def test_analyze_phases_and_critical_path():
    prof = _stamps()
    r = analyze(prof, OPS, [1000] * len(OPS), gbps=1.0)
    qkv = r["per_op"]["qkv"]
    assert abs(qkv["wait_us"] - 0.2) < 1e-9 and abs(qkv["select_us"] - 0.3) < 1e-9
    assert abs(qkv["product_us"] - 0.1) < 1e-9 and abs(qkv["tail_us"] - 0.05) < 1e-9
    assert abs(r["per_op"]["attention"]["body_us"] - 0.45) < 1e-9
    assert r["per_op"]["qkv"]["ctas"] == 3 and r["per_op"]["attention"]["ctas"] == 1
    # op j ends at 1000 j + 20 + 1050 (last CTA) except attention (CTA 0: 650); critical = end - previous end
    ends = [r_["end_us"] for r_ in r["ops"]]
    assert abs(ends[0] - 1.070) < 1e-9 and abs(ends[1] - 1.650) < 1e-9
    assert abs(r["ops"][2]["critical_us"] - (ends[2] - ends[1])) < 1e-9
    assert abs(r["layers_us"] - ends[-1]) < 1e-9
    assert abs(r["per_op"]["qkv"]["bytes_floor_us"] - 1e6 * 1000 / 1e9) < 1e-9
    assert len(r["timeline"]) == 8 * 3 + 2 and {t[0] for t in r["timeline"]} == {7, 8, 9}


def test_markdown_and_timeline_png(tmp_path):
    r = analyze(_stamps(), OPS, [2_000_000] * len(OPS), gbps=4000.0)
    r.update(layers_us_median=r["layers_us"], layers_us_all=[r["layers_us"]], context=9, prefetch=True)
    text = "\n".join(markdown_lines("S=0.6", r))
    assert "| qkv |" in text and "(body)" in text and "L2 prefetch on" in text
    path = tmp_path / "t.png"
    plot_timelines({"S=0.6": r, "S=0": r}, "tiny", path)
    assert path.stat().st_size > 10_000


def test_an_op_that_never_ran_is_an_error():
    prof = _stamps()
    prof[3, :, 1] = 0
    try:
        analyze(prof, OPS, [1] * len(OPS), 1.0)
    except ValueError as e:
        assert "every op" in str(e)
    else:
        raise AssertionError("expected a ValueError")
