"""LESS-style feature collection: less_ref's collect_features against EleutherAI bergson's collector, on a real
model -- SmolLM2-135M-Instruct with the LoRA (r 8, q/k/v/o) of the last warm-up checkpoint of
examples/projector_agreement.py (run that first: its --work directory holds the data and the checkpoints).

    pip install --no-deps bergson==2.5.1 && pip install datasets jaxtyping natsort petname simple-parsing ml_dtypes
    python benchmarks/collect_peers.py --work /tmp/pa [--n 64] [--json benchmarks/results-collect-peers.json]

Each configuration runs in a fresh process, back to back, on the same n pool records and the 8 validation records,
proj_dim 8192: seconds per record of the collection (model loading excluded) and the process's peak RSS (model
included). Every configuration collects plain gradients (grad_type sgd) because bergson's Adam path cannot read this
warm-up's optimizer.pt (its error is recorded in the row "bergson adam"); less_ref's Adam collection is timed too.
Agreement: the cosine scores of the n records against the validation records (mean over them), Spearman with
less_ref's dense selection and the overlap of the top 5%. dattri 0.3.0 has no collector for Hugging Face causal
LMs (its attributors take a task with a user-written loss over a torch dataset), so it has no row here.
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

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import less_ref  # noqa: E402

CONFIGS = {"less_ref dense vmap": ("rademacher", True, "sgd"), "less_ref dense loop": ("rademacher", False, "sgd"),
           "less_ref sjlt vmap": ("sjlt", True, "sgd"), "less_ref sjlt loop": ("sjlt", False, "sgd"),
           "less_ref dense loop adam": ("rademacher", False, "adam"), "bergson": None, "bergson adam": None}
K = 8192


def records(work, n):
    from cli.common import read_jsonl
    return read_jsonl(f"{work}/data/pool.jsonl")[:n], read_jsonl(f"{work}/data/val.jsonl")


def last_checkpoint(work):
    from cli import less as less_cli
    return less_cli.checkpoints(f"{work}/warm")[-1]


def child_less_ref(work, n, kind, vmap, grad_type, tmp):
    from cli.common import load_model, load_tokenizer
    ck = last_checkpoint(work)
    tok = load_tokenizer(f"{work}/warm/base-model")
    pool, val = ([less_ref.encode_example(r, tok) for r in recs] for recs in records(work, n))
    model = load_model(f"{work}/warm/base-model", lora_adapter=ck)
    t = time.perf_counter()
    paths = [less_ref.collect_features(model, ex, f"{tmp}/{side}", g, f"{ck}/optimizer.pt" if g == "adam" else None,
                                       less_ref.Projection(K, 0, kind), os.path.basename(ck), vmap=vmap)
             for side, ex, g in (("train", pool, grad_type), ("val", val, "sgd"))]
    seconds = time.perf_counter() - t
    (train, ids, _), (v, _, _) = (less_ref.load_features(p, merged=True) for p in paths)
    return seconds, ids, less_ref.influence_scores(train, v).tolist()


def child_bergson(work, n, adam, tmp):
    from bergson.build import build
    from bergson.config import DataConfig, IndexConfig, PreprocessConfig
    from bergson.data import load_gradients
    ck = last_checkpoint(work)
    pool, val = records(work, n)
    feats, seconds = [], 0.0
    for side, recs in (("train", pool), ("val", val)):
        with open(f"{tmp}/{side}.jsonl", "w") as f:
            f.writelines(json.dumps({"messages": r["messages"]}) + "\n" for r in recs)
        cfg = IndexConfig(run_path=f"{tmp}/{side}-index", model=ck, projection_dim=K, projection_target="global",
                          projection_type="rademacher", loss_reduction="mean",
                          data=DataConfig(dataset=f"{tmp}/{side}.jsonl", conversation_column="messages"),
                          optimizer_state=f"{ck}/optimizer.pt" if adam and side == "train" else "")
        t = time.perf_counter()
        build(cfg, PreprocessConfig())
        seconds += time.perf_counter() - t
        import numpy as np
        feats.append(torch.from_numpy(np.array(load_gradients(cfg.run_path), dtype=np.float32)).reshape(len(recs), K))
    return seconds, [r["id"] for r in pool], less_ref.influence_scores(feats[0], feats[1]).tolist()


def child(name, work, n):
    with tempfile.TemporaryDirectory() as tmp:
        row = {"name": name}
        try:
            if name.startswith("bergson"):
                seconds, ids, scores = child_bergson(work, n, name.endswith("adam"), tmp)
            else:
                seconds, ids, scores = child_less_ref(work, n, *CONFIGS[name], tmp)
            row.update(seconds=seconds, seconds_per_record=seconds / (n + 8), ids=ids, scores=scores)
        except Exception as e:  # recorded as the row's result: the exact error a user gets
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="examples/projector_agreement.py's --work directory")
    ap.add_argument("--n", type=int, default=64, help="pool records to collect (default 64)")
    ap.add_argument("--json", help="write the rows and the agreement here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.work, a.n)
    from projector_agreement import spearman
    rows = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--work", a.work, "--n", str(a.n), "--child", name],
                             capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
        rows[name] = json.loads(line[-1][4:]) if line else {"name": name, "error": out.stderr[-400:]}
        print(f"{name:26s}", {k: v for k, v in rows[name].items() if k not in ("ids", "scores")}, flush=True)
    ref = rows["less_ref dense vmap"]
    k = max(1, int(0.05 * a.n))
    top = lambda s: set(torch.tensor(s).argsort(descending=True)[:k].tolist())  # noqa: E731
    for r in rows.values():
        if "scores" in r and "scores" in ref:
            assert r["ids"] == ref["ids"], f"{r['name']}: rows in another order"
            r["spearman_vs_less_ref_dense"] = spearman(torch.tensor(r["scores"]), torch.tensor(ref["scores"]))
            r["top5_overlap_vs_less_ref_dense"] = len(top(r["scores"]) & top(ref["scores"])) / k
    result = {"n": a.n, "n_val": 8, "proj_dim": K, "k_top": k, "rows": rows, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "load_at_end": os.getloadavg()[0]}
    for r in rows.values():
        print(f"{r['name']:26s} " + (f"{r['seconds_per_record']:.2f} s/record, peak RSS {r['peak_rss_mb']:.0f} MB, "
                                     f"Spearman {r.get('spearman_vs_less_ref_dense', float('nan')):.3f}, top-5% "
                                     f"overlap {r.get('top5_overlap_vs_less_ref_dense', float('nan')):.2f}"
                                     if "seconds" in r else f"error: {r['error'][:200]}"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
