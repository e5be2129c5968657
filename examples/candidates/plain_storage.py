"""Feature storage written from SPEC.md L6-L7 alone, with another layout than less_ref's and no checksum: a correct
design that must pass the core tier (SPEC L6.6's verification of edited files is skipped: it declares
STORAGE_CHECKSUM = False). The gradients, projection and scores are less_ref's; the storage is its own:

    out_dir/config.json                      what the collection was computed from (compared on a re-run)
    out_dir/parts/rank-R/part-CCCCC.safetensors   features + "positions" of rank R's examples r, r + W, ...
    out_dir/features.safetensors             the merged rows in dataset order, L2-normalised, ids in the metadata

    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl plain_storage
"""
import hashlib
import json
import os
import re

import torch

from less_ref import Projection, adam_state, check_examples, influence_scores, projected_features  # noqa: F401
from less_ref import example_gradients as _gradients

STORAGE_CHECKSUM = False


def _digest(*parts):
    h = hashlib.sha256()
    for x in parts:
        h.update(x if isinstance(x, bytes) else x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config(model, examples, grad_type, moments, projection, checkpoint, chunk_size, world):
    params = [(n, p) for n, p in model.named_parameters()]
    return {"projection": list(projection), "grad_type": grad_type, "checkpoint": checkpoint, "chunk_size": chunk_size,
            "world": world, "n": len(examples),
            "model": _digest(*(x for n, p in params for x in (f"{n}{tuple(p.shape)}{p.requires_grad}".encode(), p))),
            "data": _digest(json.dumps([[e["id"], list(map(int, e["input_ids"])), list(map(int, e["labels"]))]
                                        for e in examples]).encode()),
            "moments": None if moments is None else _digest(*moments)}


def _world():
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _all_ranks(fn, world):
    """fn() on every rank; an error on any rank is raised on every rank."""
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 -- carried to the other ranks
        out, err = None, e
    if world > 1:
        import torch.distributed as dist
        errors = [None] * world
        dist.all_gather_object(errors, None if err is None else f"{type(err).__name__}: {err}")
        if err is None and any(errors):
            raise ValueError(next(e for e in errors if e))
    if err is not None:
        raise err
    return out


def _save(tensors, meta, path):
    from safetensors.torch import save_file
    tmp = path + ".partial"
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def collect_features(model, examples, out_dir, grad_type="adam", optimizer_state=None, projection=Projection(),
                     checkpoint="", chunk_size=160, batch_size=8):
    rank, world = _world()
    examples = list(examples)
    check_examples(examples)
    if grad_type not in ("sgd", "sign", "adam"):
        raise ValueError(f"unknown grad_type {grad_type!r}")
    moments = adam_state(model, optimizer_state) if grad_type == "adam" else None
    config = _config(model, examples, grad_type, moments, projection, checkpoint, chunk_size, world)
    path = os.path.join(out_dir, "config.json")

    def check_config():
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f) != config:
                    raise ValueError(f"{out_dir} was collected with another configuration")
        elif rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(config, f)

    _all_ranks(check_config, world)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        _all_ranks(check_config, world)
    mine = list(range(rank, len(examples), world))
    part_dir = os.path.join(out_dir, "parts", f"rank-{rank}")
    os.makedirs(part_dir, exist_ok=True)

    def compute():
        for c in range(0, len(mine), chunk_size):
            positions = mine[c:c + chunk_size]
            part = os.path.join(part_dir, f"part-{c // chunk_size:05d}.safetensors")
            if _readable(part, positions):
                continue
            rows = []
            for b in range(0, len(positions), batch_size):
                batch = [examples[i] for i in positions[b:b + batch_size]]
                g = _gradients(model, batch)
                bad = ~torch.isfinite(g).all(1)
                if bad.any():
                    raise ValueError(f"non-finite gradient for {batch[int(bad.nonzero()[0])]['id']!r}")
                rows.append(projected_features(g, grad_type, moments, projection))
            _save({"features": torch.cat(rows).contiguous(), "positions": torch.tensor(positions)}, {}, part)

    _all_ranks(compute, world)
    merged = os.path.join(out_dir, "features.safetensors")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    if rank == 0:
        feats = torch.zeros(len(examples), projection.proj_dim)
        for r in range(world):
            d = os.path.join(out_dir, "parts", f"rank-{r}")
            for name in sorted(os.listdir(d)):
                from safetensors.torch import load_file
                t = load_file(os.path.join(d, name))
                feats[t["positions"]] = t["features"]
        feats = feats / feats.norm(dim=1, keepdim=True)
        _save({"features": feats.contiguous()}, {"ids": [e["id"] for e in examples], "config": config}, merged)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return merged


def _readable(part, positions):
    if not os.path.exists(part):
        return False
    from safetensors.torch import load_file
    try:
        return load_file(part)["positions"].tolist() == positions
    except Exception:  # noqa: BLE001 -- a torn part is recomputed
        return False


def load_features(path, merged=False):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        if "ids" not in meta:
            raise ValueError(f"{path} is not a merged features file")
        x = f.get_tensor("features")
    ident = dict(zip(("proj_dim", "seed", "kind", "s"), meta["config"]["projection"]), **meta["config"])
    return x, meta["ids"], ident


def match(train_paths, val_paths, checkpoint_weights=None, n_subtasks=1):
    if len(train_paths) != len(val_paths) or not train_paths:
        raise ValueError("one train and one val file per checkpoint")
    train, val = [load_features(p) for p in train_paths], [load_features(p) for p in val_paths]
    for (_, _, a), (_, _, b) in zip(train, val):
        if any(a[k] != b[k] for k in ("projection", "checkpoint", "model")):
            raise ValueError("a train and a val file of another projection, checkpoint or model")
        if b["grad_type"] != "sgd":
            raise ValueError("the validation side must be plain gradients (sgd)")
    names = [t[2]["checkpoint"] for t in train]
    states = [(t[2]["model"], t[2]["moments"]) for t in train]
    if len(set(names)) < len(names) or len(set(states)) < len(states):
        raise ValueError("the same checkpoint twice (a name, or one model and optimizer state)")
    steps = [re.search(r"(\d+)$", n) for n in names]
    if all(steps) and [int(m.group(1)) for m in steps] != sorted(int(m.group(1)) for m in steps):
        raise ValueError("the checkpoints are not in epoch order")
    for side in (train, val):
        if any(s[1] != side[0][1] for s in side):
            raise ValueError("the files of one side hold other ids at another checkpoint")
    return influence_scores([t[0] for t in train], [v[0] for v in val], checkpoint_weights, n_subtasks), train[0][1]
