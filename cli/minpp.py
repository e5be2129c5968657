"""Command-line tools for minpp_ref: data, train, eval, generate, demo. `python cli/minpp.py --help`.

Plumbing around the method in minpp_ref.py: model loading (a local directory or a GGUF file inside one: nothing is
downloaded), JSONL prompt/answer records, a GSM8K-style problem set (`data`), GSM8K answer checking ("#### N",
compared as numbers), the commands, and an offline demo on a tiny model.
"""
import json
import math
import os
import re
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: minpp_ref
from cli.common import (Progress, UsageError, check_gguf, distinct, existing, finite, first_line,  # noqa: E402
                        load_model, load_tokenizer, model_dir, parser, phase, positive, positives, read_jsonl, run,
                        subparser, whole, writable_file, write_text)
# torch and minpp_ref are imported where they are used: a mistake on the command line is found before their import


def generate(*args, **kwargs):
    """minpp_ref.generate, imported at the first call."""
    from minpp_ref import generate
    return generate(*args, **kwargs)


def extract_answer(text):
    """The number after the last '####' (commas, '$' and spaces dropped), as a Fraction; None if absent."""
    m = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if not m:
        return None
    try:
        return Fraction(m[-1].replace(",", ""))
    except ValueError:
        return None


def answers_match(pred_text, gold_text):
    """Numeric comparison of the '####' answers: 8 == 8.0, '1,000' == 1000, '007' == 7."""
    a, b = extract_answer(pred_text), extract_answer(gold_text)
    return a is not None and a == b


def demo(p_base=0.1, seed=0):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from minpp_ref import MinPPlusHead, answer_logits, apply_min_p, generate, train_head

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # a wide init gives peaked next-token distributions
    model = LlamaForCausalLM(cfg).eval()
    # synthetic answers: continue random prompts with tokens from min-p(p_base) of the frozen model
    prompts = torch.randint(0, 96, (128, 8), generator=g)
    seqs = torch.tensor(generate(model, prompts, 24, min_p=p_base, generator=g))
    ids = torch.cat([prompts, seqs], 1)
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt does not count
    logits, target = answer_logits(model, ids, labels)
    head = MinPPlusHead(K=16, grid="log", tau_min=1e-3)
    print(f"{target.numel()} answer tokens sampled from min-p({p_base}) of a tiny Llama; a MinP+ head with "
          f"{head.tau.numel()} thresholds learns to imitate that sampler from them (300 Adam steps)")

    def show(when, d):
        print(f"{when}: cross-entropy of the answers {d['base_ce']:.3f} (base model) vs {d['minpp_ce']:.3f} (MinP+); "
              f"H(w / sum w) = {d['weight_entropy']:.2f} nats; {d['active']} thresholds active, keeping "
              f"{100 * d['kept_fraction']:.1f}% of the vocabulary")

    show("before training", head_diagnostics(head, logits, target))
    train_head(head, logits, target, steps=300, lr=0.2)
    show("after training ", head_diagnostics(head, logits, target))
    oracle = F.cross_entropy(torch.log(apply_min_p(torch.softmax(logits, -1), p_base)), target).item()
    print(f"the true min-p({p_base}) sampler scores {oracle:.3f}: the best any head can do")
    share = (head.w / head.w.sum()).detach()
    print(f"learned weight per threshold (min-p({p_base}) keeps tokens with p / max p >= {p_base}):")
    print("threshold  weight share")
    for t, s in zip(head.tau.tolist(), share.tolist()):
        print(f"{t:9.4f}  {s:6.3f} {'#' * int(40 * s)}")
    prompt = prompts[:1]
    print("12 new tokens for the first prompt, per sampler (token ids of the random vocabulary):")
    for name, kw in [("greedy", {"do_sample": False}), ("none", {}), ("top_k", {"top_k": 5}), ("top_p", {"top_p": 0.9}),
                     ("min_p", {"min_p": p_base}), ("minpp", {"minpp": (head.tau, head.w.detach())})]:
        print(f"{name:7s}", generate(model, prompt, 12, generator=g, **kw)[0])


def head_diagnostics(head, logits, target, min_share=1e-3):
    """Base CE vs MinP+ CE, H(pi), the number of active thresholds (weight share >= min_share) and the mean
    fraction of the vocabulary they keep (c > 0): what sampling with the pruned head would keep."""
    import torch
    import torch.nn.functional as F

    from minpp_ref import minpp_logits, weight_entropy
    with torch.no_grad():
        tau, w = head.active(min_share)
        return {"base_ce": F.cross_entropy(logits.float(), target).item(),
                "minpp_ce": F.cross_entropy(head.forward_logits(logits), target).item(),
                "weight_entropy": weight_entropy(head.w).item(), "active": int(tau.numel()),
                "kept_fraction": torch.isfinite(minpp_logits(logits, tau, w)).float().mean().item()}



def prompt_text(tok, prompt, system=None, shots=()):
    """The prompt as the model sees it: with a chat template, a system line (if given), the shots as user and
    assistant turns, the prompt's user turn and the generation prompt; without one, the same as plain text."""
    msgs = [{"role": "system", "content": system}] * bool(system) + [
        m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs + [{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return "".join(f"{m['content']}\n\n" for m in msgs) + prompt


# --- a GSM8K-style problem set a small model can answer (examples/minpp_compare.py uses the same): `data`
NAMES = ["Tom", "Ana", "Lee", "Maya", "Omar", "Sara", "Ben", "Ivy"]
THINGS = ["apples", "books", "coins", "stamps", "shells", "pencils", "cards", "marbles"]
# (question, worked answer, operation): 12 templates, split 4 / 4 / 4 by index into train / dev / test
TEMPLATES = [
    ("{n} has {a} {t}. {n} gets {b} more. How many {t} does {n} have now?", "{n} has {a} + {b} = {r} {t}.", "+"),
    ("{n} had {a} {t} and gave {b} to a friend. How many {t} does {n} have left?",
     "{n} has {a} - {b} = {r} {t} left.", "-"),
    ("{n} picks {a} {t} in the morning and {b} in the afternoon. How many {t} did {n} pick?",
     "{n} picked {a} + {b} = {r} {t}.", "+"),
    ("There are {a} {t} on a table and {b} more in a bag. How many {t} are there in all?",
     "There are {a} + {b} = {r} {t}.", "+"),
    ("{n} found {a} {t} on Monday and {b} on Tuesday. How many {t} did {n} find?",
     "{n} found {a} + {b} = {r} {t}.", "+"),
    ("A shop had {a} {t}. It sold {b} of them. How many {t} are still in the shop?",
     "The shop has {a} - {b} = {r} {t}.", "-"),
    ("{n} has {a} red {t} and {b} blue {t}. How many {t} does {n} have?", "{n} has {a} + {b} = {r} {t}.", "+"),
    ("{n} collects {a} {t}, then {b} more. How many {t} does {n} have?", "{n} has {a} + {b} = {r} {t}.", "+"),
    ("{n} has {a} {t} and loses {b}. How many {t} are left?", "{n} has {a} - {b} = {r} {t} left.", "-"),
    ("A box holds {a} {t}. {b} are taken out. How many {t} are in the box now?",
     "The box has {a} - {b} = {r} {t}.", "-"),
    ("{n} reads {a} {t} in May and {b} in June. How many {t} in total?", "{n} read {a} + {b} = {r} {t}.", "+"),
    ("{n} baked {a} {t} and ate {b}. How many {t} are left?", "{n} has {a} - {b} = {r} {t} left.", "-"),
]
SPLITS = {"train": [0, 3, 6, 9], "dev": [1, 4, 7, 11], "test": [2, 5, 8, 10]}  # 1-2 subtraction templates each
SHOTS = [("Mia has 3 pens. Mia gets 4 more. How many pens does Mia have now?", "Mia has 3 + 4 = 7 pens. #### 7"),
         ("Leo had 9 cups and broke 2. How many cups does Leo have left?", "Leo has 9 - 2 = 7 cups left. #### 7"),
         ("Zoe sees 5 birds and then 3 more. How many birds did Zoe see?", "Zoe saw 5 + 3 = 8 birds. #### 8")]
SYSTEM = "Answer with one short sentence, then '####' and the number."


def problem(template, rng, hi):
    """One {prompt, answer} record of TEMPLATES[template] with operands 2..hi (a subtraction never goes below 1)."""
    q, a_text, op = TEMPLATES[template]
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if op == "-":
        a, b = max(a, b) + 1, min(a, b)
    r = a + b if op == "+" else a - b
    kw = dict(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, r=r)
    return {"prompt": q.format(**kw), "answer": a_text.format(**kw) + f" #### {r}"}


def problems(split, n, seed, hi):
    """n problems of a split (train, dev or test: no template shared between splits), seeded by split and seed."""
    import random
    rng = random.Random(f"{split}-{seed}")
    return [problem(rng.choice(SPLITS[split]), rng, hi) for _ in range(n)]


def write_data(a):
    """`data`: OUT/train.jsonl, dev.jsonl, test.jsonl ({prompt, answer}, GSM8K's '#### N'), shots.jsonl (the 3
    worked examples) and system.txt (the answer-format line) -- what train and eval read with --shots / --system."""
    out = {f"{split}.jsonl": problems(split, n, a.seed, a.max_operand)
           for split, n in (("train", a.n_train), ("dev", a.n_dev), ("test", a.n_test))}
    out["shots.jsonl"] = [{"prompt": q, "answer": ans} for q, ans in SHOTS]
    for name in (*out, "system.txt"):
        if os.path.exists(os.path.join(a.out, name)):
            raise UsageError(f"--out {a.out} holds {name} already: give a new --out (nothing is written over)")
    os.makedirs(a.out, exist_ok=True)
    for name, rows in out.items():
        write_text(os.path.join(a.out, name), "".join(json.dumps(r) + "\n" for r in rows))
    write_text(os.path.join(a.out, "system.txt"), SYSTEM + "\n")
    print(f"{', '.join(f'{len(r)} {n}' for n, r in out.items())}, system.txt -> {a.out}")


def _records(path, need_answer_number=False):
    """{prompt, answer} records; for eval every answer must hold its number after '####' (what is compared)."""
    rows = read_jsonl(path, need=("prompt", "answer"))
    for r in rows:
        if not (isinstance(r["prompt"], str) and isinstance(r["answer"], str)):
            raise ValueError(f"{path}: record {r['id']}: prompt and answer must be strings (GSM8K style: "
                             "'... #### 42')")
        if need_answer_number and extract_answer(r["answer"]) is None:
            raise ValueError(f"{path}: record {r['id']}: the answer has no number after '####' "
                             f"({r['answer'][-60:]!r}): "
                             "eval compares that number, so there would be nothing to measure")
    return rows


def _answer_data(model, tok, rows, max_length, system=None, shots=()):
    """Frozen logits at the answer tokens of every record (prompt as the model sees it, answer + eos): (n, V)."""
    import torch

    from minpp_ref import answer_logits
    zs, ts, bar = [], [], Progress(len(rows), "answer logits")
    for r in rows:
        p = tok(prompt_text(tok, r["prompt"], system, shots), add_special_tokens=False)["input_ids"]
        a = tok(r["answer"] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        if len(p) >= max_length:
            raise ValueError(f"record {r['id']}: its prompt is {len(p)} tokens, so no answer token fits in "
                             f"--max-length {max_length}; raise it or drop the record")
        ids = torch.tensor([(p + a)[:max_length]])
        labels = torch.tensor([([-100] * len(p) + a)[:max_length]])
        z, t = answer_logits(model, ids, labels)
        zs.append(z)
        ts.append(t)
        bar.update()
    bar.close()
    return torch.cat(zs), torch.cat(ts)


def _sampler(spec, head):
    """'greedy', 'none', 'top_k=50', 'top_p=0.9', 'min_p=0.1' or 'minpp' -> generate() keyword arguments (head True:
    a check of the syntax before the head is loaded)."""
    name, _, value = spec.partition("=")
    if name == "greedy" and not value:
        return {"do_sample": False}
    if name == "minpp" and not value:
        if head is None:
            raise UsageError("the 'minpp' sampler needs --head")
        return {"minpp": (head.tau, head.w.detach())} if head is not True else {}
    if name not in ("none", "top_k", "top_p", "min_p") or (name != "none") != bool(value):
        raise UsageError(f"sampler {spec!r}: use greedy, none, top_k=K, top_p=P, min_p=P or minpp")
    if name == "none":
        return {}
    try:
        v = int(value) if name == "top_k" else float(value)
    except ValueError:
        raise UsageError(f"sampler {spec!r}: {value!r} is not a {'whole number' if name == 'top_k' else 'number'}") \
            from None
    if not (v >= 1 if name == "top_k" else 0 < v <= 1 if name == "top_p" else 0 <= v <= 1):
        need = {"top_k": "K >= 1", "top_p": "P in (0, 1]", "min_p": "P in [0, 1]"}[name]
        raise UsageError(f"sampler {spec!r}: {need}")
    return {name: v}


def main(argv=None):
    ap = parser("cli/minpp.py", "MinP+ heads: train, evaluate, generate.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = subparser(sub, "train", "fit a head on a frozen model's distributions at reference answers")
    e = subparser(sub, "eval", "GSM8K-style accuracy per sampler and temperature")
    g = subparser(sub, "generate", "continue one prompt")
    d = subparser(sub, "data", "write a GSM8K-style problem set a small model can answer (train/dev/test, shots)")
    for p in (t, e, g):
        p.add_argument("--model", required=True, type=model_dir,
                       help="a local model directory (warmup's OUT/base-model is one: a GGUF read once)")
        p.add_argument("--gguf-file", help="a GGUF checkpoint inside --model (read dequantised to float32, every run)")
        p.add_argument("--system", help="a system line before every prompt (data's OUT/system.txt: the answer format)")
        p.add_argument("--shots", help="JSONL of {prompt, answer}: worked examples shown before every prompt as chat "
                                       "turns (data's OUT/shots.jsonl)")
    d.add_argument("--out", required=True, help="a new directory: train.jsonl, dev.jsonl, test.jsonl, shots.jsonl, "
                                                "system.txt")
    d.add_argument("--n-train", type=whole(1), default=200, help="problems to train a head on")
    d.add_argument("--n-dev", type=whole(1), default=50, help="problems to tune the baselines on")
    d.add_argument("--n-test", type=whole(1), default=50, help="problems to compare on (no template shared)")
    d.add_argument("--max-operand", type=whole(2), default=5, help="operands are 2..this (larger: harder)")
    d.add_argument("--seed", type=whole(0), default=0, help="seed of the problems")
    t.add_argument("--data", required=True, help="JSONL of {prompt, answer} records")
    t.add_argument("--K", type=whole(2), default=32, help="number of thresholds (tau = 0 is one of them)")
    t.add_argument("--grid", default="log", choices=["log", "linear"], help="threshold spacing")
    t.add_argument("--tau-min", type=positive, default=1e-3, help="smallest positive threshold of the log grid")
    t.add_argument("--steps", type=whole(1), default=300, help="Adam steps")
    t.add_argument("--lr", type=positive, default=0.1, help="Adam learning rate")
    t.add_argument("--reg", default="entropy", choices=["entropy", "l1"], help="regulariser of the weights")
    t.add_argument("--lam", type=finite, default=0.0, help="regulariser weight: > 0 sharpens (fewer active thresholds)")
    t.add_argument("--temperature", type=positive, default=1.0, help="temperature the head is trained at")
    t.add_argument("--max-length", type=whole(2), default=1024, help="tokens per record (prompt + answer)")
    t.add_argument("--out", required=True, help="head.safetensors (and its .jsonl export beside it)")
    e.add_argument("--data", required=True, help="JSONL of {prompt, answer}; answers end in '#### N'")
    e.add_argument("--head", help="a trained head (for the minpp sampler)")
    e.add_argument("--samplers", default="greedy,top_p=0.9,min_p=0.1,minpp",
                   help="comma-separated: greedy, none, top_k=K, top_p=P, min_p=P, minpp")
    e.add_argument("--temperatures", type=positives, default="0.7,1.0,1.5", help="comma-separated, each > 0")
    e.add_argument("--n-samples", type=whole(1), default=1, help="samples per problem and sampler")
    e.add_argument("--batch-size", type=whole(1), default=8, help="prompts per batch (left-padded)")
    e.add_argument("--show", type=whole(0), default=2, help="generations printed per sampler and temperature")
    e.add_argument("--out", help="JSON of every problem's correctness per sampler and temperature, and the table")
    for p in (e, g):
        p.add_argument("--max-new-tokens", type=whole(1), default=256, help="new tokens per answer")
        p.add_argument("--seed", type=whole(0), default=0, help="seed of the sampling generator")
    g.add_argument("--prompt", required=True, help="the user's message")
    g.add_argument("--sampler", default="greedy", help="greedy, none, top_k=K, top_p=P, min_p=P or minpp")
    g.add_argument("--head", help="a trained head (for the minpp sampler)")
    g.add_argument("--temperature", type=positive, default=1.0, help="sampling temperature")
    subparser(sub, "demo", "an offline end-to-end run on a tiny model")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        first_line("cli/minpp.py demo: a MinP+ head on a tiny Llama, offline (a few seconds)")
        return demo()
    if a.cmd == "data":
        return write_data(a)
    # every option and file before torch is imported and the model loads: the model's directory, the inputs, --out
    # (never over an input or another output), the samplers, the data; then a first line, then the slow part
    check_gguf(a.model, a.gguf_file)
    inputs = {k: getattr(a, k[2:], None) for k in ("--model", "--data", "--head", "--shots")}
    for option in ("--data", "--head", "--shots"):
        existing(option, inputs[option])
    outputs = {"--out": a.out} if getattr(a, "out", None) else {}
    if a.cmd == "train":
        outputs["--out's .jsonl export"] = export_path(a.out)
    distinct(inputs, outputs)
    for path in outputs.values():
        writable_file(path, "--out")
    names = a.samplers.split(",") if a.cmd == "eval" else [getattr(a, "sampler", "")] * (a.cmd == "generate")
    for name in names:  # the syntax now, the head's weights once it is loaded
        _sampler(name, True)
    rows = _records(a.data, need_answer_number=a.cmd == "eval") if a.cmd != "generate" else None
    a.shots = [(r["prompt"], r["answer"]) for r in _records(a.shots)] if a.shots else []
    first_line(f"cli/minpp.py {a.cmd}: " + (f"{len(rows)} records of {a.data}" if rows else repr(a.prompt[:60]))
               + f"; loading {a.model}")
    import torch

    from minpp_ref import MinPPlusHead
    head = MinPPlusHead.load(a.head) if getattr(a, "head", None) else None
    specs = {name: _sampler(name, head) for name in names}
    with phase(f"loading the model {a.model}"):
        model, tok = load_model(a.model, a.gguf_file).eval(), load_tokenizer(a.model, a.gguf_file, padding_side="left")
    if a.cmd == "train":
        return train(a, model, tok, rows)
    g_ = torch.Generator().manual_seed(a.seed)
    if a.cmd == "generate":
        enc = tok([prompt_text(tok, a.prompt, a.system, a.shots)], return_tensors="pt", add_special_tokens=False)
        out = generate(model, enc.input_ids, a.max_new_tokens, temperature=a.temperature,
                       attention_mask=enc.attention_mask, eos_token_id=tok.eos_token_id, generator=g_,
                       **specs[a.sampler])
        print(tok.decode(out[0], skip_special_tokens=True))
        return
    return evaluate(a, model, tok, rows, specs, g_)


def export_path(out):
    """The head's .jsonl export beside --out: OUT's name with .jsonl for its extension; an --out that already ends in
    .jsonl is refused (the export would overwrite the head)."""
    path = os.path.splitext(out)[0] + ".jsonl"
    if os.path.realpath(path) == os.path.realpath(out):
        raise UsageError(f"--out {out}: the head's .jsonl export would take that very name and overwrite the head; "
                         "name the head .safetensors")
    return path


def train(a, model, tok, rows):
    from minpp_ref import MinPPlusHead, apply_temperature, train_head
    z, target = _answer_data(model, tok, rows, a.max_length, a.system, a.shots)
    head = MinPPlusHead(K=a.K, grid=a.grid, tau_min=a.tau_min)
    train_head(head, z, target, steps=a.steps, lr=a.lr, reg=a.reg, lam=a.lam, temperature=a.temperature,
               log_every=max(1, a.steps // 10))
    d = head_diagnostics(head, apply_temperature(z, a.temperature), target)
    print(f"{target.numel()} answer tokens: cross-entropy {d['base_ce']:.4f} (base) -> {d['minpp_ce']:.4f} (MinP+); "
          f"{d['active']} active thresholds keep {100 * d['kept_fraction']:.1f}% of the vocabulary"
          + (" (tau = 0 has weight: every token keeps some probability, the low ones scaled down)"
             if d["kept_fraction"] == 1 else ""))
    head.save(a.out)
    head.export_jsonl(export_path(a.out))
    print(f"head -> {a.out}")
    return head


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


def evaluate(a, model, tok, rows, specs, g_):
    """Accuracy per sampler and temperature, printed as it goes and as a closing table with 95% Wilson intervals;
    --out: the table and every problem's correctness (per sample) as JSON."""
    table, per_problem = {}, {}
    for spec, kw in specs.items():
        for T in a.temperatures if spec != "greedy" else [None]:  # greedy (argmax) has no temperature
            n_samples = a.n_samples if spec != "greedy" else 1
            right, shown, marks = 0, [], {r["id"]: [] for r in rows}
            bar = Progress(len(rows) * n_samples, f"{spec} T={T}", unit="answers")
            for b in range(0, len(rows), a.batch_size):
                batch = rows[b:b + a.batch_size]
                enc = tok([prompt_text(tok, r["prompt"], a.system, a.shots) for r in batch], return_tensors="pt",
                          padding=True, add_special_tokens=False)
                for _ in range(n_samples):
                    outs = generate(model, enc.input_ids, a.max_new_tokens, temperature=T or 1.0,
                                    attention_mask=enc.attention_mask, eos_token_id=tok.eos_token_id, generator=g_,
                                    **kw)
                    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
                    for x, r in zip(texts, batch):
                        ok = answers_match(x, r["answer"])
                        right += ok
                        marks[r["id"]].append(int(ok))
                    shown += [(r["id"], x) for x, r in zip(texts, batch)][:a.show - len(shown)]
                    bar.update(len(batch))
            bar.close()
            n = len(rows) * n_samples
            table[spec, T] = right / n
            per_problem[f"{spec} T={T}"] = marks
            lo, hi = wilson(right, n)
            print(f"{spec:12s} {'' if T is None else f'T={T}':8s} accuracy {right}/{n} = {right / n:.3f} "
                  f"[{lo:.3f}, {hi:.3f}]", flush=True)
            for rid, x in shown:  # a few generations, so a low score can be told apart from a broken format
                print(f"    {rid}: {x!r}")
    print("\nsampler      T        accuracy  95% interval (Wilson)")
    for (spec, T), acc in table.items():
        n = len(rows) * (a.n_samples if spec != "greedy" else 1)
        lo, hi = wilson(round(acc * n), n)
        print(f"{spec:12s} {'' if T is None else T!s:8s} {acc:8.3f}  [{lo:.3f}, {hi:.3f}]")
    if a.out:
        write_text(a.out, json.dumps({"data": a.data, "n_problems": len(rows), "n_samples": a.n_samples,
                                      "max_new_tokens": a.max_new_tokens, "seed": a.seed,
                                      "accuracy": {f"{s} T={T}": acc for (s, T), acc in table.items()},
                                      "correct": per_problem}, indent=1) + "\n")
        print(f"per-problem results -> {a.out}")
    return table


if __name__ == "__main__":
    run(main)
