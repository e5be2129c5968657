"""R generation before and after the 2026-12-07 round, in one process (RESULTS.md "This round"):

    pip install --no-deps traker==0.3.2 && python benchmarks/rgen_round.py benchmarks/results-rgen-round.json

The previous less_ref (commit 37a18d9, read with git show) vs the current one: one (2048, 8192) block of R vs
torch's normal_ and fill_; project at D = 2^17, k = 8192, 16 rows vs TRAK's BasicProjector; dense collection of 320
records of a 2-layer Llama (D = 590k, k = 8192) at the default LESS_BUFFER_SECONDS (600), without a time limit and
with every chunk flushed on its own (the worst case); 48 records dense vs sjlt, and that ratio's floors (R
written by fill_, R free). Times are wall seconds of one call.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import less_ref as N  # noqa: E402
from trak.projectors import BasicProjector, ProjectionType  # noqa: E402

_old = os.path.join(tempfile.mkdtemp(), "old_less_ref.py")
with open(_old, "w") as f:
    f.write(subprocess.run(["git", "-C", ROOT, "show", "37a18d9:less_ref.py"], capture_output=True, text=True,
                           check=True).stdout)
_spec = importlib.util.spec_from_file_location("old_less_ref", _old)
O = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(O)
from trak.projectors import BasicProjector, ProjectionType
res = {"load_start": os.getloadavg()[0]}
def inter(fns, repeat):
    for f in fns: f()
    ts = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            t = time.perf_counter(); f(); ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]
n, k = 2048, 8192
buf, blk = torch.empty(n, k), torch.empty(n, k)
assert torch.equal(O._rademacher_rows(0, 12345, n, k), N._rademacher_rows(0, 12345, n, k, "cpu", buf))
r = inter([lambda: O._rademacher_rows(0, 12345, n, k), lambda: N._rademacher_rows(0, 12345, n, k, "cpu", buf),
           lambda: blk.normal_(), lambda: blk.fill_(1.0)], 15)
res["rgen_ms"] = dict(zip(["old", "new", "normal_", "fill_"], [x * 1e3 for x in r]))
print("rgen ms old/new/normal_/fill_", [round(x * 1e3, 2) for x in r], flush=True)
D = 2 ** 17
x = torch.randn(16, D)
assert torch.equal(O.project(x, k), N.project(x, k))
proj = BasicProjector(D, k, 0, ProjectionType.rademacher, torch.device("cpu"), block_size=2048)
p = inter([lambda: O.project(x, k), lambda: N.project(x, k), lambda: proj.project(x, model_id=0)], 3)
res["project_s"] = dict(zip(["old", "new", "BasicProjector"], p))
print("project D=2^17 k=8192 16 rows s old/new/BasicProjector", [round(v, 3) for v in p], flush=True)
# the buffer-time flush: tiny 2-layer Llama, 320 records, dense k 8192: default (600 s) vs no time limit vs every chunk
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
g = torch.Generator().manual_seed(0)
ex = []
for i in range(320):
    L = int(torch.randint(32, 65, (1,), generator=g)); ids = torch.randint(0, 1024, (L,), generator=g).tolist()
    ex.append({"id": f"r{i}", "input_ids": ids, "labels": [-100] * (L // 2) + ids[L // 2:]})
os.environ["PROGRESS_SECONDS"] = "600"
def collect(seconds, kind="rademacher", exs=ex):
    os.environ["LESS_BUFFER_SECONDS"] = seconds
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); N.collect_features(model, exs, tmp, "sgd", projection=N.Projection(k, 0, kind))
        return (time.perf_counter() - t) / len(exs)
c = inter([lambda: collect("600"), lambda: collect("1e9"), lambda: collect("1e-9")], 1)
res["collect_320_s"] = dict(zip(["default 600 s", "no time limit", "every chunk"], c))
print("collect 320 dense, s: default / no limit / every chunk", [round(v, 4) for v in c], flush=True)
few = ex[:48]
d = inter([lambda: collect("600", "rademacher", few), lambda: collect("600", "sjlt", few)], 1)
res["collect_48_s"] = dict(zip(["dense", "sjlt"], d))
print("collect 48, s: dense/sjlt", [round(v, 4) for v in d], round(d[0] / d[1], 2), flush=True)
# the floors of that ratio: the same dense collection with R's generation replaced by writing the block once
# (fill_: the memory-write floor of any R that is materialised) and by nothing (the buffer as it is: the product,
# the gradients and the files alone); R's values are then wrong, only the time is measured
rows = N._rademacher_rows
def floor(make):
    N._rademacher_rows = lambda seed, row0, nrows, proj_dim, device="cpu", out=None: make(out)
    try:
        return collect("600", "rademacher", few)
    finally:
        N._rademacher_rows = rows
f = inter([lambda: collect("600", "rademacher", few), lambda: floor(lambda o: o.fill_(1.0)), lambda: floor(lambda o: o),
           lambda: collect("600", "sjlt", few)], 2)
res["collect_48_floor_s"] = dict(zip(["dense", "dense, R = fill_", "dense, R free", "sjlt"], f))
print("collect 48, s: dense / R by fill_ / R free / sjlt", [round(v, 3) for v in f],
      "ratios to sjlt", [round(v / f[3], 2) for v in f[:3]], flush=True)
res["load_end"] = os.getloadavg()[0]
res["command"] = "python benchmarks/rgen_round.py"
res["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count()}
with open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/results-rgen-round.json", "w") as f:
    json.dump(res, f, indent=1)
