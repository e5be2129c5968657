"""Command-line tools for less_ref: collect, match, select, demo. `python cli/less.py --help`.

Everything here is plumbing around the method in less_ref.py: model loading (a directory, a hub id or a GGUF
file; a saved or fresh LoRA), JSONL reading, the commands, and an offline demo on a tiny model.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: less_ref
from less_ref import (Projection, _as_long, _world, checkpoint_weights_from_trainer_state,  # noqa: E402
                      collect_features, encode_example, match, select_top, trainer_param_order)


def read_jsonl(path):
    """The records of a JSONL file, each with an 'id': its own, or '<file name>:<line number>' (1-based) when
    absent. A line that is not a JSON object is a ValueError naming the file and line."""
    out, name = [], os.path.basename(str(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
            rec.setdefault("id", f"{name}:{n}")
            out.append(rec)
    return out



def _task_examples(task, n, g, start_id):
    """'copy': a b c SEP_A -> a b c over tokens 4..35; 'reverse': d e f SEP_B -> f e d over tokens 32..63.
    The two tasks share 4 of their 32 tokens each."""
    out = []
    lo = 4 if task == "copy" else 32
    for j in range(n):
        body = torch.randint(lo, lo + 32, (6,), generator=g).tolist()
        sep, resp = (1, body) if task == "copy" else (2, body[::-1])
        ids = [0] + body + [sep] + resp + [3]
        out.append({"id": f"{task}-{start_id + j}", "input_ids": ids, "labels": [-100] * 8 + resp + [3], "task": task})
    return out


def write_trainer_checkpoint(model, optimizer, lrs_per_epoch, ckpt_dir):
    """What a transformers Trainer leaves behind, as far as LESS reads it: optimizer.pt + trainer_state.json."""
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(optimizer.state_dict(), os.path.join(ckpt_dir, "optimizer.pt"))
    log = [{"epoch": e + (s + 1) / len(lrs), "learning_rate": lr} for e, lrs in enumerate(lrs_per_epoch) for s, lr in enumerate(lrs)]
    with open(os.path.join(ckpt_dir, "trainer_state.json"), "w") as f:
        json.dump({"log_history": log}, f)


def trainer_optimizer(model, lr, weight_decay=0.0):
    """AdamW with a Trainer's two groups (decay params, then no-decay params)."""
    order, sizes = trainer_param_order(model)
    named = dict(model.named_parameters())
    return torch.optim.AdamW([{"params": [named[n] for n in order[:sizes[0]]], "weight_decay": weight_decay},
                              {"params": [named[n] for n in order[sizes[0]:]], "weight_decay": 0.0}], lr=lr)


def demo(workdir=None, proj_dim=2048, seed=0):
    import tempfile
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore", "There is a performance drop")  # torch.func on CPU SDPA: correct, slower

    workdir = workdir or tempfile.mkdtemp(prefix="less_demo_")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    pool = _task_examples("copy", 40, g, 0) + _task_examples("reverse", 360, g, 0)
    val = _task_examples("copy", 8, g, 1000)
    print(f"pool: {len(pool)} examples (40 copy, 360 reverse); validation: {len(val)} copy examples")
    # warm-up: 2 epochs of LoRA-like training (attention q/v only trainable) on a random 10% of the pool
    for n, p in model.named_parameters():
        p.requires_grad_(any(k in n for k in ("q_proj", "v_proj")))
    opt = trainer_optimizer(model, lr=2e-3)
    warm = [pool[i] for i in torch.randperm(len(pool), generator=g)[:40].tolist()]
    ckpts, lrs = [], []
    for epoch in range(2):
        model.train()
        lr_log = []
        for step, ex in enumerate(warm):
            lr = 2e-3 * (1 - (epoch * len(warm) + step) / (2 * len(warm)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss = model(input_ids=_as_long(ex["input_ids"])[None], labels=_as_long(ex["labels"])[None]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr_log.append(lr)
        lrs.append(lr_log)
        ck = os.path.join(workdir, f"checkpoint-{epoch + 1}")
        write_trainer_checkpoint(model, opt, lrs, ck)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(ck, "weights.pt"))
        ckpts.append(ck)
    eta = checkpoint_weights_from_trainer_state(os.path.join(ckpts[-1], "trainer_state.json"))
    print(f"checkpoint weights (mean lr per epoch): {[f'{e:.3g}' for e in eta]}")
    train_files, val_files = [], []
    for ck in ckpts:
        model.load_state_dict(torch.load(os.path.join(ck, "weights.pt"), weights_only=True), strict=False)
        name = os.path.basename(ck)
        for data, gt, files in ((pool, "adam", train_files), (val, "sgd", val_files)):
            out = os.path.join(workdir, f"{name}-{gt}")
            collect_features(model, data, out, gt, os.path.join(ck, "optimizer.pt"), Projection(proj_dim, seed), name,
                             chunk_size=160, batch_size=16)
            files.append(os.path.join(out, "features.safetensors"))
    scores, ids = match(train_files, val_files, eta)
    top = select_top(scores, fraction=0.05)
    hit = sum(ids[i].startswith("copy") for i in top.tolist())
    print(f"selected the top 5%: {len(top)} examples, {hit} of them from the validation task (copy); "
          f"a random 5% would hold {len(top) * 40 / 400:.1f}")
    print("the five best scores (mean cosine with the validation gradients, weighted over checkpoints):")
    for i in top[:5].tolist():
        print(f"  {ids[i]:12s} {scores[i].item():+.4f}")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs)
    print(f"features and checkpoints: {workdir} ({size / 2 ** 20:.1f} MiB; delete it when done)")
    return hit, len(top)


def load_model(model, gguf_file=None, dtype="float32", lora_adapter=None, lora_r=0, lora_targets="q_proj,v_proj"):
    """(model, tokenizer) from a directory or hub id (gguf_file for a GGUF checkpoint); trainable parameters: a
    saved peft LoRA adapter, or a fresh LoRA of rank lora_r on lora_targets, or (neither) every parameter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **kw)
    if lora_adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, lora_adapter, is_trainable=True)
    elif lora_r:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                           target_modules=lora_targets.split(",")))
    return lm, tok


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="cli/less.py", description="LESS gradient-feature data selection.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="per-example features of a JSONL file (runs under torchrun unchanged)")
    c.add_argument("--model", required=True, help="model directory or hub id")
    c.add_argument("--gguf-file", help="GGUF file inside --model")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--lora-adapter", help="a saved peft LoRA adapter: its parameters are the gradient's")
    c.add_argument("--lora-r", type=int, default=0, help="else a fresh LoRA of this rank (0: every parameter)")
    c.add_argument("--lora-targets", default="q_proj,v_proj")
    c.add_argument("--data", required=True, help="JSONL: prompt/response or messages records (id optional)")
    c.add_argument("--out", required=True, help="output directory (features.safetensors when done)")
    c.add_argument("--grad-type", default="adam", choices=["adam", "sgd", "sign"])
    c.add_argument("--optimizer-state", help="optimizer.pt (Trainer) or optimizer.bin (FSDP) of the checkpoint")
    c.add_argument("--proj-dim", type=int, default=8192)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--kind", default="rademacher", choices=["rademacher", "sjlt"])
    c.add_argument("--checkpoint", default="", help="a name recorded with the features (e.g. checkpoint-1)")
    c.add_argument("--max-length", type=int, default=2048)
    c.add_argument("--batch-size", type=int, default=8)
    m = sub.add_parser("match", help="scores of train examples against validation examples")
    m.add_argument("--train", nargs="+", required=True, help="train features.safetensors, one per checkpoint")
    m.add_argument("--val", nargs="+", required=True, help="validation features.safetensors, same checkpoints")
    m.add_argument("--weights", nargs="+", type=float, help="checkpoint weights (default: uniform)")
    m.add_argument("--trainer-state", help="or: derive them from this trainer_state.json")
    m.add_argument("--n-subtasks", type=int, default=1)
    m.add_argument("--out", required=True, help="JSONL of {id, score}")
    s = sub.add_parser("select", help="write the top-scoring records, in score order")
    s.add_argument("--scores", nargs="+", required=True, help="JSONL files written by match")
    s.add_argument("--data", nargs="+", required=True, help="the JSONL files the train features came from")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float)
    g.add_argument("--k", type=int)
    s.add_argument("--out", required=True)
    sub.add_parser("demo", help="an offline end-to-end run on a tiny model")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        return demo()
    if a.cmd == "collect":
        if "RANK" in os.environ:  # torchrun
            import torch.distributed as dist

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        model, tok = load_model(a.model, a.gguf_file, a.dtype, a.lora_adapter, a.lora_r, a.lora_targets)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        examples = [encode_example(r, tok, a.max_length) for r in read_jsonl(a.data)]
        path = collect_features(model, examples, a.out, a.grad_type, a.optimizer_state,
                                Projection(a.proj_dim, a.seed, a.kind), a.checkpoint, batch_size=a.batch_size)
        if _world()[0] == 0:
            print(f"{len(examples)} examples -> {path}")
        return
    if a.cmd == "match":
        weights = a.weights or (checkpoint_weights_from_trainer_state(a.trainer_state) if a.trainer_state else None)
        scores, ids = match(a.train, a.val, weights, a.n_subtasks)
        with open(a.out, "w") as f:
            for i, sc in zip(ids, scores.tolist()):
                f.write(json.dumps({"id": i, "score": sc}) + "\n")
        print(f"{len(ids)} scores -> {a.out}")
        return
    ids, scores = [], []
    for path in a.scores:
        for r in read_jsonl(path):
            ids.append(r["id"])
            scores.append(float(r["score"]))
    records = {}
    for path in a.data:
        for r in read_jsonl(path):
            if r["id"] in records:
                raise ValueError(f"sample id {r['id']!r} appears twice in {a.data}")
            records[r["id"]] = r
    missing = [i for i in ids if i not in records]
    if missing:
        raise ValueError(f"{len(missing)} scored ids are in none of {a.data}, e.g. {missing[:3]}")
    top = select_top(torch.tensor(scores, dtype=torch.float64), a.fraction, a.k)
    with open(a.out, "w") as f:
        for i in top.tolist():
            f.write(json.dumps(records[ids[i]]) + "\n")
    print(f"{len(top)} of {len(ids)} records -> {a.out}")


if __name__ == "__main__":
    main()
