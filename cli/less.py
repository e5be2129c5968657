"""Command-line tools for less_ref: warmup, collect, match, select, demo. `python cli/less.py --help`.

Everything here is plumbing around the method in less_ref.py: model loading (a local directory or a GGUF file inside
one: nothing is downloaded; a saved or fresh LoRA), JSONL reading, the commands, and an offline demo on a tiny model.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: less_ref
from cli.common import (Progress, UsageError, check_gguf, distinct, existing, file_sha256, first_line,  # noqa: E402
                        fraction, load_model, load_tokenizer, model_dir, needs_peft, own_dir, parser, phase,
                        plain_model_dir, positive, read_jsonl, run, subparser, whole, writable_dir, writable_file,
                        write_text)
# torch and less_ref are imported where they are used: a mistake on the command line is found before their import


def _task_examples(task, n, g, start_id):
    """'copy': a b c SEP_A -> a b c over tokens 4..35; 'reverse': d e f SEP_B -> f e d over tokens 32..63.
    The two tasks share 4 of their 32 tokens each."""
    import torch
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
    import torch
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(optimizer.state_dict(), os.path.join(ckpt_dir, "optimizer.pt"))
    log = [{"epoch": e + (s + 1) / len(lrs), "learning_rate": lr}
           for e, lrs in enumerate(lrs_per_epoch) for s, lr in enumerate(lrs)]
    with open(os.path.join(ckpt_dir, "trainer_state.json"), "w") as f:
        json.dump({"log_history": log}, f)


def trainer_optimizer(model, lr, weight_decay=0.0):
    """AdamW with a Trainer's two groups (decay params, then no-decay params)."""
    import torch
    from less_ref import trainer_param_order
    order, sizes = trainer_param_order(model)
    named = dict(model.named_parameters())
    return torch.optim.AdamW([{"params": [named[n] for n in order[:sizes[0]]], "weight_decay": weight_decay},
                              {"params": [named[n] for n in order[sizes[0]:]], "weight_decay": 0.0}], lr=lr)


def demo(workdir=None, proj_dim=2048, seed=0):
    """The whole pipeline on a tiny Llama; its files go to workdir, or to a temporary directory removed at the end."""
    import tempfile

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="less_demo_") as tmp:
            return demo(tmp, proj_dim, seed)
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from less_ref import Projection, checkpoint_weights_from_trainer_state, collect_features, match, select_top

    warnings.filterwarnings("ignore", "There is a performance drop")  # torch.func on CPU SDPA: correct, slower
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
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
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
    return hit, len(top)


def train_lora(base, examples, out, epochs=4, lr=2e-5, batch_size=1, grad_accum=32, seed=0, lora_r=128, lora_alpha=512,
               lora_dropout=0.1, lora_targets="q_proj,k_proj,v_proj,o_proj", save=True, resume=False):
    """LESS's training recipe (its base_training_args.sh, the defaults here): a peft LoRA trained by transformers'
    Trainer on encoded examples -- AdamW, linear decay after a 3% warm-up, no weight decay, every step's learning rate
    logged; with save, a Trainer checkpoint per epoch: out/checkpoint-<step>/{adapter_model.safetensors,
    optimizer.pt, trainer_state.json}; resume continues from the last complete one. A checkpoint whose writing
    fails (a full disk) is removed and the error names it. Trains in float32 on the CPU, as the model's dtype on
    CUDA. Progress: a line per ~30 s with steps, rate and ETA, in a log file too. Returns the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class ProgressLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = Progress(state.max_steps, f"warm-up {out}", unit="steps", initial=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    with phase(f"loading the base model {base} for the LoRA warm-up"):
        tok = load_tokenizer(base)
        torch.manual_seed(seed)
        lm = get_peft_model(load_model(base), LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_targets.split(","),
            task_type="CAUSAL_LM"))
    args = TrainingArguments(out, num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="linear",
                             warmup_steps=0.03, weight_decay=0.0, optim="adamw_torch",
                             per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, logging_steps=1, seed=seed, data_seed=seed,
                             save_strategy="epoch" if save else "no", report_to=[], remove_unused_columns=False,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    data = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    trainer = Trainer(model=lm, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                      callbacks=[ProgressLines()])
    before = set(checkpoints(out, complete=False))
    done = checkpoints(out) if resume else []
    try:
        trainer.train(resume_from_checkpoint=done[-1] if done else None)
    except Exception as e:
        partial = [d for d in checkpoints(out, complete=False) if d not in before and d not in checkpoints(out)]
        if not partial:
            raise
        import shutil
        for d in partial:  # made by this run, left without trainer_state.json (the Trainer writes it last)
            shutil.rmtree(d, ignore_errors=True)
        raise OSError(f"{partial[0]}: writing the checkpoint failed ({type(e).__name__}: {str(e)[:200]}); this "
                      f"run's partial checkpoint was removed") from None
    return lm


def checkpoints(out, complete=True):
    """out/checkpoint-<step> directories in step order; complete: only those with trainer_state.json (written last)."""
    if not os.path.isdir(out):
        return []
    found = [d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d)]
    paths = [os.path.join(out, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]
    return [p for p in paths if not complete or os.path.isfile(os.path.join(p, "trainer_state.json"))]


def _warmup_run(a, out):
    """What defines a warm-up run (options, the data file's sha256), checked against out/warmup.json: a directory of
    another run, or of this one without --resume, is refused naming what differs or what is there."""
    run = {k: v for k, v in sorted(vars(a).items()) if k not in ("cmd", "debug", "resume", "out", "data")}
    run["data_sha256"] = file_sha256(a.data)
    if not os.path.isdir(out) or not os.listdir(out):
        return run
    try:
        with open(os.path.join(out, "warmup.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"--out {out} is not empty and holds no readable warmup.json: not a warm-up run's directory; "
                         "give a new --out") from None
    diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
    if diff:
        raise ValueError(f"--out {out} holds another warm-up run "
                         f"({', '.join(f'{k}: {old.get(k)!r} -> {run.get(k)!r}' for k in diff)}); give a new --out")
    if not a.resume:
        done = [os.path.basename(c) for c in checkpoints(out)]
        raise ValueError(f"--out {out} holds this warm-up run already (checkpoints: {', '.join(done) or 'none yet'}): "
                         "pass --resume to continue it, or use its checkpoints as they are")
    return run


def warmup(a):
    """LESS's warm-up: train_lora on a seeded random fraction of the data (LESS: 5%, 4 epochs). Writes
    out/warmup.json (the run), out/warmup.jsonl (the records trained on) and the checkpoints; returns their
    directories in epoch order. Every option and file is checked before the model loads."""
    check_gguf(a.model, a.gguf_file)
    if not 0 <= a.lora_dropout < 1:
        raise UsageError(f"--lora-dropout {a.lora_dropout} must be in [0, 1)")
    existing("--data", a.data)
    distinct({"--model": a.model, "--data": a.data}, {"--out": a.out})
    writable_dir(a.out, "--out")
    needs_peft("warmup (a LoRA)")
    records = read_jsonl(a.data)
    n = round(a.fraction * len(records))
    if not 1 <= n <= len(records):
        raise UsageError(f"--fraction {a.fraction} of {len(records)} records is {n}: choose one that keeps 1 or more")
    run = _warmup_run(a, a.out)
    first_line(f"cli/less.py warmup: {a.epochs} epochs of a LoRA (r {a.lora_r}) on {n} of the {len(records)} records "
               f"of {a.data} -> {a.out}")
    with phase(f"reading the tokenizer of {a.model} and encoding {len(records)} records"):
        import torch

        from less_ref import check_examples, encode_example
        tok = load_tokenizer(a.model, a.gguf_file)
        examples = [encode_example(r, tok, a.max_length) for r in records]
        check_examples(examples, len(tok))
    keep = sorted(torch.randperm(len(records), generator=torch.Generator().manual_seed(a.seed))[:n].tolist())
    os.makedirs(a.out, exist_ok=True)
    write_text(os.path.join(a.out, "warmup.json"), json.dumps(run, indent=1) + "\n")
    write_text(os.path.join(a.out, "warmup.jsonl"), "".join(json.dumps(records[i]) + "\n" for i in keep))
    with phase(f"converting {a.gguf_file} to a plain model directory {a.out}/base-model" if a.gguf_file else
               "checking the base model"):
        base = plain_model_dir(a.model, a.gguf_file, a.out, tok)
    train_lora(base, [examples[i] for i in keep], a.out, a.epochs, a.lr, a.batch_size, a.grad_accum, a.seed, a.lora_r,
               a.lora_alpha, a.lora_dropout, a.lora_targets, resume=a.resume)
    ckpts = checkpoints(a.out)
    print(f"warm-up on {n} of {len(records)} records ({a.out}/warmup.jsonl); base model {base}; checkpoints, one "
          f"per epoch: {', '.join(ckpts)}")
    return ckpts


def _check_collect(a):
    """Every option and file of collect, before the tokenizer and the model load: what needs no torch, the first line,
    then the environment's settings and the optimizer file's format."""
    existing("--data", a.data)
    existing("--optimizer-state", a.optimizer_state)
    existing("--lora-adapter", a.lora_adapter, "directory")
    distinct({"--model": a.model, "--lora-adapter": a.lora_adapter, "--data": a.data,
              "--optimizer-state": a.optimizer_state}, {"--out": a.out})
    own_dir(a.out, "--out", "collect", r"identity\.json|features\.safetensors|shard-\d{3}-of-\d{3}|.+\.tmp\d+",
            "identity.json")
    check_gguf(a.model, a.gguf_file)
    if a.lora_r and a.grad_type == "adam":
        raise UsageError("--lora-r builds a fresh, untrained LoRA, which has no Adam moments: adam features need the "
                         "adapter the optimizer state belongs to (--lora-adapter out/checkpoint-N)")
    if a.lora_r and a.lora_adapter:
        raise UsageError("give --lora-adapter (a trained adapter) or --lora-r (a fresh one), not both")
    if a.grad_type == "adam" and not a.optimizer_state:
        raise UsageError("--grad-type adam needs --optimizer-state (the checkpoint's optimizer.pt or optimizer.bin)")
    if a.grad_type != "adam" and a.optimizer_state:
        raise UsageError(f"--optimizer-state is used by --grad-type adam only, not {a.grad_type}")
    if a.lora_adapter and not os.path.isfile(os.path.join(a.lora_adapter, "adapter_config.json")):
        raise ValueError(f"--lora-adapter {a.lora_adapter}: no adapter_config.json there (a saved peft adapter, e.g. "
                         "out/checkpoint-N of warmup)")
    writable_dir(a.out, "--out")
    if a.lora_r or a.lora_adapter:
        needs_peft("--lora-r" if a.lora_r else "--lora-adapter")
    a.records = read_jsonl(a.data)  # before any model: a bad line is one line, found at once
    first_line(f"cli/less.py collect: {a.grad_type} features of {len(a.records)} records of {a.data} under {a.model} "
               f"-> {a.out}")  # what comes next imports torch (seconds)
    from less_ref import _settings
    _settings()  # the environment's settings too, before the model loads
    if a.optimizer_state:
        import torch
        try:  # mapped, not read: a check of the format, cheap for a large file
            sd = torch.load(a.optimizer_state, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"--optimizer-state {a.optimizer_state}: not a torch optimizer state that loads with "
                             f"weights_only=True ({type(e).__name__}: {str(e)[:120]})") from None
        if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict)):
            raise ValueError(f"--optimizer-state {a.optimizer_state}: not an optimizer state_dict (no 'state' entry)")


def _scores(paths):
    """(ids, scores) of match's JSONL files; a missing or non-numeric score or an id scored twice is an error."""
    ids, scores, where = [], [], {}
    for path in paths:
        for n, r in enumerate(read_jsonl(path, need=("id", "score")), 1):
            score = r["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
                raise ValueError(f"{path}: record {n} (id {r['id']!r}): score {score!r} is not a number")
            if r["id"] in where:
                raise ValueError(f"id {r['id']!r} is scored twice ({where[r['id']]} and {path}): give each scores "
                                 "file once")
            where[r["id"]] = path
            ids.append(r["id"])
            scores.append(float(score))
    return ids, scores


def main(argv=None):
    ap = parser("cli/less.py", "LESS gradient-feature data selection.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = subparser(sub, "warmup", "LESS's warm-up: LoRA on a random fraction of the data, a checkpoint per epoch")
    w.add_argument("--model", required=True, type=model_dir, help="a local model directory")
    w.add_argument("--gguf-file", help="a GGUF checkpoint inside --model: dequantised once into OUT/base-model")
    w.add_argument("--data", required=True, help="JSONL: prompt/response or messages records (id optional)")
    w.add_argument("--out", required=True, help="output directory: checkpoint-<step> per epoch, warmup.jsonl")
    w.add_argument("--fraction", type=fraction, default=0.05, help="the random share of the data trained on")
    w.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete checkpoint")
    w.add_argument("--seed", type=whole(0), default=0, help="seed of the subset, the LoRA init and the data order")
    w.add_argument("--epochs", type=whole(1), default=4, help="epochs (one checkpoint each)")
    w.add_argument("--lr", type=positive, default=2e-5, help="peak learning rate (linear decay, 3%% warm-up)")
    w.add_argument("--batch-size", type=whole(1), default=1, help="examples per device step")
    w.add_argument("--grad-accum", type=whole(1), default=32, help="steps accumulated per optimizer step")
    w.add_argument("--lora-r", type=whole(1), default=128, help="LoRA rank")
    w.add_argument("--lora-alpha", type=positive, default=512, help="LoRA alpha")
    w.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout")
    w.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="modules the LoRA adapts")
    w.add_argument("--max-length", type=whole(2), default=2048, help="tokens per record (longer ones are cut)")
    c = subparser(sub, "collect", "per-example features of a JSONL file (runs under torchrun unchanged)")
    c.add_argument("--model", required=True, type=model_dir, help="a local model directory")
    c.add_argument("--gguf-file", help="a GGUF checkpoint inside --model (read dequantised to float32)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    c.add_argument("--lora-adapter", help="a saved peft LoRA adapter: its parameters are the gradient's")
    c.add_argument("--lora-r", type=whole(0), default=0,
                   help="else a fresh LoRA of this rank, the same in every process (0: every parameter); sgd/sign only")
    c.add_argument("--lora-targets", default="q_proj,v_proj", help="modules a fresh LoRA adapts")
    c.add_argument("--data", required=True, help="JSONL: prompt/response or messages records (id optional)")
    c.add_argument("--out", required=True, help="output directory (features.safetensors when done)")
    c.add_argument("--grad-type", default="adam", choices=["adam", "sgd", "sign"],
                   help="adam for training data (needs --optimizer-state), sgd for validation data")
    c.add_argument("--optimizer-state", help="optimizer.pt (Trainer) or optimizer.bin (FSDP) of the checkpoint")
    c.add_argument("--proj-dim", type=whole(1), default=8192, help="projected dimension k")
    c.add_argument("--seed", type=whole(0), default=0, help="projection seed (train and val must share it)")
    c.add_argument("--kind", default="rademacher", choices=["rademacher", "sjlt"],
                   help="projection: dense Rademacher (the paper's) or sparse JL (train and val must share it)")
    c.add_argument("--checkpoint", default="", help="a name recorded with the features (e.g. checkpoint-1)")
    c.add_argument("--max-length", type=whole(2), default=2048, help="tokens per record (longer ones are cut)")
    c.add_argument("--batch-size", type=whole(1), default=8, help="examples per gradient batch")
    c.add_argument("--loop", action="store_true",
                   help="one backward per example instead of torch.func batches (often faster on a CPU)")
    m = subparser(sub, "match", "scores of train examples against validation examples")
    m.add_argument("--train", nargs="+", action="extend", required=True,
                   help="train features.safetensors, one per checkpoint (repeatable: adds up)")
    m.add_argument("--val", nargs="+", action="extend", required=True,
                   help="validation features.safetensors, same checkpoints (repeatable: adds up)")
    m.add_argument("--weights", nargs="+", action="extend", type=positive,
                   help="checkpoint weights, one per checkpoint (default: uniform; repeatable: adds up)")
    m.add_argument("--trainer-state", help="or: the mean learning rate per epoch from this trainer_state.json")
    m.add_argument("--n-subtasks", type=whole(1), default=1, help="validation subtasks (mean within, max over)")
    m.add_argument("--out", required=True, help="JSONL of {id, score}")
    s = subparser(sub, "select", "write the top-scoring records, in score order")
    s.add_argument("--scores", nargs="+", action="extend", required=True,
                   help="JSONL files written by match (repeatable: adds up)")
    s.add_argument("--data", nargs="+", action="extend", required=True,
                   help="the JSONL files the train features came from (repeatable: adds up)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=fraction, help="the top fraction of all scored records (LESS: 0.05)")
    g.add_argument("--k", type=whole(1), help="or the top k records")
    s.add_argument("--out", required=True, help="JSONL of the selected records")
    subparser(sub, "demo", "an offline end-to-end run on a tiny model")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        first_line("cli/less.py demo: LESS end to end on a tiny Llama, offline (a few seconds)")
        return demo()
    if a.cmd == "warmup":
        return warmup(a)
    if a.cmd == "collect":
        return collect(a)
    if a.cmd == "match":
        if a.weights and a.trainer_state:
            raise UsageError("give --weights or --trainer-state, not both")
        if a.weights and len(a.weights) != len(a.train):
            raise UsageError(f"--weights gives {len(a.weights)} weights for {len(a.train)} checkpoints (--train "
                             "files): give one weight per checkpoint")
        for option in ("--train", "--val", "--trainer-state"):
            existing(option, getattr(a, option[2:].replace("-", "_")))
        distinct({"--train": a.train, "--val": a.val, "--trainer-state": a.trainer_state}, {"--out": a.out})
        writable_file(a.out, "--out")
        first_line(f"cli/less.py match: {len(a.train)} checkpoint(s), train and val features -> {a.out}")
        from less_ref import checkpoint_weights_from_trainer_state, match
        weights = a.weights or (checkpoint_weights_from_trainer_state(a.trainer_state) if a.trainer_state else None)
        scores, ids = match(a.train, a.val, weights, a.n_subtasks)
        write_text(a.out, "".join(json.dumps({"id": i, "score": sc}) + "\n" for i, sc in zip(ids, scores.tolist())))
        print(f"{len(ids)} scores -> {a.out}")
        return
    existing("--scores", a.scores)
    existing("--data", a.data)
    distinct({"--scores": a.scores, "--data": a.data}, {"--out": a.out})
    writable_file(a.out, "--out")
    first_line(f"cli/less.py select: the top {a.k or a.fraction} of the records scored in {', '.join(a.scores)} "
               f"-> {a.out}")
    import torch

    from less_ref import select_top
    ids, scores = _scores(a.scores)
    records = {}
    for path in a.data:
        for r in read_jsonl(path):
            if r["id"] in records:
                raise ValueError(f"{path}: sample id {r['id']!r} is in {records[r['id']][1]} too: give each record "
                                 "once")
            records[r["id"]] = (r, path)
    missing = [i for i in ids if i not in records]
    if missing:
        raise ValueError(f"{len(missing)} scored ids are in none of {a.data}, e.g. {missing[:3]}: the data changed "
                         "since collect, or another file was given")
    k = a.k if a.k is not None else int(a.fraction * len(ids))
    if not 1 <= k <= len(ids):
        raise UsageError(f"{'--k ' + str(a.k) if a.k is not None else '--fraction ' + str(a.fraction)} selects {k} "
                         f"of {len(ids)} scored records: choose between 1 and {len(ids)}")
    top = select_top(torch.tensor(scores, dtype=torch.float64), k=k)
    write_text(a.out, "".join(json.dumps(records[ids[i]][0]) + "\n" for i in top.tolist()))
    print(f"{len(top)} of {len(ids)} records -> {a.out}")


def collect(a):
    """Options and files checked, data read and checked, then the model loaded and the features collected."""
    _check_collect(a)
    import torch

    from less_ref import Projection, check_examples, collect_features, encode_example
    if "RANK" in os.environ:  # torchrun
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    with phase(f"reading the tokenizer of {a.model} and encoding {len(a.records)} records"):  # before the model
        tok = load_tokenizer(a.model, a.gguf_file)
        examples = [encode_example(r, tok, a.max_length) for r in a.records]
        check_examples(examples, len(tok))
    with phase(f"loading the model {a.model}"):
        model = load_model(a.model, a.gguf_file, a.dtype, a.lora_adapter, a.lora_r, a.lora_targets)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    path = collect_features(model, examples, a.out, a.grad_type, a.optimizer_state,
                            Projection(a.proj_dim, a.seed, a.kind), a.checkpoint, batch_size=a.batch_size,
                            vmap=not a.loop)
    if os.environ.get("RANK", "0") == "0":
        print(f"{len(examples)} examples -> {path}")


if __name__ == "__main__":
    run(main)
