"""LESS reference: gradient-feature data selection (Xia et al., ICML 2024), in plain torch.

Follows the original LESS code (collect_grad_reps.py, matching.py): per-example gradients of the
Hugging Face causal-LM loss (response tokens only) over the trainable parameters, Adam-preconditioned
with the warm-up checkpoint's optimizer moments,

    Gamma = m_hat / sqrt(v_hat + eps),  m_hat = b1 m + (1 - b1) g,  v_hat = b2 v + (1 - b2) g^2

randomly projected to proj_dim, L2-normalised, and matched against validation gradients:

    score(z') = max_subtask mean_{z in subtask} sum_i eta_i cos(grad l(z; theta_i), Gamma(z', theta_i))

Unlike the original, the projection is a pure function of (seed, row, column) -- identical for every
block size, batch split and device -- and every stored feature row stays tied to its sample id.
Imports with torch alone; transformers, safetensors and tqdm are imported where they are needed.

Precision: all arithmetic is float32 whatever the input dtype (bf16 gradients included); features
and scores are float32. Run `python less_ref.py demo` for an offline end-to-end run.
"""
import hashlib
import json
import math
import os
import sys

import torch

def _whole(name, v, lo=1):
    """A whole-number argument (not a float, bool or str) >= lo, else a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")


# ----------------------------------------------------------------------------
# Adam features


def adam_features(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=1e-8, eps_outside=False):
    """Gamma = m_hat / sqrt(v_hat + eps) (LESS: eps INSIDE the root, no bias correction, no lr), float32.

    grad is (D,) or (N, D) in any float dtype; the moments are (D,). eps_outside=True gives DataFlex's
    m_hat / (sqrt(v_hat) + eps) instead -- a different feature, so it must be asked for explicitly."""
    g, m, v = grad.float(), exp_avg.float(), exp_avg_sq.float()
    m_hat = beta1 * m + (1 - beta1) * g
    v_hat = beta2 * v + (1 - beta2) * g * g
    return m_hat / (v_hat.sqrt() + eps) if eps_outside else m_hat / torch.sqrt(v_hat + eps)


# ----------------------------------------------------------------------------
# random projection: each sign a pure function of (seed, row, column)

PROJECTION = "rademacher-fmix32-v1"
_M32 = 0xFFFFFFFF


def _mul32(h, c):
    """(h * c) mod 2^32 for 0 <= h, c < 2^32, split so that int64 never overflows (CPU == CUDA, bit for bit)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    """murmur3's 32-bit finaliser: a bijection of [0, 2^32) with full avalanche. Works on ints and int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _sign_table(device):
    """(256, 8) float32: entry [b, j] = +1 if bit j of byte b is 0, else -1."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (1 - 2 * bits).float()


def _seeds(seed, salt):
    _whole("seed", seed, 0)
    if seed >= 2 ** 32:
        raise ValueError(f"seed must be < 2^32, got {seed}")
    return _fmix32(seed ^ 0x9E3779B9 ^ salt), _fmix32(seed ^ 0x7F4A7C15 ^ salt)


def _words(counter, s1, s2):
    """32 random bits per int64 counter c = hi * 2^32 + lo: fmix32(fmix32(lo ^ s1) ^ hi ^ s2). Distinct
    counters are distinct hash inputs for every c < 2^63 (nothing is dropped from the counter)."""
    return _fmix32(_fmix32((counter & _M32) ^ s1) ^ (counter >> 32) ^ s2)


def _check_rows(row0, nrows, per_row):
    """The counter row * per_row + j must stay below 2^63: rows < 2^63 / per_row (2^55 at k = 8192)."""
    _whole("row_offset", row0, 0)
    if (row0 + nrows) * per_row > 2 ** 63:
        raise ValueError(f"row {row0 + nrows - 1} is past the projection's limit: row indices must be < 2^63 / "
                         f"{per_row} = {2 ** 63 // per_row} for this proj_dim")


def rademacher_block(seed, row0, nrows, proj_dim, device="cpu"):
    """Rows [row0, row0 + nrows) of R in {-1, +1}^(D x proj_dim), float32 (nrows, proj_dim).

    Word (i, j // 32) = _words(i * W + j // 32), W = ceil(proj_dim / 32); sign (i, j) is bit j % 32 of that
    word (0 -> +1). Valid for rows < 2^63 / W (2^55 at proj_dim = 8192); past that an error."""
    s1, s2 = _seeds(seed, 0)
    W = (proj_dim + 31) // 32
    _check_rows(row0, nrows, W)
    rows = torch.arange(row0, row0 + nrows, device=device, dtype=torch.int64)
    words = _words(rows[:, None] * W + torch.arange(W, device=device, dtype=torch.int64), s1, s2)  # (nrows, W)
    byte = (words[..., None] >> torch.arange(0, 32, 8, device=device)) & 0xFF  # (nrows, W, 4)
    return _sign_table(device)[byte].reshape(nrows, W * 32)[:, :proj_dim]  # (nrows, proj_dim)


def sjlt_block(seed, row0, nrows, proj_dim, s, device="cpu"):
    """The sparse JL transform's rows [row0, row0 + nrows): columns (nrows, s) and signs (nrows, s).

    Block construction (Kane & Nelson): proj_dim is split into s blocks of about proj_dim / s columns and
    row i has exactly one nonzero in each, column floor(t k / s) + h_t(i) with sign +-1, from word
    _words(i * s + t) of a seed stream separate from the dense kind's (bit 0: sign, bits 1-31: column)."""
    s1, s2 = _seeds(seed, 0x51A7)
    _check_rows(row0, nrows, s)
    rows = torch.arange(row0, row0 + nrows, dtype=torch.int64, device=device)
    t = torch.arange(s, dtype=torch.int64, device=device)
    start = t * proj_dim // s  # block t: columns [t k / s, (t + 1) k / s)
    words = _words(rows[:, None] * s + t, s1, s2)  # (nrows, s)
    cols = start + (words >> 1) % ((t + 1) * proj_dim // s - start)
    return cols, (1 - 2 * (words & 1)).float()


PROJECTION_KINDS = {"rademacher": PROJECTION, "sjlt": "sjlt-fmix32-v1"}
SJLT_S = 4  # nonzeros per input coordinate; see project()


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher", s=SJLT_S, block_rows=None):
    """y = x @ R[row_offset : row_offset + D] / scale, float32 (N, proj_dim); x is (N, D) or (D,).

    kind 'rademacher' (the paper's, default): R in {-1, +1}, scale sqrt(proj_dim), O(D * proj_dim) per row.
    kind 'sjlt': each coordinate i goes to s columns with random signs (sjlt_block), scale sqrt(s), O(D * s)
    per row -- the sparse JL transform dattri uses instead of TRAK's fast_jl. s = 4 by default: the JL
    literature asks s ~ eps^-1 log(1/delta) for worst-case (sparse) inputs; on dense gradients s = 1..4 give the
    dense kind's distortion (benchmarks/bench.py jl), and s = 4 keeps a few large coordinates from sharing
    a single column. 1 <= s <= proj_dim.
    row_offset: x holds rows [row_offset, row_offset + D) of the gradient, so slices of one gradient (per layer,
    an FSDP rank's flat shard) project separately and sum to the whole. R is generated block_rows rows at a
    time on x's device and never held whole; it does not depend on block_rows, batch split, slicing or device,
    and y does only up to float32 summation order."""
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D) or (D,), got shape {tuple(x.shape)}")
    N, D = x.shape
    _whole("proj_dim", proj_dim)
    out = torch.zeros(N, proj_dim, device=x.device, dtype=torch.float32)
    if kind == "rademacher":
        _check_rows(row_offset, D, (proj_dim + 31) // 32)
        block_rows = block_rows or max(1, 2 ** 24 // proj_dim)
        for r0 in range(0, D, block_rows):
            nr = min(block_rows, D - r0)
            out.addmm_(x[:, r0:r0 + nr].float(), rademacher_block(seed, row_offset + r0, nr, proj_dim, x.device))
        return (out[0] if squeeze else out).div_(math.sqrt(proj_dim))
    if kind != "sjlt":
        raise ValueError(f"kind must be 'rademacher' or 'sjlt', got {kind!r}")
    _whole("s (sjlt nonzeros per row)", s)
    if s > proj_dim:
        raise ValueError(f"sjlt needs s <= proj_dim={proj_dim}, got s={s}")
    _check_rows(row_offset, D, s)
    out_t = out.T  # (proj_dim, N) view: index_add_ adds whole rows of N contiguous values
    block_rows = block_rows or max(1, 2 ** 22 // (s * max(N, 1)))
    for r0 in range(0, D, block_rows):
        nr = min(block_rows, D - r0)
        cols, signs = sjlt_block(seed, row_offset + r0, nr, proj_dim, s, x.device)  # hashed on x's device
        xt = x[:, r0:r0 + nr].T.float()  # (nr, N)
        out_t.index_add_(0, cols.reshape(-1), (xt[:, None, :] * signs[..., None]).reshape(-1, N))
    return (out[0] if squeeze else out).div_(math.sqrt(s))


def projection_identity(grad_dim, proj_dim, seed, kind="rademacher", s=SJLT_S):
    """What a stored feature file records: features of different identities are never matched."""
    ident = {"projection": PROJECTION_KINDS[kind], "grad_dim": int(grad_dim), "proj_dim": int(proj_dim), "seed": int(seed)}
    return dict(ident, sjlt_s=int(s)) if kind == "sjlt" else ident


# ----------------------------------------------------------------------------
# matching and selection


def _normalise_rows(x, what):
    """x / |x| per row in float32, scaled by the row's max |entry| first so that norms of rows with 1e20 or
    1e-30 entries neither overflow nor underflow. A zero or non-finite row is an error naming it."""
    x = x.float()
    bad = ~torch.isfinite(x).all(-1)
    if bad.any():
        raise ValueError(f"{what} row {bad.nonzero()[0].item()} has a non-finite entry")
    top = x.abs().amax(-1, keepdim=True)
    if (top[:, 0] == 0).any():
        raise ValueError(f"{what} row {(top[:, 0] == 0).nonzero()[0].item()} is all zeros: it has no direction")
    x = x / top
    return x / x.norm(dim=-1, keepdim=True)


def influence_scores(train, val, checkpoint_weights=None, n_subtasks=1):
    """score_n = max_s mean_{m in subtask s} sum_i eta_i <t_in / |t_in|, v_im / |v_im|>, float32 (N,).

    train, val: a tensor (N, k) / (M, k) or a list of them, one per checkpoint. eta (default uniform) is
    renormalised to sum to 1. Validation rows form n_subtasks contiguous, equal-sized subtasks."""
    train = [train] if torch.is_tensor(train) else list(train)
    val = [val] if torch.is_tensor(val) else list(val)
    if len(train) != len(val) or not train:
        raise ValueError(f"need one train and one val tensor per checkpoint, got {len(train)} and {len(val)}")
    _whole("n_subtasks", n_subtasks)
    for i, (t, v) in enumerate(zip(train, val)):
        if t.dim() != 2 or v.dim() != 2 or t.shape[0] == 0 or v.shape[0] == 0:
            raise ValueError(f"checkpoint {i}: train {tuple(t.shape)} and val {tuple(v.shape)} must be non-empty "
                             "(N, k) and (M, k): an empty side has no score")
    eta = torch.ones(len(train)) if checkpoint_weights is None else torch.as_tensor(checkpoint_weights, dtype=torch.float64)
    if eta.numel() != len(train) or (eta < 0).any() or eta.sum() <= 0 or not torch.isfinite(eta).all():
        raise ValueError(f"checkpoint_weights must be {len(train)} finite non-negative numbers with a positive sum, got {eta.tolist()}")
    eta = (eta / eta.sum()).tolist()
    M = val[0].shape[0]
    if M % n_subtasks:
        raise ValueError(f"n_subtasks={n_subtasks} does not divide the {M} validation examples into equal subtasks")
    sim = 0
    for i, (t, v) in enumerate(zip(train, val)):
        if v.shape[0] != M or t.shape[1] != v.shape[1]:
            raise ValueError(f"checkpoint {i}: train {tuple(t.shape)} and val {tuple(v.shape)} do not match the others")
        sim = sim + eta[i] * (_normalise_rows(t, f"checkpoint {i} train") @ _normalise_rows(v, f"checkpoint {i} val").T)
    return sim.reshape(sim.shape[0], n_subtasks, M // n_subtasks).mean(-1).amax(-1)  # (N, M) -> (N,)


def select_top(scores, fraction=None, k=None):
    """Indices of the k highest scores, descending, ties by position; k = int(fraction * N) as in LESS."""
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of fraction or k")
    if not torch.is_tensor(scores) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor (one score per example), got {getattr(scores, 'shape', type(scores))}")
    N = scores.shape[0]
    if k is not None:
        _whole("k", k, 0)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = int(fraction * N)
    if not 0 <= k <= N:
        raise ValueError(f"k must be in [0, {N}], got {k}")
    if torch.isnan(scores).any():
        raise ValueError(f"score {torch.isnan(scores).nonzero()[0].item()} is NaN")
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def checkpoint_weights_from_trainer_state(path):
    """eta_i = mean logged learning rate of epoch i (log entries with epoch in (i - 1, i]) from trainer_state.json."""
    with open(path) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path} has no 'log_history' list: not a transformers trainer_state.json")
    log = [e for e in state["log_history"] if isinstance(e, dict) and "learning_rate" in e and "epoch" in e]
    if not log:
        raise ValueError(f"{path} has no log entry with both 'learning_rate' and 'epoch'")
    by_epoch = {}
    for e in log:
        by_epoch.setdefault(max(1, math.ceil(e["epoch"] - 1e-9)), []).append(e["learning_rate"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


# ----------------------------------------------------------------------------
# per-example gradients of a transformers causal LM


def trainable_parameters(model):
    """[(name, param)] with requires_grad, in named_parameters() order: the gradient vector's layout."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _as_long(x):
    return torch.as_tensor(x, dtype=torch.long)


def _token_tensor(ex, key, i):
    """ex[key] as a 1-D long tensor; float values (84.7), other shapes or a missing key are errors naming the id."""
    sid = ex["id"]
    if key not in ex:
        raise ValueError(f"sample id {sid!r} (position {i}) has no {key!r}")
    t = torch.as_tensor(ex[key])
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"sample id {sid!r}: {key} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if not (t.is_floating_point() and torch.equal(t, t.round())):
            raise ValueError(f"sample id {sid!r}: {key} must be whole numbers, got {t[t != t.round()][:3].tolist() if t.is_floating_point() else t.dtype}")
    return t.long()


def _vocab_size(model):
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    return getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)


def check_examples(examples, vocab_size=None):
    """Every example is a dict with an 'id' (str or int, unique) and 1-D whole-number 'input_ids' and 'labels'
    of one length; token ids in [0, vocab_size) and labels -100 or in [0, vocab_size) when vocab_size is known;
    at least one scored label (an all -100 example has no loss: HF gives NaN). Errors name the sample id."""
    seen, empty = {}, []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "id" not in ex:
            raise ValueError(f"example at position {i} has no 'id' (examples are dicts with 'id', 'input_ids', 'labels')")
        sid = ex["id"]
        if isinstance(sid, bool) or not isinstance(sid, (str, int)):
            raise ValueError(f"sample id at position {i} must be a str or int (stored as JSON), got {type(sid).__name__} {sid!r}")
        if sid in seen:
            raise ValueError(f"duplicate sample id {sid!r} at positions {seen[sid]} and {i}")
        seen[sid] = i
        ids, lab = _token_tensor(ex, "input_ids", i), _token_tensor(ex, "labels", i)
        if lab.shape != ids.shape:
            raise ValueError(f"sample id {sid!r}: labels and input_ids differ in length ({lab.numel()} vs {ids.numel()})")
        hi = vocab_size if vocab_size is not None else float("inf")
        bad = (ids < 0) | (ids >= hi)
        if bad.any():
            raise ValueError(f"sample id {sid!r}: token id {ids[bad][0].item()} at index {bad.nonzero()[0].item()} "
                             f"is outside the vocabulary [0, {vocab_size})")
        bad = (lab != -100) & ((lab < 0) | (lab >= hi))
        if bad.any():
            raise ValueError(f"sample id {sid!r}: label {lab[bad][0].item()} at index {bad.nonzero()[0].item()} "
                             f"is neither -100 nor in [0, {vocab_size})")
        if (lab[1:] == -100).all():  # position 0 is never predicted
            empty.append(sid)
    if empty:
        raise ValueError(f"{len(empty)} example(s) have no response token (labels all -100 after position 0), "
                         f"ids {empty[:10]}: drop them before collecting")


def encode_example(record, tokenizer, max_length=2048):
    """One example {"id", "input_ids", "labels"} from a record, the way LESS's data code builds it:
    - {"prompt", "response"}: text = prompt + response + eos (a space between them when neither side has one),
      labels -100 on the prompt's tokens;
    - {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template, labels only on the
      assistant messages' tokens (each one's span: the template up to it with the generation prompt, to its end).
    Truncated to max_length tokens; if no response token is left (or there was none) that is a ValueError naming
    the id, as in check_examples. record["id"] is kept (read_jsonl supplies one when absent)."""
    sid = record.get("id")
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if "messages" in record:
        msgs = record["messages"]
        render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        ids = ids_of(render(msgs))
        labels = [-100] * len(ids)
        for i, m in enumerate(msgs):
            if m.get("role") == "assistant":
                a, b = len(ids_of(render(msgs[:i], True))), len(ids_of(render(msgs[:i + 1])))
                labels[a:b] = ids[a:b]
    elif "prompt" in record and "response" in record:
        p, r = record["prompt"], record["response"]
        sep = "" if p.endswith((" ", "\n", "\t")) or r.startswith((" ", "\n", "\t")) else " "
        ids = ids_of(p + sep + r + (tokenizer.eos_token or ""))
        n_prompt = len(ids_of(p))
        labels = [-100] * n_prompt + ids[n_prompt:]
    else:
        raise ValueError(f"record {sid!r} needs 'prompt' and 'response', or 'messages'; it has {sorted(record)}")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels[1:]):
        raise ValueError(f"sample id {sid!r}: no response token left within max_length={max_length} "
                         f"({len(ids)} tokens kept): raise max_length or drop the record")
    return {"id": sid, "input_ids": ids, "labels": labels}


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


def example_gradients(model, examples, method="vmap"):
    """(B, D) float32 per-example gradients of the HF causal-LM loss (mean CE over labels != -100),
    over trainable_parameters(model), in eval mode (dropout must not change features).

    'loop': one backward per example (the original's batch size 1). 'vmap': torch.func over a right-padded
    batch with padding labelled -100 and no attention mask -- causal attention never lets a real token
    see the padding after it, so each row equals the loop up to float rounding."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad): nothing to take gradients of")
    check_examples(examples, _vocab_size(model))
    model.eval()
    if method == "loop":
        rows = []
        for ex in examples:
            loss = model(input_ids=_as_long(ex["input_ids"])[None].to(params[0][1].device),
                         labels=_as_long(ex["labels"])[None].to(params[0][1].device)).loss
            rows.append(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(loss, [p for _, p in params])]))
        return torch.stack(rows)
    if method != "vmap":
        raise ValueError(f"method must be 'loop' or 'vmap', got {method!r}")
    from torch.func import functional_call, grad, vmap

    T = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n], labels[i, :n] = _as_long(ex["input_ids"]), _as_long(ex["labels"])
    dev = params[0][1].device

    def loss_fn(p, i, lab):
        return functional_call(model, p, (), {"input_ids": i[None], "labels": lab[None]}).loss

    g = vmap(grad(loss_fn), in_dims=(None, 0, 0))({n: p.detach() for n, p in params}, ids.to(dev), labels.to(dev))
    return torch.cat([g[n].reshape(len(examples), -1).float() for n, _ in params], 1)


def gradient_features(grads, grad_type, adam_state=None, eps_outside=False):
    """'sgd': g; 'sign': sign(g); 'adam': adam_features(g, m, v, eps_outside=...) with adam_state = (m, v).
    float32."""
    if grad_type == "sgd":
        return grads.float()
    if grad_type == "sign":
        return torch.sign(grads.float())
    if grad_type == "adam":
        if adam_state is None:
            raise ValueError("grad_type 'adam' needs the checkpoint's optimizer state (exp_avg, exp_avg_sq)")
        return adam_features(grads, *adam_state, eps_outside=eps_outside)
    raise ValueError(f"grad_type must be 'sgd', 'sign' or 'adam', got {grad_type!r}")


def projected_features(grads, grad_type, adam_state, proj_dim, seed=0, kind="rademacher", s=SJLT_S,
                       eps_outside=False, slice_cols=2 ** 22):
    """project(gradient_features(grads, ...)) slice by slice of slice_cols gradient coordinates (row_offset):
    the same result up to float32 summation order, but the float32 feature temporaries (m_hat, v_hat, ...)
    are (N, slice_cols) instead of (N, D). float32 (N, proj_dim)."""
    out = None
    for a in range(0, grads.shape[1], slice_cols):
        b = min(a + slice_cols, grads.shape[1])
        part = None if adam_state is None else (adam_state[0][a:b], adam_state[1][a:b])
        y = project(gradient_features(grads[:, a:b], grad_type, part, eps_outside), proj_dim, seed, row_offset=a,
                    kind=kind, s=s)
        out = y if out is None else out.add_(y)
    return out


# ----------------------------------------------------------------------------
# optimizer state: FSDP name-keyed optimizer.bin, Trainer index-keyed optimizer.pt, live optimizer


def trainer_param_order(model):
    """Trainable names in the order a transformers Trainer numbers them: its weight-decay group, then its
    no-decay group (each in named_parameters() order). Returns the order and the two group sizes."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in trainable_parameters(model)]
    groups = [[n for n in names if n in decay], [n for n in names if n not in decay]]
    return groups[0] + groups[1], [len(g) for g in groups]


def _strip(name):
    for prefix in ("_fsdp_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def adam_state(model, source, param_order=None):
    """(exp_avg, exp_avg_sq) as float32 (D,) vectors laid out like the gradient vector.

    source: a live torch.optim optimizer (state[param]); or a path to optimizer.bin (state keyed by
    parameter NAME, FSDP/accelerate) or optimizer.pt (keyed by INDEX in param_groups order, transformers
    Trainer: decay group first; pass param_order, a list of names, for another grouping). Files are read
    with torch.load(weights_only=True): no pickled code runs. Every shape is checked by parameter name."""
    params = trainable_parameters(model)
    if isinstance(source, torch.optim.Optimizer):
        by_name = {n: source.state.get(p) for n, p in params}
    else:
        if source is None:
            raise ValueError("grad_type 'adam' needs the checkpoint's optimizer state: a live optimizer or the path of "
                             "optimizer.pt / optimizer.bin")
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # a safetensors file, a pickle with code, a truncated file
            raise ValueError(f"{source}: not a torch optimizer state_dict that loads with weights_only=True "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
            keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"{source}: not an optimizer state_dict (no 'state' entry; found {keys}); "
                             "a model state_dict or another file was given as optimizer state")
        state = sd["state"]
        if all(isinstance(k, str) for k in state):
            stripped = {_strip(k): v for k, v in state.items()}
            by_name = {n: state.get(n, stripped.get(_strip(n))) for n, _ in params}
        else:
            if param_order is None:
                param_order, sizes = trainer_param_order(model)
                file_sizes = [len(g["params"]) for g in sd["param_groups"]]
                if [s for s in file_sizes if s] != [s for s in sizes if s]:
                    raise ValueError(f"{source}: param_groups sizes {file_sizes} do not match a Trainer's decay/no-decay "
                                     f"grouping of this model's trainable parameters {sizes}; pass param_order")
            index = [i for g in sd["param_groups"] for i in g["params"]]
            if len(index) != len(param_order):
                raise ValueError(f"{source}: {len(index)} parameters in param_groups, {len(param_order)} names in param_order")
            by_name = {n: state.get(i) for n, i in zip(param_order, index)}
    ms, vs = [], []
    for n, p in params:
        s = by_name.get(n)
        if not s or "exp_avg" not in s or "exp_avg_sq" not in s:
            raise ValueError(f"optimizer state has no exp_avg/exp_avg_sq for parameter {n!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            if s[key].shape != p.shape:
                raise ValueError(f"optimizer state {key} for parameter {n!r} has shape {tuple(s[key].shape)}, "
                                 f"the parameter has {tuple(p.shape)}")
        ms.append(s["exp_avg"].reshape(-1).float().to(p.device))
        vs.append(s["exp_avg_sq"].reshape(-1).float().to(p.device))
    return torch.cat(ms), torch.cat(vs)


# ----------------------------------------------------------------------------
# collection and storage: row i of every feature file belongs to ids[i]


def _hash_tensor(h, t, chunk_bytes=2 ** 28):
    """Feed t's raw bytes to h, chunk by chunk (a GPU tensor is copied 256 MiB at a time), no numpy."""
    import ctypes

    flat = t.detach().reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.element_size()))
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step].contiguous().cpu()
        h.update(memoryview((ctypes.c_char * (part.numel() * part.element_size())).from_address(part.data_ptr())))


def model_fingerprint(model):
    """sha256 (16 hex) of every parameter's name, shape, dtype, trainable flag and bytes (frozen ones too: a
    changed base model changes every gradient), in named_parameters() order. Content, not sums: a permutation
    of values changes it."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad};".encode())
        _hash_tensor(h, p)
    return h.hexdigest()[:16]


def optimizer_fingerprint(adam):
    """sha256 (16 hex) of exp_avg and exp_avg_sq in gradient layout order (None without optimizer state)."""
    if adam is None:
        return None
    h = hashlib.sha256()
    for t in adam:
        _hash_tensor(h, t)
    return h.hexdigest()[:16]


def data_fingerprint(examples):
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["id"], _as_long(ex["input_ids"]).tolist(), _as_long(ex["labels"]).tolist()]).encode())
    return h.hexdigest()[:16]


def _write_atomic(tensors, metadata, path):
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; other users' ranks must read it like any file
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of it


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_features(path):
    """(tensors, metadata) of a feature file, opened once; rows and ids must match. An unreadable or truncated
    file is a ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: unreadable feature file ({type(e).__name__}: {e}); delete it and re-run") from None
    if "features" not in tensors or "ids" not in meta or "identity" not in meta:
        raise ValueError(f"{path}: not a feature file (needs 'features', 'ids' and 'identity')")
    if tensors["features"].shape[0] != len(meta["ids"]):
        raise ValueError(f"{path}: {tensors['features'].shape[0]} feature rows but {len(meta['ids'])} ids")
    return tensors, meta


def load_features(path):
    """(features float32 (N, k), ids list, identity dict) from a chunk or merged file."""
    tensors, meta = _read_features(path)
    return tensors["features"], meta["ids"], meta["identity"]


def _world():
    """(rank, world size) under an initialised torch.distributed process group (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync(rank, world, fn):
    """fn() on every rank, then every rank learns whether any rank failed, so none is left waiting at the next
    collective for a timeout: the failing rank re-raises its own error, the others a ValueError naming it."""
    try:
        out, error = fn(), None
    except Exception as e:
        if world == 1:
            raise
        out, error = None, e
    if world == 1:
        return out
    import torch.distributed as dist

    errors = [None] * world
    dist.all_gather_object(errors, f"{type(error).__name__}: {error}" if error else None)
    if error is not None:
        raise error
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise ValueError(f"rank {bad[0][0]} failed: {bad[0][1]}")
    return out


def shard_positions(n, rank, world):
    """DistributedSampler's split (shuffle=False): positions padded to a multiple of world by repeating from
    the start, rank r taking r, r + world, ... The merge drops the repeats."""
    total = -(-n // world) * world
    return [i % n for i in range(rank, total, world)]


def _shard_dir(out_dir, rank, world):
    return os.path.join(out_dir, f"shard-{rank:03d}-of-{world:03d}")


def _chunk_path(shard_dir, i):
    return os.path.join(shard_dir, f"chunk_{i:06d}.safetensors")


def _check_identity(out_dir, identity):
    """Write out_dir/identity.json if out_dir is new; else refuse (ValueError naming what changed) unless it
    holds this identity."""
    id_path = os.path.join(out_dir, "identity.json")
    if not os.path.exists(id_path):
        os.makedirs(out_dir, exist_ok=True)
        with open(id_path + ".tmp", "w") as f:
            json.dump(identity, f)
        os.replace(id_path + ".tmp", id_path)
        return
    with open(id_path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        raise ValueError(f"{out_dir} holds features of another configuration "
                         f"({', '.join(f'{k}: {old.get(k)!r} -> {identity.get(k)!r}' for k in diff)}); "
                         "use a new directory or delete it")


def _chunk_ok(path, identity, positions):
    """True if a chunk left by an earlier run is complete and ours; a torn or foreign one is removed."""
    try:
        tensors, meta = _read_features(path)
        if meta["identity"] == identity and tensors["positions"].tolist() == positions:
            return True
    except (ValueError, KeyError):
        pass
    import warnings

    warnings.warn(f"{path}: truncated, unreadable or of another configuration; recomputing it")
    os.remove(path)
    return False


def collect_features(model, examples, out_dir, grad_type="adam", optimizer_state=None, proj_dim=8192, seed=0,
                     checkpoint="", chunk_size=160, batch_size=8, method="vmap", progress=True, merge=True,
                     kind="rademacher", sjlt_s=SJLT_S):
    """Per-example features of `examples` (dicts with 'id', 'input_ids', 'labels'), projected (project(kind,
    s=sjlt_s)), written to out_dir/shard-RRR-of-WWW/ as chunk files of chunk_size rows (features + positions +
    ids + identity), each written atomically; then (merge=True) merged by rank 0 into out_dir/features.safetensors.

    Under torch.distributed (torchrun; gloo or nccl; out_dir on a shared filesystem) rank r takes its
    DistributedSampler shard. Re-running with the same arguments resumes: finished chunks are kept (a torn or
    unreadable one is recomputed, temp files of killed writes removed). A change of any parameter's content
    (frozen ones too), optimizer moments, checkpoint, projection, gradient type, data or world size is refused
    with the field that changed. Arguments are checked before anything is written. Non-finite gradients are an
    error naming the sample id; an error on one rank stops every rank promptly with its cause."""
    rank, world = _world()
    examples = list(examples)

    def prepare():
        if grad_type not in ("sgd", "sign", "adam"):
            raise ValueError(f"grad_type must be 'sgd', 'sign' or 'adam', got {grad_type!r}")
        _whole("chunk_size", chunk_size)
        _whole("batch_size", batch_size)
        project(torch.zeros(1, 1), proj_dim, seed, kind=kind, s=sjlt_s)  # checks proj_dim, seed, kind, s
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameter (requires_grad): nothing to take gradients of")
        check_examples(examples, _vocab_size(model))
        adam = adam_state(model, optimizer_state) if grad_type == "adam" else None
        identity = dict(projection_identity(sum(p.numel() for _, p in params), proj_dim, seed, kind, sjlt_s),
                        grad_type=grad_type, checkpoint=str(checkpoint), model=model_fingerprint(model),
                        data=data_fingerprint(examples), n_examples=len(examples), chunk_size=chunk_size,
                        world_size=world, optimizer=optimizer_fingerprint(adam))
        return identity, adam

    identity, adam = _sync(rank, world, prepare)  # nothing is written before every argument is checked
    _sync(rank, world, lambda: rank == 0 and _check_identity(out_dir, identity))  # rank 0 writes or checks it
    if world > 1:  # then every other rank must have the same configuration (same data, model, ...)
        _sync(rank, world, lambda: rank and _check_identity(out_dir, identity))
    positions = shard_positions(len(examples), rank, world)
    shard = _shard_dir(out_dir, rank, world)
    os.makedirs(shard, exist_ok=True)
    for f in os.listdir(shard):  # temp files of writes killed half-way (only this rank writes here)
        if ".tmp" in f:
            os.remove(os.path.join(shard, f))
    chunks = [positions[i:i + chunk_size] for i in range(0, len(positions), chunk_size)]
    todo = [c for c in range(len(chunks))
            if not (os.path.exists(_chunk_path(shard, c)) and _chunk_ok(_chunk_path(shard, c), identity, chunks[c]))]
    _sync(rank, world, lambda: _collect_chunks(model, examples, shard, chunks, todo, grad_type, adam, proj_dim, seed,
                                               kind, sjlt_s, identity, batch_size, method, progress, rank, checkpoint))
    if not merge:
        return None
    _sync(rank, world, lambda: rank == 0 and merge_features(out_dir))
    return os.path.join(out_dir, "features.safetensors")


def _progress(on, total, desc, rank, initial=0):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"rank {rank}: {desc}", position=rank)


def _features(model, examples, grad_type, adam, proj_dim, seed, kind, sjlt_s, batch_size, method, bar,
              eps_outside=False):
    """Projected features (N, proj_dim) of examples, batch by batch; a non-finite gradient is an error naming
    the sample id (bf16 overflow or a broken example: its score would be meaningless)."""
    rows = []
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        g = example_gradients(model, batch, method)
        bad = ~torch.isfinite(g).all(1)
        if bad.any():
            raise ValueError(f"non-finite gradient for sample id {batch[bad.nonzero()[0].item()]['id']!r} "
                             f"(bf16 overflow or a broken example); its score would be meaningless")
        rows.append(projected_features(g, grad_type, adam, proj_dim, seed, kind, sjlt_s, eps_outside))
        if bar:
            bar.update(len(batch))
    return torch.cat(rows) if rows else torch.zeros(0, proj_dim)


def _collect_chunks(model, examples, shard, chunks, todo, grad_type, adam, proj_dim, seed, kind, sjlt_s, identity,
                    batch_size, method, progress, rank, checkpoint):
    total = sum(map(len, chunks))
    bar = _progress(progress, total, f"{grad_type} features {checkpoint}", rank,
                    initial=total - sum(len(chunks[c]) for c in todo))
    for c in todo:
        chunk = [examples[i] for i in chunks[c]]
        feats = _features(model, chunk, grad_type, adam, proj_dim, seed, kind, sjlt_s, batch_size, method, bar)
        _write_atomic({"features": feats.cpu().contiguous(), "positions": torch.tensor(chunks[c])},
                      {"ids": [ex["id"] for ex in chunk], "identity": identity}, _chunk_path(shard, c))
    if bar:
        bar.close()


def merge_features(out_dir):
    """Put every shard's rows back in dataset order, drop the padding repeats, L2-normalise each row, and
    write out_dir/features.safetensors. Refuses a missing rank or chunk, a chunk of another identity, rows in
    the wrong place and two different rows for one id. Returns (features, ids, identity)."""
    with open(os.path.join(out_dir, "identity.json")) as f:
        identity = json.load(f)
    n, world = identity["n_examples"], identity["world_size"]
    feats, ids, filled = torch.zeros(n, identity["proj_dim"]), [None] * n, torch.zeros(n, dtype=torch.bool)
    for rank in range(world):
        shard = _shard_dir(out_dir, rank, world)
        if not os.path.isdir(shard):
            raise ValueError(f"{out_dir}: rank {rank} of {world} wrote nothing ({shard} is missing)")
        positions = shard_positions(n, rank, world)
        for c, start in enumerate(range(0, len(positions), identity["chunk_size"])):
            path = _chunk_path(shard, c)
            if not os.path.exists(path):
                raise ValueError(f"{out_dir}: rank {rank} has not finished (no {os.path.basename(path)}); resume the collection")
            tensors, meta = _read_features(path)
            x, chunk_ids, pos = tensors["features"], meta["ids"], tensors["positions"].tolist()
            if meta["identity"] != identity:
                raise ValueError(f"{path} was written by another configuration than {out_dir}/identity.json")
            if pos != positions[start:start + identity["chunk_size"]]:
                raise ValueError(f"{path} holds positions {pos[:5]}..., not rank {rank}'s shard")
            for row, i, sid in zip(x, pos, chunk_ids):
                if filled[i]:
                    if sid != ids[i] or not torch.allclose(row / row.norm(), feats[i] / feats[i].norm(), atol=1e-4):
                        raise ValueError(f"{out_dir}: two different rows for sample id {sid!r} (position {i})")
                    continue
                feats[i], ids[i], filled[i] = row, sid, True
    feats = _normalise_rows(feats, f"{out_dir} feature")
    _write_atomic({"features": feats.contiguous()}, {"ids": ids, "identity": identity},
                  os.path.join(out_dir, "features.safetensors"))
    validate_features(os.path.join(out_dir, "features.safetensors"))
    return feats, ids, identity


def validate_features(path):
    """A merged file is valid when rows == ids, ids are unique, all entries finite and rows unit-norm."""
    feats, ids, identity = load_features(path)
    if len(set(map(json.dumps, ids))) != len(ids):
        raise ValueError(f"{path}: duplicate sample ids")
    if feats.shape[1] != identity["proj_dim"]:
        raise ValueError(f"{path}: {feats.shape[1]} columns but proj_dim {identity['proj_dim']}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{path}: non-finite feature for sample id {ids[(~torch.isfinite(feats)).any(1).nonzero()[0].item()]!r}")
    if not torch.allclose(feats.norm(dim=1), torch.ones(len(ids)), atol=1e-4):
        raise ValueError(f"{path}: rows are not L2-normalised")
    return len(ids)


_PER_FILE = ("grad_type", "data", "n_examples", "chunk_size", "world_size", "optimizer")  # may differ train vs val


def _first_difference(a, b):
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"position {i}: {a[i] if i < len(a) else '(none)'!r} vs {b[i] if i < len(b) else '(none)'!r}"


def match(train_paths, val_paths, checkpoint_weights=None, n_subtasks=1):
    """influence_scores over merged feature files (one train and one val file per checkpoint), after checking
    that each pair shares projection (kind, seed, sizes), checkpoint and model, and that the train files (and
    the val files) hold the same ids in the same order at every checkpoint. Returns (scores, train ids)."""
    train_paths, val_paths = list(train_paths), list(val_paths)
    if len(train_paths) != len(val_paths) or not train_paths:
        raise ValueError(f"need one train and one val file per checkpoint, got {len(train_paths)} and {len(val_paths)}")
    train, val, first = [], [], None
    for tp, vp in zip(train_paths, val_paths):
        t, t_ids, ti = load_features(tp)
        v, v_ids, vi = load_features(vp)
        for key in sorted((set(ti) | set(vi)) - set(_PER_FILE)):
            if ti.get(key) != vi.get(key):
                raise ValueError(f"{tp} and {vp} are incompatible: {key} is {ti.get(key)!r} vs {vi.get(key)!r}")
        if first is None:
            first = (tp, t_ids, vp, v_ids)
        elif t_ids != first[1]:
            raise ValueError(f"{tp} holds other examples than {first[0]} (first difference at {_first_difference(t_ids, first[1])})")
        elif v_ids != first[3]:
            raise ValueError(f"{vp} holds other examples than {first[2]} (first difference at {_first_difference(v_ids, first[3])}): "
                             "the mean over subtasks needs the same validation examples in the same order")
        train.append(t)
        val.append(v)
    return influence_scores(train, val, checkpoint_weights, n_subtasks), first[1]


# ----------------------------------------------------------------------------
# dynamic selection during training (DataFlex's schedule)


def flex_plan(warmup_step, update_step, update_times):
    """One flex cycle: steps [0, warmup_step) train on a random subset; at step warmup_step + j * update_step
    (j < update_times) re-select with the current model and optimizer, then train update_step steps on the
    selection. Returns (selection steps, cycle length = warmup_step + update_step * update_times)."""
    for name, v in (("warmup_step", warmup_step), ("update_step", update_step), ("update_times", update_times)):
        if int(v) != v or v < (0 if name == "warmup_step" else 1):
            raise ValueError(f"{name} must be a whole number >= {0 if name == 'warmup_step' else 1}, got {v}")
    return [warmup_step + j * update_step for j in range(update_times)], warmup_step + update_step * update_times


def select_step(model, optimizer, pool, val, n_select, proj_dim=8192, seed=0, batch_size=8, method="vmap",
                eps_outside=True, kind="rademacher", sjlt_s=SJLT_S, progress=False):
    """Indices (long tensor, descending score) of the n_select pool examples whose Adam features (live
    optimizer moments, current weights) align best on average with the validation gradients -- DataFlex's
    score: one checkpoint, mean over validation examples. n_select = total_train_batch_size * update_step.

    eps_outside=True (default) is DataFlex's m_hat / (sqrt(v_hat) + eps); False gives LESS's
    m_hat / sqrt(v_hat + eps). The model's train/eval mode is restored afterwards (gradients are taken in
    eval mode). Under torch.distributed each rank scores pool[r::world]; rank 0 decides and broadcasts, so
    ranks never disagree. progress=True shows a bar per rank."""
    rank, world = _world()
    _whole("n_select", n_select, 0)
    adam = adam_state(model, optimizer)
    was_training = model.training
    mine = list(range(rank, len(pool), world))
    bar = _progress(progress, len(val) + len(mine), "select_step", rank)
    args = (adam, proj_dim, seed, kind, sjlt_s, batch_size, method, bar, eps_outside)
    try:
        v = _features(model, val, "sgd", *args)
        local = influence_scores(_features(model, [pool[i] for i in mine], "adam", *args), v).cpu() if mine else torch.zeros(0)
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    scores = torch.full((len(pool),), float("nan"))
    scores[mine] = local
    if world == 1:
        return select_top(scores, k=n_select)
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, (mine, local))
    for idx, sc in parts:
        scores[idx] = sc
    chosen = [select_top(scores, k=n_select) if rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


# ----------------------------------------------------------------------------
# demo: python less_ref.py demo


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
            collect_features(model, data, out, gt, os.path.join(ck, "optimizer.pt"), proj_dim, seed, name,
                             chunk_size=160, batch_size=16, progress=False)  # merged at the end
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


# ----------------------------------------------------------------------------
# command line: python less_ref.py {collect, match, select, demo} --help


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


def _cli(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="less_ref.py", description="LESS gradient-feature data selection.")
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
        path = collect_features(model, examples, a.out, a.grad_type, a.optimizer_state, a.proj_dim, a.seed,
                                a.checkpoint, batch_size=a.batch_size, kind=a.kind)
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
    _cli()
