"""LESS reference: gradient-feature data selection (Xia et al., ICML 2024), in plain torch (contract: SPEC.md part L).

Follows the original LESS code (collect_grad_reps.py, matching.py): per-example gradients of the HF causal-LM loss
(response tokens only) over the trainable parameters, Adam-preconditioned with the warm-up checkpoint's moments,

    Gamma = m_hat / sqrt(v_hat + eps),  m_hat = b1 m + (1 - b1) g,  v_hat = b2 v + (1 - b2) g^2

randomly projected to proj_dim, L2-normalised, and matched against validation gradients:

    score(z') = max_subtask mean_{z in subtask} sum_i eta_i cos(P grad l(z; theta_i), P Gamma(z', theta_i))

Unlike the original, the projection P is a pure function of (seed, row, column) -- identical for every block size,
batch split and device -- and every stored feature row stays tied to its sample id by a checksum.

Reading order: 1. the method -- less_scores, then its parts as it uses them (projection, gradients, Adam features,
scores), each fast path right after its plain form; 2. machinery (collect, merge, match, select_step first; then
ranks, resume, optimizer files, storage); 3. data preparation; 4. input checks. Tools: cli/less.py. Needs torch alone.
Precision: all arithmetic is float32 whatever the input dtype; features and scores are float32.
"""
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from typing import NamedTuple

import torch


# ============================================================================
# 1. The method, each fast path right after the plain form it must equal (up to float32 summation order)
def less_scores(model, checkpoints, train, val, projection=None, n_subtasks=1, plain=False):
    """The whole method in memory, float32 (N,): per warm-up checkpoint (weights: a state_dict of every trainable
    parameter or None, (exp_avg, exp_avg_sq) (D,) as adam_state lays them, eta), Adam features of train and SGD
    gradients of val, projected (default Projection()), eta-weighted cosine, mean per subtask, max over subtasks;
    plain=True: the definitions (a backward per example, R whole). The model's weights and mode are restored."""
    projection = projection or Projection()
    _check_model_inputs(model, train, val)
    t_feats, v_feats, saved, was_training = [], [], {}, model.training  # per checkpoint: (N, k), (M, k)
    try:
        for i, (weights, moments, _) in enumerate(checkpoints):
            if weights is not None:
                _check_weights(model, weights, i)
                saved.update({k: v.clone() for k, v in model.state_dict().items() if k in weights and k not in saved})
                model.load_state_dict(weights, strict=False)
            grads = example_gradients(model, train, vmap=not plain, check=False)  # (N, D)
            _check_moments(moments, grads.shape[1:], f"checkpoint {i}")
            t_feats.append(projection(adam_features(grads, *moments), plain=plain))  # (N, k)
            v_feats.append(projection(example_gradients(model, val, not plain, False), plain=plain))  # (M, k): SGD
    finally:
        model.load_state_dict(saved, strict=False)
        model.train(was_training)
    return influence_scores(t_feats, v_feats, [eta for *_, eta in checkpoints], n_subtasks)  # (N,)


# --- the random projection: R's entries from a per-entry rule, y = x @ R / scale
PROJECTION = "rademacher-fmix32-v1"
PROJECTION_KINDS = {"rademacher": PROJECTION, "sjlt": "sjlt-fmix32-v1"}
SJLT_S = 4  # sjlt's nonzeros per input coordinate (projection_matrix); s = 4 matches the dense kind (RESULTS.md)


class Projection(NamedTuple):
    """What defines R, one value; feature files record its identity (other identities are never matched). (x,
    row_offset) -> project(x, ..., row_offset); plain=True: project_plain; check=False: arguments already checked."""
    proj_dim: int = 8192
    seed: int = 0
    kind: str = "rademacher"
    s: int = SJLT_S

    def __call__(self, x, row_offset=0, plain=False, check=True):
        args = x, self.proj_dim, self.seed, row_offset, self.kind, self.s
        return project_plain(*args) if plain else project(*args, check=check)

    def identity(self, grad_dim):
        return {"projection": PROJECTION_KINDS[self.kind], "grad_dim": grad_dim, "proj_dim": self.proj_dim,
                "seed": self.seed, **({"sjlt_s": self.s} if self.kind == "sjlt" else {})}


def project_plain(x, proj_dim, seed=0, row_offset=0, kind="rademacher", s=SJLT_S):
    """y = x @ R[row_offset : row_offset + D] / scale, float32 (N, proj_dim) for x (N, D) or (D,): the definition,
    R whole in memory. project, below, computes the same block by block, for any D."""
    y = x.float().reshape(-1, x.shape[-1]) @ projection_matrix(x.shape[-1], proj_dim, seed, row_offset, kind, s)
    return y[0] if x.dim() == 1 else y  # (N, k) or (k,)


def projection_matrix(nrows, proj_dim, seed=0, row_offset=0, kind="rademacher", s=SJLT_S):
    """Rows [row_offset, row_offset + nrows) of R / scale, float32 (nrows, proj_dim), from the per-entry rule.
    'rademacher': sign (i, j) is bit j % 32 of the word _words(i * W + j // 32), W = ceil(k / 32) (bit 1 -> -1),
    scale sqrt(k). 'sjlt' (Kane & Nelson's blocks): row i has s nonzeros, one in each column block t = 0..s-1
    (columns [t k / s, (t + 1) k / s)): the word w = _words(i * s + t) of its own seed stream places it at column
    t k / s + (w >> 1) mod (block width), sign from bit 0 of w, scale sqrt(s). The definition (project: fast path)."""
    _check_projection_args(proj_dim, seed, kind, s, rows=(row_offset, nrows))
    if kind == "sjlt":
        cols, signs = _sjlt_rows(seed, row_offset, nrows, proj_dim, s)  # (nrows, s) each
        return torch.zeros(nrows, proj_dim).scatter_(1, cols, signs / math.sqrt(s))  # (nrows, k)
    rows = torch.arange(row_offset, row_offset + nrows, dtype=torch.int64)[:, None]  # (nrows, 1)
    j = torch.arange(proj_dim, dtype=torch.int64)  # (k,)
    words = _words(rows * ((proj_dim + 31) // 32) + j // 32, *_seeds(seed, 0))  # (nrows, k)
    return (1 - 2 * ((words >> (j % 32)) & 1)).float() / math.sqrt(proj_dim)  # (nrows, k)


def _sjlt_rows(seed, row0, nrows, proj_dim, s, device="cpu"):
    """sjlt's rows [row0, row0 + nrows) as (columns, signs), (nrows, s) each, on a device (projection_matrix's rule)."""
    rows = torch.arange(row0, row0 + nrows, dtype=torch.int64, device=device)  # (nrows,)
    t = torch.arange(s, dtype=torch.int64, device=device)  # (s,)
    start = t * proj_dim // s  # (s,) block t: columns [t k / s, (t + 1) k / s)
    words = _words(rows[:, None] * s + t, *_seeds(seed, 0x51A7))  # (nrows, s)
    return start + (words >> 1) % ((t + 1) * proj_dim // s - start), (1 - 2 * (words & 1)).float()  # (n, s)


def _words(counter, s1, s2):
    """32 random bits per int64 counter c = hi * 2^32 + lo: fmix32(fmix32(lo ^ s1) ^ hi ^ s2). Distinct counters are
    distinct hash inputs for every c < 2^63 (nothing is dropped from the counter)."""
    h = _fmix32((counter & 0xFFFFFFFF) ^ s1)
    h ^= counter >> 32
    h ^= s2
    return _fmix32(h)


def _fmix32(h):
    """murmur3's 32-bit finaliser, a bijection of [0, 2^32) with full avalanche; ints or int64 tensors (in place)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def _mul32(h, c):
    """(h * c) mod 2^32 for 0 <= h, c < 2^32, split so that int64 never overflows (CPU == CUDA, bit for bit)."""
    high = h * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    h = h * (c & 0xFFFF)
    h += high
    h &= 0xFFFFFFFF
    return h


def _seeds(seed, salt):
    return _fmix32(seed ^ 0x9E3779B9 ^ salt), _fmix32(seed ^ 0x7F4A7C15 ^ salt)


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher", s=SJLT_S, block_rows=None, check=True):
    """project_plain's y = x @ R[row_offset : row_offset + D] / scale, float32 (N, proj_dim), R made block_rows rows
    at a time on x's device, never whole: 'rademacher' (the paper's) by addmm, 'sjlt' (an option, as in dattri) by
    adding each x_i with its s signs into its s columns (index_add_, O(D s) per example; s = 4 matches the dense
    kind's distortion, RESULTS.md). row_offset: x is rows [row_offset, row_offset + D) of a gradient, so slices
    (layers, FSDP shards) project alone and sum to the whole. Equal up to float32 summation order for any block,
    batch, slice, device. Floor: the product; a 64 MiB block of R costs 0.25x normal_, 6x fill_ (bench.py rgen)."""
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be (N, D) or (D,), got shape {tuple(x.shape)}")
    squeeze, (N, D) = x.dim() == 1, x.reshape(-1, x.shape[-1]).shape
    x = x[None] if squeeze else x  # (N, D)
    if check:
        _check_projection_args(proj_dim, seed, kind, s, block_rows, rows=(row_offset, D))
    out = torch.zeros(N, proj_dim, device=x.device, dtype=torch.float32)  # (N, k)
    if kind == "rademacher":
        block_rows = block_rows or max(1, 2 ** 24 // proj_dim)  # 64 MiB of R a block
        R = torch.empty(min(block_rows, D), 32 * ((proj_dim + 31) // 32), device=x.device)  # one buffer for every block
        for r0 in range(0, D, block_rows):
            nr = min(block_rows, D - r0)
            R_block = _rademacher_rows(seed, row_offset + r0, nr, proj_dim, x.device, R[:nr])[:, :proj_dim]  # (nr, k)
            out.addmm_(x[:, r0:r0 + nr].float(), R_block)
        return (out[0] if squeeze else out).div_(math.sqrt(proj_dim))  # (N, k) or (k,)
    out_t = out.T  # (k, N) view: index_add_ adds whole rows of N contiguous values
    block_rows = block_rows or max(1, 2 ** 22 // (s * max(N, 1)))
    for r0 in range(0, D, block_rows):
        nr = min(block_rows, D - r0)
        cols, signs = _sjlt_rows(seed, row_offset + r0, nr, proj_dim, s, x.device)  # (nr, s) each, on x's device
        xt = x[:, r0:r0 + nr].T.float()  # (nr, N)
        out_t.index_add_(0, cols.reshape(-1), (xt[:, None, :] * signs[..., None]).reshape(-1, N))  # (nr s, N) added
    return (out[0] if squeeze else out).div_(math.sqrt(s))  # (N, k) or (k,)


def _rademacher_rows(seed, row0, nrows, proj_dim, device="cpu", out=None):
    """projection_matrix's dense rows [row0, row0 + nrows) * sqrt(k), float32 (nrows, 32 W), on a device, into out if
    given (a reused buffer: fresh memory costs more than R): each word spread into 32 signs by a byte lookup table."""
    W = (proj_dim + 31) // 32
    counter = torch.arange(nrows * W, device=device, dtype=torch.int64).add_(row0 * W)  # (n W,): row * W + j
    byte = _words(counter, *_seeds(seed, 0))[:, None] >> torch.arange(0, 32, 8, device=device)  # (n W, 4)
    byte &= 0xFF  # bits 8b .. 8b + 7 of each word: columns 32 j + 8 b .. 32 j + 8 b + 7
    table = 1 - 2 * ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).float()
    out = torch.empty(nrows, 32 * W, device=device) if out is None else out  # (nrows, 32 W)
    return torch.index_select(table, 0, byte.reshape(-1), out=out.view(-1, 8)).view(nrows, 32 * W)


# --- per-example gradients
def example_gradients(model, examples, vmap=True, check=True):
    """(B, D) float32 gradients of the HF causal-LM loss (mean CE over labels != -100) per example ({'id', 'input_ids',
    'labels'}) over trainable_parameters(model), in eval mode (dropout must not change features). vmap=False: the
    definition, a backward per example; vmap=True: the batched fast path right below. check=False: checked already."""
    if check:
        _check_model_inputs(model, examples)
    params = trainable_parameters(model)  # [(name, param)]: the gradient's layout
    model.eval()
    if vmap:
        return _vmap_gradients(model, examples, params)
    rows, dev = [], params[0][1].device
    for ex in examples:
        ids, labels = _as_long(ex["input_ids"])[None].to(dev), _as_long(ex["labels"])[None].to(dev)  # (1, T) each
        loss = model(input_ids=ids, labels=labels).loss  # scalar
        rows.append(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(loss, [p for _, p in params])]))
    return torch.stack(rows)  # (B, D)


def trainable_parameters(model):
    """[(name, param)] with requires_grad, in named_parameters() order: the gradient vector's layout."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _vmap_gradients(model, examples, params):
    """example_gradients with torch.func over a right-padded batch, padding labelled -100 and no attention mask:
    causal attention never lets a real token see the padding after it, so each row equals the loop up to rounding."""
    from torch.func import functional_call, grad, vmap
    from torch.nn.utils.rnn import pad_sequence
    dev = params[0][1].device  # right padding: ids 0, labels -100
    ids = pad_sequence([_as_long(ex["input_ids"]) for ex in examples], batch_first=True).to(dev)  # (B, T)
    labels = pad_sequence([_as_long(ex["labels"]) for ex in examples], batch_first=True, padding_value=-100).to(dev)
    loss_fn = lambda p, i, lab: functional_call(model, p, (), {"input_ids": i[None], "labels": lab[None]}).loss  # noqa
    g = vmap(grad(loss_fn), in_dims=(None, 0, 0))({n: p.detach() for n, p in params}, ids, labels)  # {name: (B, ...)}
    return torch.cat([g[n].reshape(len(examples), -1).float() for n, _ in params], 1)  # (B, D)


def _as_long(x):
    return torch.as_tensor(x, dtype=torch.long)


# --- gradient features
def adam_features(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=1e-8, eps_outside=False):
    """Gamma = m_hat / sqrt(v_hat + eps) (LESS: eps INSIDE the root, no bias correction, no lr), float32, grad (D,) or
    (N, D) in any float dtype, moments (D,). eps_outside=True: DataFlex's m_hat / (sqrt(v_hat) + eps), on request."""
    _check_moments((exp_avg, exp_avg_sq), grad.shape[-1:], f"adam_features of a {tuple(grad.shape)} gradient")
    g, m, v = grad.float(), exp_avg.float(), exp_avg_sq.float()  # (N, D), (D,), (D,)
    m_hat = beta1 * m + (1 - beta1) * g  # (N, D)
    v_hat = beta2 * v + (1 - beta2) * g * g  # (N, D)
    return m_hat / (v_hat.sqrt() + eps) if eps_outside else m_hat / torch.sqrt(v_hat + eps)  # (N, D)


# --- matching and selection
def influence_scores(train, val, checkpoint_weights=None, n_subtasks=1):
    """score_n = max_s mean_{m in subtask s} sum_i eta_i <t_in / |t_in|, v_im / |v_im|>, float32 (N,); train, val:
    (N, k) / (M, k), or a list of them per checkpoint; eta (default uniform) sums to 1; subtasks: contiguous, equal."""
    train, val = ([x] if torch.is_tensor(x) else list(x) for x in (train, val))
    eta = torch.as_tensor([1.0] * len(train) if checkpoint_weights is None else checkpoint_weights, dtype=torch.float64)
    _check_influence_inputs(train, val, eta, n_subtasks)
    sim = sum((eta[i] / eta.sum()).item() * (_normalise_rows(t, f"checkpoint {i} train") @ _normalise_rows(
        v, f"checkpoint {i} val").T) for i, (t, v) in enumerate(zip(train, val)))  # (N, M): sum_i eta_i cos(t, v)
    return sim.reshape(sim.shape[0], n_subtasks, -1).mean(-1).amax(-1)  # (N, S, M / S) -> (N,)


def _normalise_rows(x, what):
    """x / |x| per row in float32, divided by the row's max |entry| first so that norms of rows with 1e20 or
    1e-30 entries neither overflow nor underflow. A zero or non-finite row is an error naming it."""
    x = x.float()  # (N, k)
    bad, zero = ~torch.isfinite(x).all(-1), (x == 0).all(-1)  # (N,) each
    if bad.any() or zero.any():
        i = (bad | zero).nonzero()[0].item()
        raise ValueError(f"{what} row {i} " + ("has a non-finite entry" if bad[i] else "is all zeros: no direction"))
    x = x / x.abs().amax(-1, keepdim=True)  # (N, k), max |entry| 1
    return x / x.norm(dim=-1, keepdim=True)  # (N, k), unit rows


def select_top(scores, fraction=None, k=None):
    """Indices of the k highest scores, descending, ties by position; k = int(fraction * N) as in LESS."""
    _check_selection(scores, fraction, k)
    k = int(fraction * scores.shape[0]) if fraction is not None else k  # LESS: int(fraction * N), rounded down
    return torch.sort(scores, descending=True, stable=True).indices[:k]  # (k,)


# ============================================================================
# 2. Machinery: the entry points (collect, merge, match, DataFlex's select_step) first, then what they use
def collect_features(model, examples, out_dir, grad_type="adam", optimizer_state=None, projection=Projection(),
                     checkpoint="", chunk_size=160, batch_size=8, vmap=True):
    """Projected features of examples as atomic chunk files of chunk_size rows (a buffer's when it is projected),
    merged by rank 0 into out_dir/features.safetensors (returned); under torchrun rank r takes its DistributedSampler
    shard. A re-run resumes; another configuration is refused naming the field; errors name the id, stop every rank."""
    rank, world = _world()
    examples = list(examples)

    def prepare():
        if grad_type not in ("sgd", "sign", "adam"):
            raise ValueError(f"grad_type must be 'sgd', 'sign' or 'adam', got {grad_type!r}")
        _whole("chunk_size", chunk_size), _whole("batch_size", batch_size), _check_projection_args(*projection)
        _settings()
        _check_model_inputs(model, examples)
        adam = adam_state(model, optimizer_state) if grad_type == "adam" else None
        data = _sha([e["id"], _as_long(e["input_ids"]).tolist(), _as_long(e["labels"]).tolist()]
                    for e in examples)  # ids, tokens and labels, in order
        identity = dict(projection.identity(sum(p.numel() for _, p in trainable_parameters(model))),
                        grad_type=grad_type, checkpoint=str(checkpoint), model=model_fingerprint(model),
                        n_examples=len(examples), data=data, chunk_size=chunk_size, world_size=world,
                        ids=_sha([[e["id"] for e in examples]]), optimizer=None if adam is None else _sha(adam))
        return identity, adam

    identity, adam = _sync(rank, world, prepare)  # nothing is written before every argument is checked
    _sync(rank, world, lambda: rank == 0 and _check_identity(out_dir, identity))  # rank 0 writes or checks it
    _sync(rank, world, lambda: rank and _check_identity(out_dir, identity))  # then the other ranks check theirs
    merged = os.path.join(out_dir, "features.safetensors")
    if _sync(rank, world, lambda: _holds(merged, identity)):  # a finished run: nothing to compute or write
        return merged
    positions = shard_positions(len(examples), rank, world)
    chunks = [positions[i:i + chunk_size] for i in range(0, len(positions), chunk_size)]
    shard, paths = _chunk_paths(out_dir, rank, world, len(chunks))
    os.makedirs(shard, exist_ok=True)
    for f in [f for f in os.listdir(shard) if ".tmp" in f]:  # temp files of writes killed half-way
        os.remove(os.path.join(shard, f))
    for c, path in enumerate(paths):  # chunks of an earlier run: kept if whole and ours, else recomputed
        if os.path.exists(path) and not _holds(path, identity, chunks[c]):
            warnings.warn(f"{path}: truncated, changed or of another configuration; recomputing it")
            os.remove(path)
    todo = [c for c, path in enumerate(paths) if not os.path.exists(path)]

    def compute():  # each buffer's chunks written as soon as it is projected (_features)
        done = len(positions) - sum(len(chunks[c]) for c in todo)
        with Progress(len(positions), f"rank {rank}: {grad_type} features {checkpoint}".rstrip(), initial=done,
                      written=done) as bar:
            pending = iter(todo)
            for x in _features(model, [examples[i] for c in todo for i in chunks[c]], [len(chunks[c]) for c in todo],
                               grad_type, adam, projection, batch_size, bar, vmap):  # (rows of whole chunks, k)
                while len(x):
                    c = next(pending)
                    _write_atomic({"features": x[:len(chunks[c])].cpu(), "positions": torch.tensor(chunks[c])},
                                  {"ids": [examples[i]["id"] for i in chunks[c]], "identity": identity}, paths[c])
                    x, bar.written = x[len(chunks[c]):], bar.written + len(chunks[c])

    _sync(rank, world, compute)
    _sync(rank, world, lambda: rank == 0 and merge_features(out_dir))
    return merged


def merge_features(out_dir):
    """(features, ids, identity): every shard's rows in dataset order, padding repeats dropped, L2-normalised, written
    to features.safetensors. Refuses a missing rank or chunk, a foreign chunk, two rows for an id, foreign ids."""
    with open(os.path.join(out_dir, "identity.json")) as f:
        identity = json.load(f)
    n, world, size = identity["n_examples"], identity["world_size"], identity["chunk_size"]
    feats, ids, filled = torch.zeros(n, identity["proj_dim"]), [None] * n, torch.zeros(n, dtype=torch.bool)
    for rank in range(world):
        positions = shard_positions(n, rank, world)
        shard, paths = _chunk_paths(out_dir, rank, world, -(-len(positions) // size))
        if not os.path.isdir(shard):
            raise ValueError(f"{out_dir}: rank {rank} of {world} wrote nothing ({shard} is missing)")
        for path, start in zip(paths, range(0, len(positions), size)):
            if not os.path.exists(path):
                raise ValueError(f"{out_dir}: rank {rank} has not finished (no {os.path.basename(path)}); resume it")
            tensors, meta = _read_features(path)
            x, chunk_ids, pos = tensors["features"], meta["ids"], tensors["positions"]  # (c, k), c, (c,)
            if meta["identity"] != identity:
                raise ValueError(f"{path} was written by another configuration than {out_dir}/identity.json")
            if pos.tolist() != positions[start:start + size]:
                raise ValueError(f"{path} holds positions {pos[:5].tolist()}..., not rank {rank}'s shard")
            again = filled[pos]  # (c,) padding repeats of another rank's rows (DistributedSampler)
            for j, i in zip(again.nonzero()[:, 0].tolist(), pos[again].tolist()):
                if chunk_ids[j] != ids[i] or not torch.allclose(x[j] / x[j].norm(), feats[i] / feats[i].norm(),
                                                                atol=1e-4):
                    raise ValueError(f"{out_dir}: two different rows for sample id {chunk_ids[j]!r} (position {i})")
            feats[pos[~again]], filled[pos] = x[~again], True
            for i, sid in zip(pos.tolist(), chunk_ids):  # a repeat's id is its first row's (checked above)
                ids[i] = sid
    if _sha([ids]) != identity["ids"]:
        raise ValueError(f"{out_dir}: the chunks' ids in dataset order are not the ids the collection was given")
    feats = _normalise_rows(feats, f"{out_dir} feature")
    _write_atomic({"features": feats.contiguous()}, {"ids": ids, "identity": identity},
                  os.path.join(out_dir, "features.safetensors"))
    return feats, ids, identity


def match(train_paths, val_paths, checkpoint_weights=None, n_subtasks=1):
    """(influence_scores, train ids) of merged feature files, a train and a val file per checkpoint in epoch order,
    after checking that each pair shares projection, checkpoint and model, val is sgd, no checkpoint comes twice or
    out of order (names ending in their step), and the train (val) files hold the same ids at every checkpoint."""
    train_paths, val_paths = [str(p) for p in train_paths], [str(p) for p in val_paths]
    if len(train_paths) != len(val_paths) or not train_paths:
        raise ValueError(f"need one train and one val file per checkpoint, got {len(train_paths)} and {len(val_paths)}")
    train, val = ([load_features(p, merged=True) for p in paths] for paths in (train_paths, val_paths))
    per_file = {"grad_type", "data", "ids", "n_examples", "chunk_size", "world_size", "optimizer"}
    for tp, vp, (_, _, ti), (_, _, vi) in zip(train_paths, val_paths, train, val):
        for key in sorted((set(ti) | set(vi)) - per_file):
            if ti.get(key) != vi.get(key):
                raise ValueError(f"{tp} and {vp} are incompatible: {key} is {ti.get(key)!r} vs {vi.get(key)!r}")
        if vi["grad_type"] != "sgd":
            raise ValueError(f"{vp} holds {vi['grad_type']} features: LESS's validation side is sgd (plain gradients)")
    _check_checkpoint_order(train_paths, [t[2] for t in train])
    for paths, side, why in ((train_paths, train, ""), (val_paths, val, ": the mean over subtasks needs the same "
                                                        "validation examples in the same order")):
        a = side[0][1]
        for path, (_, b, _) in zip(paths[1:], side[1:]):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if a != b:
                raise ValueError(f"{path} holds other examples than {paths[0]} (first difference at position {i}: "
                                 f"{b[i] if i < len(b) else '(none)'!r} vs {a[i] if i < len(a) else '(none)'!r}){why}")
    return influence_scores([t[0] for t in train], [v[0] for v in val], checkpoint_weights, n_subtasks), train[0][1]


# --- dynamic selection during training (DataFlex: re-select total_train_batch_size * update_step every update_step)
def select_step(model, optimizer, pool, val, n_select, projection=Projection(), batch_size=8, vmap=True,
                eps_outside=True):
    """Indices (descending score) of the n_select pool examples whose Adam features (live moments, current weights,
    DataFlex's eps outside the root unless eps_outside=False) best match the validation gradients on average. Train/eval
    mode is restored; under torchrun rank r scores pool[r::world]."""
    rank, world = _world()
    _whole("n_select", n_select, 0)
    _check_model_inputs(model, pool, val)
    adam = adam_state(model, optimizer)
    was_training, mine = model.training, list(range(rank, len(pool), world))
    feats = lambda ex, bar, *a: torch.cat([torch.zeros(0, projection.proj_dim), *_features(  # noqa: E731
        model, ex, None, *a, projection, batch_size, bar, vmap, eps_outside)])  # (n, k)

    def local():  # this rank's (positions, scores), inside _sync: an error on one rank stops every rank
        try:
            with Progress(len(val) + len(mine), f"rank {rank}: select_step") as bar:
                v, t = feats(val, bar, "sgd", None), feats([pool[i] for i in mine], bar, "adam", adam)  # (M/n, k)
            return mine, influence_scores(t, v).cpu() if mine else []
        finally:
            model.train(was_training)
    scores = torch.full((len(pool),), float("nan"))
    for idx, sc in _sync(rank, world, local, gather=True):
        scores[idx] = torch.as_tensor(sc)
    return select_top(scores, k=n_select)  # the same scores on every rank: the same choice


# --- ranks (torchrun), shards, one configuration per directory, resume; progress lines a log file shows
def _world():
    """(rank, world size) under an initialised torch.distributed process group (torchrun), else (0, 1)."""
    import torch.distributed as dist
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def _sync(rank, world, fn, gather=False):
    """fn() on every rank, then every rank learns whether any failed (none waits at a collective for a timeout): the
    failing rank re-raises its error, the others a ValueError naming it. gather: every rank's result, in rank order."""
    if world == 1:
        return [fn()] if gather else fn()
    try:
        out, error = fn(), None
    except Exception as e:
        out, error = None, e
    import torch.distributed as dist
    got = [None] * world
    dist.all_gather_object(got, (f"{type(error).__name__}: {error}" if error else None, out if gather else None))
    if error is not None:
        raise error
    failed = [(r, e) for r, (e, _) in enumerate(got) if e]
    if failed:
        raise ValueError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return [o for _, o in got] if gather else out


def shard_positions(n, rank, world):
    """DistributedSampler's split (shuffle=False): rank r takes r, r + world, ... of the positions padded to a
    multiple of world by repeats from the start (the merge drops them)."""
    return [i % n for i in range(rank, -(-n // world) * world, world)]


def _chunk_paths(out_dir, rank, world, n_chunks):
    """out_dir/shard-RRR-of-WWW and its chunk files chunk_CCCCCC.safetensors (only rank RRR writes there)."""
    shard = os.path.join(out_dir, f"shard-{rank:03d}-of-{world:03d}")
    return shard, [os.path.join(shard, f"chunk_{c:06d}.safetensors") for c in range(n_chunks)]


def _check_identity(out_dir, identity):
    """Write out_dir/identity.json in a new out_dir; in an old one, refuse another identity naming the change."""
    id_path = os.path.join(out_dir, "identity.json")
    if not os.path.exists(id_path):
        os.makedirs(out_dir, exist_ok=True)
        with open(f"{id_path}.tmp{os.getpid()}", "w") as f:
            json.dump(identity, f)
        try:  # atomic and exclusive: a file another run created first (FileExistsError) is compared below
            os.link(f.name, id_path)
        except OSError as e:  # else a filesystem without hard links: atomic, not exclusive
            _ = isinstance(e, FileExistsError) or os.replace(f.name, id_path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f.name)
    try:
        with open(id_path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{id_path}: unreadable ({e}): not an identity.json that collect finished writing; "
                         "collect into a new directory") from None
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        raise ValueError(f"{out_dir} holds features of another configuration "
                         f"({', '.join(f'{k}: {old.get(k)!r} -> {identity.get(k)!r}' for k in diff)}); "
                         "collect into a new directory")


def _holds(path, identity, positions=None):
    """True if path is a readable, unchanged feature file of this identity (and these dataset positions)."""
    try:
        tensors, meta = _read_features(path)
        return meta["identity"] == identity and (positions is None or tensors["positions"].tolist() == positions)
    except (ValueError, KeyError):
        return False


class Progress:
    """Lines on stderr (a log file shows them as a terminal does) on a timer (PROGRESS_SECONDS, default 30; 0: each
    update), at the first update and at the end: 'desc: done/total unit (pct)[, n written], rate over ~10 lines, ETA'
    or how long since one finished (never '?'); a with block (or close()) stops the timer with the work, errors too."""

    def __init__(self, total, desc, unit="records", initial=0, written=None):
        import threading
        self.total, self.desc, self.unit, self.done, self.written = total, desc, unit, initial, written
        self.start = self.last = time.time()  # last: when one last finished
        self.marks, self.stop = [(self.start, initial)], threading.Event()
        self.every = _env("PROGRESS_SECONDS", PROGRESS_SECONDS, 0)  # its own setting only: MinP+'s tools use it too
        if self.every > 0:  # a line each time the wait ends without close()
            threading.Thread(target=lambda: [self._line() for _ in iter(lambda: self.stop.wait(self.every), True)],
                             daemon=True).start()

    def _line(self):
        now, (then, done_then) = time.time(), self.marks[0]
        self.marks = (self.marks + [(now, self.done)])[-10:]
        rate, hms = (self.done - done_then) / max(now - then, 1e-9), lambda t: f"{int(t) // 60}m{int(t) % 60:02d}s"
        eta = "done" if self.done >= self.total else f"ETA {hms((self.total - self.done) / rate)}" if rate > 0 \
            else f"none finished in the last {hms(now - self.last)}"  # hung and slow look different
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
              f"{'' if self.written is None else f', {self.written} written'}, {rate:.2f} {self.unit}/s, {eta}",
              file=sys.stderr, flush=True)

    def update(self, n=1):
        self.done, self.last = self.done + n, time.time()
        if len(self.marks) == 1 or self.every <= 0 or self.done >= (self.total or 0):
            self._line()

    def close(self):  # the timer stops; a last line says what is on disk where the caller counts it (returns None)
        _ = self.stop.set() or self.written is None or self._line()
    __enter__, __exit__ = (lambda self: self), (lambda self, *exc: self.close())


# --- optimizer state: FSDP name-keyed optimizer.bin, Trainer index-keyed optimizer.pt, live optimizer; eta
def adam_state(model, source, param_order=None):
    """(exp_avg, exp_avg_sq), float32 (D,) each in gradient layout, from a live torch.optim optimizer, an optimizer.bin
    (keyed by NAME: FSDP) or an optimizer.pt (keyed by INDEX: a Trainer's decay group first, or param_order)."""
    params = trainable_parameters(model)
    if isinstance(source, torch.optim.Optimizer):
        by_name = {n: source.state.get(p) for n, p in params}
    elif source is None:
        raise ValueError("grad_type 'adam' needs the checkpoint's optimizer state (optimizer.pt / .bin, or live)")
    else:
        by_name = _state_by_name(source, model, param_order)
    moments = []
    for n, p in params:
        s = by_name.get(n) or {}
        if "exp_avg" not in s or "exp_avg_sq" not in s:
            raise ValueError(f"optimizer state has no exp_avg/exp_avg_sq for parameter {n!r}")
        _check_moments((s["exp_avg"], s["exp_avg_sq"]), p.shape, f"optimizer state for parameter {n!r}")
        moments.append([s[k].reshape(-1).float().to(p.device) for k in ("exp_avg", "exp_avg_sq")])
    return tuple(torch.cat(m) for m in zip(*moments))


def _state_by_name(source, model, param_order):
    """{parameter name: its state} from an optimizer.bin / optimizer.pt file."""
    try:
        sd = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # a safetensors file, a pickle with code, a truncated file
        raise ValueError(f"{source}: not a torch optimizer state_dict that loads with weights_only=True "
                         f"({type(e).__name__}: {(str(e).splitlines() or ['empty or truncated'])[0][:200]})") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
        keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{source}: not an optimizer state_dict (no 'state' entry; found {keys}); "
                         "a model state_dict or another file was given as optimizer state")
    state = sd["state"]
    if all(isinstance(k, str) for k in state):  # keyed by name (FSDP / accelerate)
        strip = lambda n: re.sub(r"_fsdp_wrapped_module\.|_orig_mod\.|module\.", "", n)  # noqa: E731
        stripped = {strip(k): v for k, v in state.items()}
        return {n: state.get(n, stripped.get(strip(n))) for n, _ in trainable_parameters(model)}
    sizes = [len(g["params"]) for g in sd["param_groups"]]
    if param_order is None:  # keyed by index in param_groups order: a Trainer's decay group first
        param_order, trainer_sizes = trainer_param_order(model)
        if [s for s in sizes if s] != [s for s in trainer_sizes if s]:
            raise ValueError(f"{source}: param_groups sizes {sizes} do not match a Trainer's decay/no-decay grouping "
                             f"of this model's trainable parameters {trainer_sizes}; pass param_order")
    unknown = set(param_order) - set(dict(trainable_parameters(model)))
    if unknown:
        raise ValueError(f"param_order names {sorted(unknown)[:3]}, not trainable parameters of the model")
    index = [i for g in sd["param_groups"] for i in g["params"]]
    if len(index) != len(param_order):
        raise ValueError(f"{source}: {len(index)} parameters in param_groups, {len(param_order)} names in param_order")
    return {n: state.get(i) for n, i in zip(param_order, index)}


def trainer_param_order(model):
    """(trainable names in the order a Trainer numbers them -- decay group, then no-decay group --, group sizes)."""
    from transformers import Trainer
    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in trainable_parameters(model)]
    groups = [[n for n in names if n in decay], [n for n in names if n not in decay]]
    return groups[0] + groups[1], [len(g) for g in groups]


def checkpoint_weights_from_trainer_state(path):
    """LESS's checkpoint weights eta_i: the mean logged learning rate of epoch i (entries with epoch in (i - 1, i]) of
    a transformers trainer_state.json; a missing epoch or a bad rate is an error naming the file and the entry."""
    try:
        with open(path) as f:
            log = json.load(f)["log_history"]
        if not isinstance(log, list):
            raise TypeError("log_history is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a transformers trainer_state.json with a 'log_history' list ({e!r:.100})") \
            from None
    by_epoch = {}
    for i, e in enumerate(log):
        if isinstance(e, dict) and "learning_rate" in e and "epoch" in e:
            for name, v in ((k, e[k]) for k in ("learning_rate", "epoch")):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"{path}: log_history[{i}] has {name} {v!r}, not a finite number >= 0")
            by_epoch.setdefault(max(1, math.ceil(e["epoch"] - 1e-9)), []).append(e["learning_rate"])
    if not by_epoch:
        raise ValueError(f"{path} has no log entry with both 'learning_rate' and 'epoch'")
    missing = sorted(set(range(1, max(by_epoch) + 1)) - set(by_epoch))
    if missing:
        raise ValueError(f"{path}: no learning rate logged in epoch {missing[0]} (epochs {sorted(by_epoch)} have "
                         "one): each warm-up epoch needs its weight; give the weights instead")
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


# --- storage: row i of every feature file belongs to ids[i], under one checksum; what the rows were computed from
def _sha(parts, n_hex=16, chunk_bytes=2 ** 28):
    """sha256 (n_hex hex digits) of bytes, tensors (raw bytes, 256 MiB at a time) and other values (JSON), in order."""
    h = hashlib.sha256()
    for x in parts:
        if not torch.is_tensor(x):
            h.update(x if isinstance(x, bytes) else json.dumps(x).encode())
            continue
        flat = x.detach().reshape(-1)
        step = max(1, chunk_bytes // flat.element_size())
        for i in range(0, flat.numel(), step):
            part = flat[i:i + step].contiguous().cpu()
            h.update((ctypes.c_char * (part.numel() * part.element_size())).from_address(part.data_ptr()))  # no copy
    return h.hexdigest()[:n_hex]


def model_fingerprint(model):
    """sha256 of every parameter's name, shape, dtype, trainable flag and bytes, frozen ones too (content, not sums)."""
    return _sha(x for n, p in model.named_parameters()
                for x in (f"{n}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad};".encode(), p))


def load_features(path, merged=False):
    """(features float32 (N, k), ids list, identity dict) from a chunk or (merged=True: only) a merged file. Every
    read checks the file's checksum, which covers the ids; a merged file's ids must be the collection's, in order."""
    tensors, meta = _read_features(path)
    if merged and "positions" in tensors:
        raise ValueError(f"{path} is one chunk of a collection, not its merged features.safetensors")
    if "positions" not in tensors and _sha([meta["ids"]]) != meta["identity"].get("ids"):
        raise ValueError(f"{path}: its ids are not the ones its collection was given (in that order)")
    return tensors["features"], meta["ids"], meta["identity"]


def _read_features(path):
    """(tensors, metadata) of a feature file after checking, on every read: its checksum (mandatory), rows = ids,
    unique ids, proj_dim columns; else a ValueError naming the file."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such feature file (collect writes features.safetensors when it finishes)")
    try:
        with safe_open(str(path), "pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        checksum = raw.pop("checksum", None)
        meta = {k: json.loads(v) for k, v in raw.items()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable feature file ({type(e).__name__}: {str(e)[:200]})") from None
    if checksum is None or meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: no checksum of the {FILE_FORMAT} format: a file of an older version of less_ref, "
                         "of another tool, or an edited one; it is not trusted (collect it again into a new directory)")
    if checksum != _file_checksum(tensors, meta):
        raise ValueError(f"{path}: its content (features, ids or metadata) does not match its checksum: the file was "
                         "changed after it was written; it is not used")
    if "features" not in tensors or "ids" not in tensors or "identity" not in meta:
        raise ValueError(f"{path}: not a feature file (needs 'features', 'ids' and 'identity')")
    try:  # ids: a JSON list of str / int in a uint8 tensor; a forged or foreign writer may have put anything there
        t = tensors["ids"]
        ids = meta["ids"] = json.loads(ctypes.string_at(t.data_ptr(), t.numel()) if t.dtype == torch.uint8 else "?")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))] if type(ids) is list else [ids]
    except ValueError as e:  # not JSON, or an integer past Python's digit limit
        bad = [f"{t.dtype}: {e}"]
    if bad:
        raise ValueError(f"{path}: its ids are not a JSON list of str or int ids ({str(bad[0])[:80]!r}): not trusted")
    x, k = tensors["features"], meta["identity"]["proj_dim"]
    if x.dim() != 2 or x.shape[0] != len(ids) or x.shape[1] != k:
        raise ValueError(f"{path}: {tuple(x.shape)} features for {len(ids)} ids and proj_dim {k}")
    if len(set(ids)) != len(ids):
        first = {}
        for i, sid in enumerate(ids):
            if first.setdefault(json.dumps(sid), i) != i:
                raise ValueError(f"{path}: sample id {sid!r} labels two rows ({first[json.dumps(sid)]} and {i})")
    return tensors, meta


FILE_FORMAT = "less-ref-features-v3"  # v3: ids as a tensor (any number of them), one checksum over everything


def _file_checksum(tensors, meta):
    """sha256 of everything a feature file says: each tensor's name, dtype, shape and bytes (the ids' too), and every
    metadata field (identity, format) as canonical JSON: a swapped or edited id is a changed file."""
    parts = [json.dumps(meta, sort_keys=True).encode()]
    for k in sorted(tensors):
        parts += [f"{k}|{tensors[k].dtype}|{tuple(tensors[k].shape)};".encode(), tensors[k]]
    return _sha(parts, n_hex=64)


def _write_atomic(tensors, metadata, path):
    """A safetensors file with JSON metadata and its checksum, via a temp file renamed, with the umask's permissions
    (not 0600: other users' ranks read it); metadata["ids"] goes to the uint8 tensor "ids" (JSON), not the header."""
    from safetensors.torch import save_file
    meta = dict(metadata, format=FILE_FORMAT)
    ids = bytearray(json.dumps(meta.pop("ids")).encode())  # never empty: "[]" at least
    tensors = dict(tensors, ids=torch.frombuffer(ids, dtype=torch.uint8))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={**{k: json.dumps(v) for k, v in meta.items()},
                                          "checksum": _file_checksum(tensors, meta)})
        os.umask(mask := os.umask(0))  # read the umask (it can only be read by setting it)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of it
    except Exception as e:  # disk full, read-only directory (safetensors' own error is not an OSError)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(getattr(e, "errno", None), f"{path}: cannot write ({getattr(e, 'strerror', None) or e})") \
            from None


# --- features in bounded memory: the gradient buffer, projected slice by slice; settings read where they are used
GRAD_BUFFER_BYTES, BUFFER_SECONDS, PROGRESS_SECONDS = 2 ** 31, 600, 30  # defaults of the environment's settings


def _env(name, default, lo, lo_open=False):
    """An environment setting, read where it is used: a finite number >= lo (> lo), else a ValueError naming it."""
    raw = os.environ.get(name)
    try:
        v = default if raw is None else float(raw)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo)):
        raise ValueError(f"environment variable {name}={raw!r}: it must be a finite number {'>' * lo_open or '>='}{lo}")
    return v


def _settings():
    """(buffer bytes, buffer seconds, progress seconds): the environment's settings (the tools check them first)."""
    return (int(_env("LESS_GRAD_BUFFER_BYTES", GRAD_BUFFER_BYTES, 1)),
            _env("LESS_BUFFER_SECONDS", BUFFER_SECONDS, 0, True), _env("PROGRESS_SECONDS", PROGRESS_SECONDS, 0))


def _features(model, examples, group_sizes, grad_type, adam, projection, batch_size, bar, vmap=True, eps_outside=False):
    """Projected features (rows, k) of checked examples, whole groups at a time (collect's chunks; None: batches):
    gradients batch by batch into a buffer projected at once (R made once) when the next group would pass
    LESS_GRAD_BUFFER_BYTES (>= a group; 2x while projected), after LESS_BUFFER_SECONDS, or at the end. NaN: its id."""
    limit, seconds, _ = _settings()
    sizes = group_sizes or [min(batch_size, len(examples) - b) for b in range(0, len(examples), batch_size)]
    buf, start, since, step = [], 0, None, batch_size if vmap else 1  # the loop steps by one: progress per record
    for n, nxt in zip(sizes, sizes[1:] + [0]):
        for b in range(start, start + n, step):
            batch = examples[b:min(b + step, start + n)]
            g = example_gradients(model, batch, vmap, check=False)  # (B, D)
            bad = ~torch.isfinite(g).all(1)  # (B,)
            if bad.any():
                raise ValueError(f"non-finite gradient for sample id {batch[bad.nonzero()[0].item()]['id']!r} "
                                 f"(bf16 overflow or a broken example); its score would be meaningless")
            buf, since = buf + [g], since or time.time()
            bar.update(len(batch))  # the timer's lines and the moving rate cover the projections
        start += n
        if not nxt or (sum(map(len, buf)) + nxt) * g.shape[1] * 4 > limit or time.time() - since >= seconds:
            yield projected_features(torch.cat(buf), grad_type, adam, projection, eps_outside)  # (rows, k)
            buf, since = [], None


def projected_features(grads, grad_type, adam_state, projection, eps_outside=False, slice_cols=2 ** 22):
    """projection(gradient_features(grads, ...)) slice by slice (row_offset): float32 (N, proj_dim), equal up to
    summation order, with feature temporaries (m_hat, v_hat, ...) of (N, slice_cols) instead of (N, D)."""
    _check_projection_args(*projection, rows=(0, grads.shape[1]))  # once, not per slice
    out = torch.zeros(grads.shape[0], projection.proj_dim, device=grads.device)  # (N, k)
    for a in range(0, grads.shape[1], slice_cols):
        part = None if adam_state is None else tuple(m[a:a + slice_cols] for m in adam_state)  # (slice,) each
        x = gradient_features(grads[:, a:a + slice_cols], grad_type, part, eps_outside)  # (N, slice)
        out.add_(projection(x, row_offset=a, check=False))  # (N, k)
    return out


def gradient_features(grads, grad_type, adam_state=None, eps_outside=False):
    """'sgd': g (validation); 'sign': sign(g); 'adam': adam_features(g, m, v) with adam_state = (m, v). float32."""
    if grad_type in ("sgd", "sign"):
        return grads.float() if grad_type == "sgd" else torch.sign(grads.float())  # (N, D)
    if grad_type == "adam" and adam_state is not None:
        return adam_features(grads, *adam_state, eps_outside=eps_outside)  # (N, D)
    raise ValueError("grad_type 'adam' needs the checkpoint's optimizer state (exp_avg, exp_avg_sq)"
                     if grad_type == "adam" else f"grad_type must be 'sgd', 'sign' or 'adam', got {grad_type!r}")


# ============================================================================
# 3. Data preparation: which tokens carry the loss is part of LESS's definition
def encode_example(record, tokenizer, max_length=2048):
    """{"id", "input_ids", "labels"} as LESS's data code builds it: {"prompt", "response"} -> prompt + response + eos
    (a space between unless one side has it), labels -100 on the prompt; {"messages": [...]} -> the chat template,
    labels on each assistant turn's span only. Truncated to max_length (its first tokens)."""
    sid = _check_record(record, max_length)
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if "messages" in record:
        msgs = record["messages"]
        render = lambda m, g=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g)  # noqa
        ids = ids_of(render(msgs))
        labels = [-100] * len(ids)
        for i, m in enumerate(msgs):
            if m.get("role") == "assistant":
                a, b = len(ids_of(render(msgs[:i], True))), len(ids_of(render(msgs[:i + 1])))
                labels[a:b] = ids[a:b]
    else:
        p, r = record["prompt"], record["response"]
        sep = "" if p.endswith((" ", "\n", "\t")) or r.startswith((" ", "\n", "\t")) else " "
        ids = ids_of(p + sep + r + (tokenizer.eos_token or ""))
        n_prompt = len(ids_of(p))
        labels = [-100] * n_prompt + ids[n_prompt:]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels[1:]):
        raise ValueError(f"sample id {sid!r}: no response token left within max_length={max_length} "
                         f"({len(ids)} tokens kept): raise max_length or drop the record")
    return {"id": sid, "input_ids": ids, "labels": labels}


# ============================================================================
# 4. Input checks: every bad input is an error that says what and where, checked once per public call
def _whole(name, v, lo=1, hi=math.inf):
    """A whole-number argument (not a float, bool or str) in [lo, hi], else a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a whole number >= {lo}{f' and <= {hi}' if hi < math.inf else ''}, got {v!r}")


def _check_record(record, max_length):
    """The record's id, after checking its shape: prompt and response strings, or messages with an assistant turn."""
    _whole("max_length", max_length)
    sid, msgs = record.get("id"), record.get("messages")
    if "messages" not in record and not ("prompt" in record and "response" in record):
        raise ValueError(f"record {sid!r} needs 'prompt' and 'response', or 'messages'; it has {sorted(record)}")
    if "messages" not in record and not (isinstance(record["prompt"], str) and isinstance(record["response"], str)):
        raise TypeError(f"record {sid!r}: prompt and response must be strings")
    if "messages" in record and not (isinstance(msgs, list) and
                                     all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
        raise TypeError(f"record {sid!r}: messages must be a list of {{'role', 'content'}} objects, content a string")
    if "messages" in record and not any(m.get("role") == "assistant" for m in msgs):
        raise ValueError(f"record {sid!r} has no assistant turn: no token to learn from")
    return sid


def _check_projection_args(proj_dim, seed, kind, s, block_rows=None, rows=(0, 0)):
    """The projection's values; rows = (row0, nrows): the counter row * per_row + j must stay below 2^63, so rows
    < 2^63 / per_row (2^55 at k = 8192)."""
    _ = block_rows is None or _whole("block_rows", block_rows)
    _whole("proj_dim", proj_dim)
    _whole("seed", seed, 0, 2 ** 32 - 1)
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"kind must be 'rademacher' or 'sjlt', got {kind!r}")
    if kind == "sjlt":
        _whole(f"s (sjlt nonzeros per row, <= proj_dim={proj_dim})", s, 1, proj_dim)
    per_row = (proj_dim + 31) // 32 if kind == "rademacher" else s
    _whole("row_offset", rows[0], 0)
    if sum(rows) * per_row > 2 ** 63:
        raise ValueError(f"row {sum(rows) - 1} is past the projection's limit: row indices must be < 2^63 / "
                         f"{per_row} = {2 ** 63 // per_row} for this proj_dim")


def _check_influence_inputs(train, val, eta, n_subtasks):
    """influence_scores' inputs: one (N, k) train and (M, k) val tensor per checkpoint, weights eta, subtasks."""
    if len(train) != len(val) or not train:
        raise ValueError(f"need one train and one val tensor per checkpoint, got {len(train)} and {len(val)}")
    _whole("n_subtasks", n_subtasks)
    M = val[0].shape[0] if val[0].dim() == 2 else 0
    for i, (t, v) in enumerate(zip(train, val)):
        if t.dim() != 2 or v.dim() != 2 or t.shape[0] == 0 or v.shape[0] == 0:
            raise ValueError(f"checkpoint {i}: train {tuple(t.shape)} and val {tuple(v.shape)} must be non-empty "
                             "(N, k) and (M, k): an empty side has no score")
        if v.shape[0] != M or t.shape[1] != v.shape[1] or t.shape[0] != train[0].shape[0]:
            raise ValueError(f"checkpoint {i}: train {tuple(t.shape)} and val {tuple(v.shape)} do not match the others")
    if eta.numel() != len(train) or (eta < 0).any() or eta.sum() <= 0 or not torch.isfinite(eta).all():
        raise ValueError(f"checkpoint_weights must be {len(train)} finite numbers >= 0, sum > 0, got {eta.tolist()}")
    if M % n_subtasks:
        raise ValueError(f"n_subtasks={n_subtasks} does not divide the {M} validation examples into equal subtasks")


def _check_selection(scores, fraction, k):
    """select_top's inputs: 1-D scores without NaN, exactly one of fraction in (0, 1] and k in [0, N]."""
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of fraction or k")
    if not torch.is_tensor(scores) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor (one per example), got {getattr(scores, 'shape', type(scores))}")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    _ = k is None or _whole("k", k, 0, scores.shape[0])  # int(fraction N) is in [0, N] for fraction in (0, 1]
    if torch.isnan(scores).any():
        raise ValueError(f"score {torch.isnan(scores).nonzero()[0].item()} is NaN")


def _check_weights(model, weights, i):
    """A checkpoint's state_dict must name only the model's parameters and buffers and hold every trainable one:
    weights saved under another prefix (base_model.model.) would otherwise load nothing, silently."""
    if not isinstance(weights, dict):
        raise TypeError(f"checkpoint {i}: weights must be a state_dict or None, got {type(weights).__name__}")
    unexpected = sorted(set(weights) - set(model.state_dict()))
    missing = [n for n, _ in trainable_parameters(model) if n not in weights]
    if unexpected or missing:
        raise ValueError(f"checkpoint {i}: weights do not fit the model: " + "; ".join(
            f"{what} {v[:3]}{' ...' if len(v) > 3 else ''}" for what, v in
            (("unexpected keys", unexpected), ("missing trainable parameters", missing)) if v))


def _check_moments(moments, shape, where):
    """(exp_avg, exp_avg_sq): two finite tensors of this shape, exp_avg_sq >= 0 (a checkpoint's (D,), a parameter's)."""
    if not (isinstance(moments, (tuple, list)) and len(moments) == 2 and all(torch.is_tensor(m) for m in moments)):
        raise TypeError(f"{where}: moments must be (exp_avg, exp_avg_sq) tensors, got {type(moments).__name__}; "
                        "adam_state(model, optimizer_or_file) gives them")
    for name, m in zip(("exp_avg", "exp_avg_sq"), moments):
        if m.shape != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(m.shape)}, not {tuple(shape)}")
        if not torch.isfinite(m).all() or (name == "exp_avg_sq" and (m < 0).any()):
            raise ValueError(f"{where}: {name} has a non-finite{' or negative' if name == 'exp_avg_sq' else ''} entry")


def _check_checkpoint_order(paths, identities):
    """match: each checkpoint once (its name, its model and moments), in epoch order when every name ends in its step
    (checkpoint-<step>): the weights are given in that order, so a file out of place takes another epoch's weight."""
    seen = {}
    for path, ident in zip(paths, identities):
        for key, what in (((ident["checkpoint"],), f"checkpoint {ident['checkpoint']!r}"),
                          ((ident["model"], ident["optimizer"]), "the same model and optimizer state")):
            if key in seen and key != ("",):
                raise ValueError(f"{path} and {seen[key]} are the same checkpoint ({what}): give each one once")
            seen[key] = path
    steps = [re.search(r"(\d+)$", ident["checkpoint"]) for ident in identities]
    for i in range(1, len(steps) if all(steps) else 0):
        if int(steps[i].group(1)) <= int(steps[i - 1].group(1)):
            raise ValueError(f"train files out of epoch order: {paths[i]} (checkpoint {identities[i]['checkpoint']!r}) "
                             f"comes after {paths[i - 1]} ({identities[i - 1]['checkpoint']!r}); give the files in "
                             "epoch order, as the checkpoint weights are")


def _check_model_inputs(model, *example_sets):
    """The model has a trainable parameter and each set of examples fits its vocabulary."""
    if not trainable_parameters(model):
        raise ValueError("the model has no trainable parameter (requires_grad): nothing to take gradients of")
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    for examples in example_sets:
        check_examples(examples, vocab)


def _token_tensor(ex, key, i):
    """ex[key] as a 1-D long tensor; float values (84.7), other shapes or a missing key are errors naming the id."""
    sid = ex["id"]
    if key not in ex:
        raise ValueError(f"sample id {sid!r} (position {i}) has no {key!r}")
    t = torch.as_tensor(ex[key])
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"sample id {sid!r}: {key} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        t = torch.as_tensor(ex[key], dtype=torch.float64)  # 84.7 named as given, not as its float32 rounding
    if (t.is_complex() or t.dtype == torch.bool) or (t.is_floating_point() and not torch.equal(t, t.round())):
        got = t[t != t.round()][:3].tolist() if t.is_floating_point() else t.dtype
        raise ValueError(f"sample id {sid!r}: {key} must be whole numbers, got {got}")
    return t.long()


def check_examples(examples, vocab_size=None):
    """Each example: a dict, a unique str/int 'id', 1-D whole-number 'input_ids' and 'labels' of one length, ids in
    [0, vocab_size), labels -100 or in range, a scored label at least (HF gives NaN without); errors name the id."""
    seen, empty = {}, []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "id" not in ex:
            raise ValueError(f"example at position {i} has no 'id' (examples: dicts of 'id', 'input_ids', 'labels')")
        sid = ex["id"]
        if isinstance(sid, bool) or not isinstance(sid, (str, int)):
            raise ValueError(f"sample id at position {i} must be a str or int, got {type(sid).__name__} {sid!r}")
        if sid in seen:
            raise ValueError(f"duplicate sample id {sid!r} at positions {seen[sid]} and {i}")
        seen[sid] = i
        ids, lab = _token_tensor(ex, "input_ids", i), _token_tensor(ex, "labels", i)
        if lab.shape != ids.shape:
            raise ValueError(f"sample id {sid!r}: labels and input_ids differ in length ({lab.numel()}, {ids.numel()})")
        hi = vocab_size if vocab_size is not None else float("inf")
        for what, t, bad in (("token id", ids, (ids < 0) | (ids >= hi)),
                             ("label", lab, (lab != -100) & ((lab < 0) | (lab >= hi)))):
            if bad.any():
                raise ValueError(f"sample id {sid!r}: {what} {t[bad][0].item()} at index {bad.nonzero()[0].item()} is "
                                 f"outside the vocabulary [0, {vocab_size})" + " and not -100" * (what == "label"))
        if (lab[1:] == -100).all():  # position 0 is never predicted
            empty.append(sid)
    if empty:
        raise ValueError(f"{len(empty)} example(s) have no response token (labels all -100 after position 0), "
                         f"ids {empty[:10]}: drop them before collecting")
