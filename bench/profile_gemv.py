"""Nsight Compute target (lab tool): a few ternary_linear calls at the 2B4T o_proj shape, so that
`ncu -k regex:"gemv|select"` can show where a call's time goes. Not a benchmark."""
from __future__ import annotations

import torch

from qsparse_infer import linear_kernels as lk
from qsparse_infer import quant
from qsparse_infer.config import topk_count

d, segs = 2560, [2560]
g = torch.Generator(device="cuda").manual_seed(0)
rb = quant.packed_columns(segs, "concat") // 4
c = torch.randint(0, 3, (d, rb, 4), device="cuda", dtype=torch.uint8, generator=g)
w = lk.PackedTernary((c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous(),
                     torch.ones(1, device="cuda"), segs, "concat")
x = torch.randn(1, d, device="cuda", generator=g)
nw = torch.rand(d, device="cuda", generator=g) + 0.5
for s, variant, shape in ((0.0, "t1", None), (0.6, "t1", None), (0.0, "fused", (4, 1)), (0.6, "fused", (4, 1))):
    k = topk_count(d, s)
    for _ in range(2):
        lk.ternary_linear(x, w, k, norm_weight=nw, _variant=variant, _shape=shape)
torch.cuda.synchronize()
print("done")
