"""Feature files at pool scale: merge_features and load_features on 1M and 10M synthetic records (issue 36).

    python benchmarks/ids_scale.py [--n 1000000 10000000] [--chunk-size 100000] [--proj-dim 8]
                                   [--json benchmarks/results-ids-scale.json]

Each size runs in a fresh process: chunk files of chunk_size rows are written as collect_features writes them
(default ids 'rec-' + 32 hex digits, as cli/common.read_jsonl makes them; features (n, proj_dim) float32; the
identity the merge checks), then merge_features (every chunk read and verified, one file written) and
load_features (the merged file read and verified) are timed, each with the peak RSS of its own process. The
projection dimension is small on purpose: what grows here is the ids (about 40 bytes each), not the features.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(out, n, chunk_size, k):
    import hashlib

    import torch

    import less_ref as ref
    ids = ["rec-" + hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]
    identity = dict(ref.Projection(k).identity(1000), grad_type="sgd", checkpoint="", model="synthetic", n_examples=n,
                    data="synthetic", chunk_size=chunk_size, world_size=1, ids=ref._sha([ids]), optimizer=None)
    os.makedirs(out)
    with open(os.path.join(out, "identity.json"), "w") as f:
        json.dump(identity, f)
    shard, paths = ref._chunk_paths(out, 0, 1, -(-n // chunk_size))
    os.makedirs(shard)
    g = torch.Generator().manual_seed(0)
    for c, path in enumerate(paths):
        a, b = c * chunk_size, min(n, (c + 1) * chunk_size)
        ref._write_atomic({"features": torch.randn(b - a, k, generator=g), "positions": torch.arange(a, b)},
                          {"ids": ids[a:b], "identity": identity}, path)


def step(what, out):
    import less_ref as ref
    t = time.perf_counter()
    if what == "merge":
        n = len(ref.merge_features(out)[1])
    else:
        n = len(ref.load_features(os.path.join(out, "features.safetensors"), merged=True)[1])
    return {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(_rss_mb()), "records": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--chunk-size", type=int, default=100_000)
    ap.add_argument("--proj-dim", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(step(*a.child)))
        return
    rows = []
    for n in a.n:
        with tempfile.TemporaryDirectory(prefix="ids_scale_") as tmp:
            out = os.path.join(tmp, "c")
            t = time.perf_counter()
            write(out, n, a.chunk_size, a.proj_dim)
            row = {"records": n, "chunk_size": a.chunk_size, "proj_dim": a.proj_dim,
                   "write_chunks_seconds": round(time.perf_counter() - t, 1)}
            for what in ("merge", "load"):
                proc = subprocess.run([sys.executable, __file__, "--child", what, out], capture_output=True, text=True)
                if proc.returncode:
                    row[what] = {"error": proc.stderr.strip().splitlines()[-1]}
                else:
                    row[what] = json.loads(proc.stdout)
            row["merged_file_mb"] = round(os.path.getsize(os.path.join(out, "features.safetensors")) / 2 ** 20) \
                if os.path.exists(os.path.join(out, "features.safetensors")) else None
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                       "load_before": os.getloadavg()[0], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
