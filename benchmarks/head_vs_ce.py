"""train_head (300 Adam steps via band statistics, the seed's grid K = 65 log from 1e-5) vs one F.cross_entropy
forward + backward on the same (4096, 32000) float32 logits, interleaved in one process (RESULTS.md "This round"):

    python benchmarks/head_vs_ce.py [results.json]
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minpp_ref as M  # noqa: E402

g = torch.Generator().manual_seed(0)
N, V = 4096, 32000
z, t = torch.randn(N, V, generator=g) * 3, torch.randint(0, V, (N,), generator=g)
tau = M.threshold_grid(K=65, grid="log", tau_min=1e-5)
fns = {"cross_entropy fwd+bwd": lambda: F.cross_entropy(z.detach().requires_grad_(True), t).backward(),
       "band_statistics (the one pass)": lambda: M.band_statistics(z, t, tau),
       "train_head (pass + 300 steps)": lambda: M.train_head(M.MinPPlusHead(tau=tau), z, t, steps=300, lr=0.1)}
for f in fns.values():
    f()
times = {k: [] for k in fns}
for _ in range(3):
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
res = {"seconds_median_of_3": med, "train_head / cross_entropy": med["train_head (pass + 300 steps)"] /
       med["cross_entropy fwd+bwd"], "load": os.getloadavg()[0], "shape": [N, V], "torch": torch.__version__}
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
