"""MinP+ reference: a learnable generalisation of min-p sampling.

MinP+ keeps min-p's scale-free test r = p / max p, but instead of one cut it uses
K fixed thresholds tau_1 < ... < tau_K in [0, 1] with learned weights w_i >= 0:

    r_v = p_v / max_u p_u                    c_v = sum_{i : tau_i <= r_v} w_i
    q_v = p_v c_v / sum_u p_u c_u            (probs form)
    log q = log_softmax(z + log c)           (logits form, z = logits / T)

A single threshold tau = p_base with w = 1 is min-p; tau = 0 alone is plain sampling.
A head (w = softplus(theta)) is trained by the cross-entropy of q at reference tokens.

Reading order: 1. the transform and its loss in plain torch (minpp_loss_plain, the
definition, beside minpp_loss, its fused entry point); 2. the head and its training (band
statistics: for fixed thresholds a row's loss needs K numbers, not V); 3. bucketing tokens on
a threshold grid (shared by the statistics and the fused loss); 4. the fused, chunked loss;
5. the classic samplers done right; 6. generation and a transformers LogitsProcessor;
7. input checks. The contract: SPEC.md part M. The tools (train, eval, generate, demo) are
in cli/minpp.py. Imports with torch alone.

Precision: every function computes in float32 whatever the input dtype (fp32 / fp16
/ bf16) and returns float32 (band statistics: float64). Thresholds are compared in float32.
"""
import json
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_LOGITS = 2 ** 22  # minpp_loss, band_statistics: chunk_rows defaults to CHUNK_LOGITS // V (16 MB of float32)


# ============================================================================
# 1. The method: the MinP+ transform and its loss, in plain torch


def minpp_probs(probs, tau, w, check=True):
    """Probs form: q = p * c / sum(p * c), c from r = p / max p. float32 in and out; rows sum to 1.
    check=False skips check_thresholds (for a caller that checked tau and w once, as generate does)."""
    if check:
        check_thresholds(tau, w)
    p = _check_probs(probs)  # (N, V) float32
    p = p / p.sum(-1, keepdim=True)  # (N, V), rows sum to 1
    r = p / p.amax(-1, keepdim=True)  # (N, V) in [0, 1]; the max token has r == 1 exactly
    q = p * cumulative_weights(r, tau.to(p), unit_weights(w).to(p))  # (N, V)
    return q / q.sum(-1, keepdim=True)  # sum > 0: the max token gets c = sum(w) > 0


def minpp_logits(logits, tau, w, check=True):
    """Logits form: z + log c (-inf where c = 0), as r >= tau  <=>  z - max z >= log tau; no softmax. float32;
    z = logits / T (temperature first). c sums w / max(w) and log max(w) is added back, so weights near float32's
    limits (1e-45, 3e38) stay finite and exact. check: as in minpp_probs."""
    if check:
        check_thresholds(tau, w)
    z = logits.float()  # (N, V)
    d = z + _row_max(z).neg()  # (N, V) <= 0, log r
    c = cumulative_weights(d, tau.to(z).log(), unit_weights(w).to(z))  # log 0 = -inf: tau = 0 passes every token
    return z + (c.log() + w.double().max().log().float().to(z.device))  # (N, V)


def cumulative_weights(ratio_or_logratio, boundaries, w):
    """c_v = sum_{i: boundary_i <= x_v} w_i via bucketize (count of boundaries <= x) and a prefix sum, float32;
    boundaries are tau (probs form) or log tau (logits form)."""
    prefix = prefix_weights(w)  # (K+1,)
    idx = torch.bucketize(ratio_or_logratio, boundaries.contiguous(), right=True)  # (N, V) in [0, K]
    return prefix[idx]  # (N, V)


def prefix_weights(w):
    """(K+1,) float32: prefix[j] = w_1 + ... + w_j, so c = prefix[number of thresholds passed]."""
    return F.pad(torch.cumsum(w.float(), 0), (1, 0))  # (K+1,)


def unit_weights(w):
    """w / max(w), float32. q does not change with the scale of w, and this keeps extreme but valid weights
    (1e-45 or 3e38: subnormal products, sums that overflow) exact. Differentiable (autograd through max)."""
    w = w.double()  # K numbers: float64 keeps subnormal float32 weights exact
    return (w / w.max()).float()  # (K,), max 1


def minpp_loss_plain(logits, target, tau, w, ignore_index=-100):
    """The definition of the training loss: mean over scored rows of -log q_t, q = softmax(z + log c), i.e.
    F.cross_entropy(minpp_logits(z, tau, w), target), z = logits / T already. float32; (N, V) in memory --
    minpp_loss, right below, computes the same chunk by chunk."""
    return F.cross_entropy(minpp_logits(logits, tau, w), target, ignore_index=ignore_index)  # scalar


def minpp_loss(logits, target, tau, w, ignore_index=-100, chunk_rows=None):
    """Equal to minpp_loss_plain (mean over scored rows of -log q_t, float32), chunked, never (N, V) in memory:
    no (N, V) c is kept, backward recomputes chunk by chunk (_MinPPCrossEntropy, section 4), so memory stays that
    of the logits' gradient. A target with c_t = 0 has probability 0: its loss is +inf (math, not a bug) and a
    warning says how many and where. Gradients flow to logits and w."""
    scored = _check_loss_args(logits, target, tau, w, ignore_index, chunk_rows)  # (N,): rows whose target counts
    n, chunk_rows = int(scored.sum()), chunk_rows or max(1, CHUNK_LOGITS // logits.shape[1])
    log_tau = tau.to(logits.device, torch.float32).log()  # (K,), -inf for tau = 0
    w1 = unit_weights(w)  # q is scale-free in w; max 1 keeps extreme weights exact (grad: d w1 / d w by autograd)
    loss = _MinPPCrossEntropy.apply(logits, torch.where(scored, target, -1), log_tau, w1, chunk_rows, n)  # scalar
    if torch.isinf(loss):  # rare: name the rows (plain form, no grad); the mean of finite rows is finite
        with torch.no_grad():
            lz = minpp_logits(logits[scored], tau, w)  # (n, V)
            bad = torch.isinf(F.cross_entropy(lz, target[scored], reduction="none"))  # (n,)
            zero_c, rows = torch.isneginf(lz.gather(1, target[scored, None])[:, 0]) & bad, scored.nonzero()[:, 0][bad]
        warnings.warn(f"MinP+ loss is inf at {rows.numel()} target(s), first at row {rows[0].item()}: "
                      f"{int(zero_c.sum())} have c = 0 (below every threshold with weight > 0; add tau = 0 to the "
                      f"grid), {int(bad.sum() - zero_c.sum())} have a probability that underflows float32 (logits far "
                      "apart)")
    return loss


# ============================================================================
# 2. The learnable head and its training


class MinPPlusHead(nn.Module):
    """MinP+ as a module: tau a persistent buffer, w = softplus(theta) (theta = 0: w ~ 0.693). No pruning in
    forward (a hard zero would kill a weight's gradient for good): only at export (`active`) or inference."""

    def __init__(self, K=32, grid="log", tau_min=1e-3, tau=None):
        super().__init__()
        tau = threshold_grid(K, grid, tau_min) if tau is None else torch.as_tensor(tau, dtype=torch.float32)
        self.register_buffer("tau", tau)  # persistent: saved in state_dict
        self.theta = nn.Parameter(torch.zeros_like(tau))

    @property
    def w(self):
        return F.softplus(self.theta)  # (K,)

    def forward(self, probs):
        return minpp_probs(probs, self.tau, self.w)  # (N, V)

    def forward_logits(self, logits):
        return minpp_logits(logits, self.tau, self.w)  # (N, V)

    def active(self, min_share=1e-3):
        """(tau, w) pairs whose weight share w / sum(w) is >= min_share."""
        w = self.w.detach()  # (K,)
        keep = w / w.sum() >= min_share  # (K,) bool
        return self.tau[keep].clone(), w[keep].clone()  # (K',) each

    def save(self, path):
        """safetensors file (tau, theta), written to a temp file then renamed, with the umask's permissions; a failed
        write is one OSError naming the file."""
        from safetensors.torch import save_file
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file({"tau": self.tau.contiguous(), "theta": self.theta.detach().contiguous()}, tmp,
                      metadata={"format": "minpp-head-v1"})
            os.umask(mask := os.umask(0))  # read the umask (it can only be read by setting it)
            os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600
            os.replace(tmp, path)
        except Exception as e:  # safetensors' own error is not an OSError
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OSError(f"{path}: cannot write the head ({getattr(e, 'strerror', None) or e})") from None

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file
        try:
            t = load_file(str(path))
        except Exception as e:  # a missing, truncated or foreign file
            raise ValueError(f"{path}: not a readable head file ({type(e).__name__}: {e})") from None
        if set(t) != {"tau", "theta"} or t["tau"].dim() != 1 or t["theta"].shape != t["tau"].shape:
            raise ValueError(f"{path}: a head file holds 'tau' (K,) and 'theta' (K,), got "
                             f"{ {k: tuple(v.shape) for k, v in t.items()} }")
        check_thresholds(t["tau"], F.softplus(t["theta"].float()))
        head = cls(tau=t["tau"])
        with torch.no_grad():
            head.theta.copy_(t["theta"])
        return head

    def export_jsonl(self, path, min_share=1e-3):
        """One JSON object {"tau": ..., "w": ...} per active threshold."""
        tau, w = self.active(min_share)
        with open(path, "w") as f:
            for t, v in zip(tau.tolist(), w.tolist()):
                f.write(json.dumps({"tau": t, "w": v}) + "\n")


def threshold_grid(K=32, grid="log", tau_min=1e-3):
    """K thresholds with tau_1 = 0 (so the loss is always finite): 'log' = [0, geomspace(tau_min, 1, K-1)],
    'linear' = linspace(0, 1, K). float32."""
    if K < 2:
        raise ValueError(f"K must be >= 2 (tau = 0 plus at least one threshold), got {K}")
    if grid == "log":
        if not 0 < tau_min < 1:
            raise ValueError(f"tau_min must be in (0, 1), got {tau_min}")
        rest = torch.logspace(math.log10(tau_min), 0.0, K - 1, dtype=torch.float64)  # (K-1,)
        return torch.cat([torch.zeros(1, dtype=torch.float64), rest]).float()  # (K,)
    if grid == "linear":
        return torch.linspace(0, 1, K, dtype=torch.float64).float()  # (K,)
    raise ValueError(f"grid must be 'log' or 'linear', got {grid!r}")


@torch.no_grad()
def answer_logits(model, input_ids, labels, attention_mask=None):
    """Frozen base-model logits at answer positions: (n, V) float32 and targets (n,), using the causal-LM
    shift (position i predicts labels[i + 1]); rows whose label is -100 are dropped."""
    model.eval()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    tgt = labels[:, 1:]  # (B, T-1)
    keep = tgt != -100  # (B, T-1) bool
    return logits[keep].float(), tgt[keep]  # (n, V), (n,)


def train_head(head, logits, target=None, steps=300, lr=0.1, reg="entropy", lam=0.0, temperature=None, log_every=0):
    """Fit theta by Adam on CE(MinP+(logits / T), target) + lam * regulariser(w), T = temperature (default 1); logits
    are frozen (n, V), or give their BandStats (no target; made for head.tau, at T if T is given): one pass over
    (n, V) makes them, then every step is O(n K)."""
    _check_training(steps, lr, reg, lam, log_every)
    if isinstance(logits, BandStats):
        stats = logits
        if target is not None:
            raise ValueError("train_head got BandStats and a target: the statistics already hold their targets")
        if temperature is not None and temperature != stats.temperature:
            raise ValueError(f"temperature={temperature} but the statistics were made at {stats.temperature}: "
                             "make them at the temperature to train at")
        _check_stats(stats, head.tau)
    else:
        stats = band_statistics(logits, target, head.tau, 1.0 if temperature is None else temperature)
    check_thresholds(head.tau, head.w)
    opt = torch.optim.Adam([head.theta], lr=lr)
    for step in range(steps):
        loss = _band_loss(stats, head.w) + lam * regulariser(head.w, reg)  # scalar
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    return head


class BandStats(NamedTuple):
    """What the loss needs of each scored row for fixed tau (band_statistics): log p_t (N,), the target's band
    b = number of thresholds <= r_t (N,) in 0..K, band masses M (N, K), M_i = sum of p_v over r_v >= tau_i; a
    weight per row (N,) (ones by default), float64; and what made them: tau (K,) and the temperature. band_loss and
    train_head check them. Rows of several sets of one grid and temperature: BandStats.cat(sets)."""
    log_p: torch.Tensor
    band: torch.Tensor
    mass: torch.Tensor
    weight: torch.Tensor
    tau: torch.Tensor
    temperature: float

    @staticmethod
    def cat(sets):
        sets = list(sets)
        if not sets:
            raise ValueError("BandStats.cat got no statistics: give one set at least")
        for s in sets[1:]:
            if not torch.equal(s.tau, sets[0].tau) or s.temperature != sets[0].temperature:
                raise ValueError("BandStats.cat: the sets were made for different thresholds or temperatures")
        return BandStats(*(torch.cat(x) for x in list(zip(*sets))[:4]), sets[0].tau, sets[0].temperature)


@torch.no_grad()
def band_statistics(logits, target, tau, temperature=1.0, ignore_index=-100, weight=None, chunk_rows=None):
    """One chunked pass over (N, V) logits: z = logits / T, d = z - max z (= log r), per row the band sums
    H_j = sum of exp(d_v) over the tokens with j thresholds <= r_v (j = 0..K; summed in float32 as minpp_loss does,
    float64 from there), then log p_t = d_t - log sum_j H_j, b = the target's j, M_i = sum_{j >= i} H_j / sum_j H_j.
    Rows whose target is ignore_index are left out. weight: (N,) finite row weights >= 0 for band_loss (e.g. the
    base probability of the target, detached)."""
    T = _real("temperature", temperature, 0, math.inf, lo_open=True)
    scored = _check_loss_args(logits, target, tau, None, ignore_index, chunk_rows)  # (N,)
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // logits.shape[1])
    if weight is not None and not (torch.is_tensor(weight) and weight.shape == target.shape and
                                   bool(torch.isfinite(weight).all() and (weight >= 0).all()
                                        and weight[scored].sum() > 0)):
        raise ValueError(f"weight must be a ({target.numel()},) tensor of finite numbers >= 0, not all 0 on scored "
                         "rows")
    log_tau, out, ws = tau.to(logits.device, torch.float32).log(), [], None  # (K,)
    grid = _uniform_grid(log_tau)
    for s in range(0, logits.shape[0], chunk_rows):
        z, keep = logits[s:s + chunk_rows].float() / T, scored[s:s + chunk_rows]  # (c, V), (c,)
        m = _row_max(z, s)  # every row checked, as minpp_loss does; the error names the caller's row
        z, m = z[keep], m[keep]  # (n, V), (n, 1): the scored rows
        d_t = z.gather(1, target[s:s + chunk_rows][keep, None])[:, 0] - m[:, 0]  # (n,) log r_t
        if grid:  # evenly spaced thresholds: every token's band in O(1), as minpp_loss's fast path does
            ws = ws or _bucket_workspace(logits[:chunk_rows])
            e = torch.empty_like(z)  # (n, V)
            j, _ = _dense_buckets(z, m, log_tau, grid, e, ws)  # (n, V) in 0..K
        else:
            e = z - m  # (n, V)
            j = torch.bucketize(e, log_tau, right=True)  # (n, V) in 0..K
            e.exp_()
        H = torch.zeros(z.shape[0], tau.numel() + 1, device=z.device).scatter_add_(1, j, e).double()  # (n, K+1)
        Z = H.sum(1)  # (n,)
        mass = H.flip(1).cumsum(1).flip(1)[:, 1:] / Z[:, None]  # (n, K)
        out.append((d_t.double() - Z.log(), torch.bucketize(d_t, log_tau, right=True), mass))
    w = torch.ones(int(scored.sum()), dtype=torch.float64) if weight is None else weight[scored].double()  # (N,)
    return BandStats(*(torch.cat(x) for x in zip(*out)), w.to(logits.device), tau.detach().float().cpu().clone(), T)


def band_loss(stats, w):
    """minpp_loss from BandStats in O(N K): the weighted mean over rows of -log q_t =
    log(sum_i w_i M_i) - log(w_1 + ... + w_b) - log p_t, with w / max w (q is scale-free). float64 sums, float32
    result; +inf where a target's c = w_1 + ... + w_b is 0 (and a warning). Differentiable in w, which is checked
    as minpp_loss checks it (K entries for the statistics' K thresholds, finite, >= 0, not all 0)."""
    _check_stats(stats)
    check_thresholds(stats.tau, w)
    return _band_loss(stats, w)


def _band_loss(stats, w):
    w1 = unit_weights(w).to(stats.mass.device).double()  # (K,)
    row = (stats.mass @ w1).log() - F.pad(w1.cumsum(0), (1, 0))[stats.band].log() - stats.log_p  # (N,)
    loss = (stats.weight * row).sum() / stats.weight.sum()  # scalar
    if torch.isinf(loss):
        bad = torch.isinf(row).nonzero()[:, 0]
        warnings.warn(f"MinP+ loss is inf at {bad.numel()} row(s), first {bad[0].item()}: c = 0 at the target "
                      "(below every threshold with weight > 0; add tau = 0 to the grid)")
    return loss.float()


def regulariser(w, kind="entropy"):
    """'entropy': H(w / sum w) -- with total = CE + lam * H, lam > 0 SHARPENS (fewer active thresholds) and
    lam < 0 smooths. 'l1': sum(w)."""
    if kind in ("entropy", "l1"):
        return weight_entropy(w) if kind == "entropy" else w.float().sum()
    raise ValueError(f"regulariser must be 'entropy' or 'l1', got {kind!r}")


def weight_entropy(w):
    """H(pi), pi = w / sum(w), in nats (0 * log 0 = 0). float32."""
    pi = w.float() / w.float().sum()  # (K,)
    return -(pi * torch.log(pi.clamp_min(1e-30))).sum()


# ============================================================================
# 3. Bucketing tokens on a threshold grid (shared by the head's statistics and the fused loss)


def _uniform_grid(log_tau):
    """(space, c1, inv_h, n0, K) for evenly spaced thresholds: a token's bucket (number of thresholds <= r) is
    trunc(u), u = x / h + c1, x = log r ('log': positive thresholds evenly spaced in log tau) or r ('linear').
    Each float32 threshold must land within 1e-4 of its integer, so tokens with u 1e-3 or more from an integer
    are bucketed exactly (u is monotone in log r) and the few nearer ones are bucketized. None otherwise."""
    lt = log_tau.float().cpu()  # (K,)
    n0, K = int(torch.isneginf(lt).sum()), lt.numel()
    for space, x in (("log", lt[n0:]), ("linear", lt.exp())):
        first = n0 if space == "log" else 0  # bucket index of the first threshold of x, minus 1
        if x.numel() < 2 or not (x[-1] > x[0]):
            continue
        h = (x[-1].double() - x[0].double()).item() / (x.numel() - 1)
        inv_h, c1 = 1 / h, first + 1 - x[0].item() / h
        u = torch.mul(x, inv_h).add_(c1)  # (len(x),): should be whole numbers
        if (u - torch.arange(first + 1, first + 1 + x.numel())).abs().max() < 1e-4:
            return space, c1, inv_h, n0, K
    return None


def _bucket_workspace(z):
    """Chunk-sized buffers reused by every chunk (fresh large allocations cost page faults)."""
    return {"u": torch.empty(z.shape, device=z.device), "tmp": torch.empty(z.shape, device=z.device),
            "j": torch.empty(z.shape, dtype=torch.long, device=z.device),
            "near": torch.empty(z.shape, dtype=torch.bool, device=z.device)}


def _dense_buckets(z, m, log_tau, grid, e, ws, fix=None):
    """e = exp(z - m) written into e (float32), and every token's bucket (int64 (n, V), in ws); the tokens
    within 1e-3 of a threshold in u are bucketized exactly (fix = their (positions, buckets), found if None)."""
    space, c1, inv_h, n0, K = grid
    n = z.shape[0]
    u, tmp, j, near = (ws[k][:n] for k in ("u", "tmp", "j", "near"))  # (n, V) each
    torch.sub(z, m, out=e)
    if space == "log":
        torch.mul(e, inv_h, out=u).add_(c1)
    e.exp_()
    if space == "linear":
        torch.mul(e, inv_h, out=u).add_(c1)
    u.clamp_(n0 + 0.25, K + 0.25)  # below every positive threshold: bucket n0, and not "near" an integer
    j.copy_(u)  # trunc: the bucket
    if fix is None:
        torch.round(u, out=tmp).sub_(u).abs_()
        pos = torch.lt(tmp, 1e-3, out=near).view(-1).nonzero()[:, 0]  # (P,) flat positions
        d = z.reshape(-1)[pos].float() - m[pos // z.shape[1], 0]  # (P,)
        fix = pos, torch.bucketize(d, log_tau, right=True)
    j.view(-1)[fix[0]] = fix[1]
    return j, fix


# ============================================================================
# 4. Fast path: the fused, chunked loss behind minpp_loss (== minpp_loss_plain), never (N, V) in memory


class _MinPPCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log q_t, q = softmax(z + log c), chunk by chunk, no (N, V) c kept for backward. With m
    the row max, d = z - m (log r), e = exp(d), S = sum_v e_v c_v, c_v = prefix[bucket_v], H_j = sum of e over
    bucket j:  row loss = log S - d_t - log c_t,  dL/dz_v = e_v c_v / S - [v = t],
    dL/dprefix_j = H_j / S - [t in bucket j] / c_t,  dL/dw_i = sum_{j > i} dL/dprefix_j.  Buckets, exactly:
    - tokens below the smallest positive threshold share c_low, so S = c_low sum_v e_v + sum_{v above} e_v (c_v -
      c_low) and only those above are bucketized;
    - but when more than 1/8 of a chunk's tokens lie above it and the grid is evenly spaced (_uniform_grid),
      every token's bucket in O(1) instead; H (K + 1 per row) kept for dL/dw, the buckets recomputed in backward.
    Per-token work in float32; the sums over rows (the loss, dL/dw) accumulate in float64."""

    @staticmethod
    def _candidates(z, m, log_tau):
        """(n0, mask of the tokens that may lie above the smallest positive threshold): a cheap test on z with a
        margin of 1e-3 for rounding; the exact rule is bucketize on d."""
        n0 = int(torch.isneginf(log_tau).sum())  # thresholds at tau = 0 (at most one)
        if n0 == log_tau.numel():
            return n0, torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        return n0, z >= m + (log_tau[n0] - 1e-3)

    @staticmethod
    def _above(z, m, log_tau, cand=None):
        """The tokens with d = z - m >= log tau_min: n0, flat positions, rows, exp(d) and bucket (number of
        thresholds <= r)."""
        n0, mask = cand or _MinPPCrossEntropy._candidates(z, m, log_tau)
        pos = mask.view(-1).nonzero()[:, 0]
        rows = pos // z.shape[1]
        d = z.reshape(-1)[pos].float() - m[rows, 0]
        return n0, pos, rows, d.exp(), torch.bucketize(d, log_tau, right=True)

    @staticmethod
    def forward(ctx, logits, target, log_tau, w, chunk_rows, n):
        prefix = prefix_weights(w)  # (K+1,)
        grid = _uniform_grid(log_tau)
        scored = target >= 0  # (N,): ignored rows come in as -1
        t = target.clamp(min=0)  # (N,)
        total = logits.new_zeros((), dtype=torch.float64)  # finite row losses whose float32 sum would overflow
        stats = []
        buf = torch.empty(min(chunk_rows, logits.shape[0]), logits.shape[1], device=logits.device)  # reused
        ws = None  # the dense path's buffers, made when a chunk first needs them
        for s in range(0, logits.shape[0], chunk_rows):
            z, tc, sc = logits[s:s + chunk_rows], t[s:s + chunk_rows], scored[s:s + chunk_rows]
            m = _row_max(z, s).float()  # the max is exact in any dtype: no float32 copy of the chunk
            e = buf[:z.shape[0]]  # (n, V)
            cand = _MinPPCrossEntropy._candidates(z, m, log_tau)
            if grid and int(torch.count_nonzero(cand[1])) > z.numel() // 8:  # many above tau_min: O(1) buckets
                ws = ws or _bucket_workspace(buf)
                j, fix = _dense_buckets(z, m, log_tau, grid, e, ws)
                hist = torch.zeros(z.shape[0], prefix.numel(), device=z.device).scatter_add_(1, j, e)  # (n, K+1)
                S, keep = hist @ prefix, ("dense", hist, fix)
            else:  # few tokens above tau_min (or no even grid): bucketize those only
                e_sum = torch.sub(z, m, out=e).exp_().sum(-1)  # (n,)
                n0, pos, rows, e_pos, bucket = above = _MinPPCrossEntropy._above(z, m, log_tau, cand)
                S = prefix[n0] * e_sum  # (n,)
                S.index_add_(0, rows, e_pos * (prefix[bucket] - prefix[n0]))
                # keep the tokens above tau_min for backward unless they are many (flat distributions)
                keep = ("sparse", e_sum, above if pos.numel() <= z.numel() // 8 else None)
            d_t = z.gather(1, tc[:, None])[:, 0].float() - m[:, 0]  # (n,)
            row_loss = S.log() - d_t - prefix[torch.bucketize(d_t, log_tau, right=True)].log()  # (n,)
            total = total + row_loss[sc].double().sum()
            stats.append((m, S, d_t, keep))
        ctx.save_for_backward(logits, t, scored, log_tau, w)
        ctx.stats, ctx.chunk_rows, ctx.grid, ctx.n = stats, chunk_rows, grid, n
        return (total / n).float()  # the mean over the n scored rows

    @staticmethod
    def backward(ctx, grad_total):
        logits, t, scored, log_tau, w = ctx.saved_tensors
        prefix = prefix_weights(w)  # (K+1,)
        want_z, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_z = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if want_z else None
        g_prefix = torch.zeros_like(prefix, dtype=torch.float64)  # K + 1 sums of up to N V terms: float64
        ws = _bucket_workspace(logits[:ctx.chunk_rows]) if want_z and any(
            k[0] == "dense" for *_, k in ctx.stats) else None
        for (m, S, d_t, keep), s in zip(ctx.stats, range(0, logits.shape[0], ctx.chunk_rows)):
            z, tc = logits[s:s + ctx.chunk_rows], t[s:s + ctx.chunk_rows]
            g_row = scored[s:s + ctx.chunk_rows].float() * (grad_total / ctx.n)  # (n,) d mean / d row loss
            scale = g_row / S  # (n,)
            if want_w:
                b_t = torch.bucketize(d_t, log_tau, right=True)  # (n,)
                g_prefix.index_add_(0, b_t, (-g_row / prefix[b_t]).double())
            g = grad_z[s:s + ctx.chunk_rows] if want_z else None  # (n, V)
            if keep[0] == "dense":
                _, hist, fix = keep
                if want_w:
                    g_prefix += scale.double() @ hist.double()
                if want_z:  # g = e c scale, c from the buckets recomputed (the near ones as in forward)
                    j, _ = _dense_buckets(z, m, log_tau, ctx.grid, g, ws, fix)
                    c = torch.index_select(prefix, 0, j.view(-1), out=ws["u"][:z.shape[0]].view(-1))
                    g.mul_(c.view(g.shape)).mul_(scale[:, None])
            else:
                _, e_sum, above = keep
                n0, pos, rows, e_pos, bucket = above or _MinPPCrossEntropy._above(z, m, log_tau)
                if want_w:  # every token starts in bucket n0 (c_low); the ones above move to their own bucket
                    g_prefix[n0] += (e_sum * scale).double().sum() - (e_pos * scale[rows]).double().sum()
                    g_prefix.index_add_(0, bucket, (e_pos * scale[rows]).double())
                if want_z:  # q - onehot, scaled, in place in grad_z
                    torch.sub(z, m, out=g).exp_().mul_((prefix[n0] * scale)[:, None])
                    g.view(-1).index_add_(0, pos, e_pos * (prefix[bucket] - prefix[n0]) * scale[rows])
            if want_z:
                g.scatter_add_(1, tc[:, None], -g_row[:, None])
        grad_w = torch.flip(torch.cumsum(torch.flip(g_prefix, [0]), 0), [0])[1:].to(w.dtype) if want_w else None
        return grad_z.to(logits.dtype) if want_z else None, None, None, grad_w, None, None


# ============================================================================
# 5. The classic samplers: temperature, then top-k, top-p, min-p (transformers' order)


def next_token(logits, do_sample=True, generator=None, **filters):
    """(N,) token ids: argmax of the logits when do_sample is False (every filter keeps the argmax, and MinP+
    never lowers it: q/p grows with r), otherwise a draw from next_token_probs(logits, **filters)."""
    if not do_sample:
        _check_logits(logits)
        return logits.float().argmax(-1)  # (N,)
    return torch.multinomial(next_token_probs(logits, **filters), 1, generator=generator)[:, 0]


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, minpp=None, check=True):
    """The sampling distribution: softmax(z / T), then top-k, top-p, min-p, MinP+ (tau, w), each renormalised.
    The order is transformers' (temperature, top-k, top-p, min-p); vLLM applies min-p before top-k/top-p,
    which differs when filters are combined. float32 (N, V). check: as in minpp_probs."""
    p = torch.softmax(apply_temperature(logits, temperature), -1)  # (N, V)
    for apply, x in ((apply_top_k, top_k), (apply_top_p, top_p), (apply_min_p, min_p)):  # in this order
        p = p if x is None else apply(p, x)
    return p if minpp is None else minpp_probs(p, *minpp, check=check)


def apply_temperature(logits, temperature):
    """(z - max z) / T in float32: softmax(z / T) with the row max shifted to 0, so a tiny T never overflows
    (T -> 0 tends to argmax, ties shared; do_sample=False is argmax). T must be finite and > 0."""
    T = _real("temperature", temperature, 0, math.inf, lo_open=True)
    z = _check_logits(logits)  # (N, V)
    return (z - z.amax(-1, keepdim=True)) / T  # (N, V)


def apply_top_k(probs, k):
    """Keep p_v >= the k-th largest p (all ties with the k-th are kept: order-free), renormalise. float32."""
    if _real("top_k", k, 1, math.inf) != int(k):
        raise ValueError(f"top_k must be a whole number >= 1, got {k!r}")
    p = _check_probs(probs)  # (N, V)
    kth = torch.topk(p, min(int(k), p.shape[-1]), dim=-1).values[..., -1:]  # (N, 1)
    return _renormalise(p, p >= kth)


def apply_top_p(probs, top_p):
    """Nucleus: keep the smallest prefix (by descending p) with mass >= top_p, i.e. token i of the sorted
    order is kept iff s_1 + ... + s_(i-1) < top_p (an exclusive cumsum, shifted, not cumsum - s: that rounds);
    tokens tied with the last kept one are kept too (order-free). top_p = 1 keeps every token (a float32
    cumsum reaches 1.0 before the tail). float32, renormalised; the most likely token is always kept."""
    top_p = _real("top_p", top_p, 0, 1, lo_open=True)
    p = _check_probs(probs)  # (N, V)
    p = p / p.sum(-1, keepdim=True)  # (N, V)
    if top_p == 1:
        return p
    s = torch.sort(p, dim=-1, descending=True).values  # (N, V)
    before = F.pad(torch.cumsum(s, -1)[..., :-1], (1, 0))  # mass strictly before each sorted token
    kept = (before < top_p).sum(-1, keepdim=True)  # >= 1: before[0] = 0
    return _renormalise(p, p >= s.gather(-1, kept - 1))


def apply_min_p(probs, p_base):
    """Keep p_v >= p_base * max p (r_v >= p_base up to rounding; the boundary token is kept), renormalise.
    float32."""
    p_base = _real("p_base (min_p)", p_base, 0, 1)
    p = _check_probs(probs)  # (N, V)
    return _renormalise(p, p >= p_base * p.amax(-1, keepdim=True))


def _renormalise(p, keep):
    q = torch.where(keep, p, 0.0)  # (N, V)
    return q.div_(q.sum(-1, keepdim=True))


# ============================================================================
# 6. Generation and the transformers integration


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, *, do_sample=True, generator=None, attention_mask=None,
             eos_token_id=None, stop_strings=(), decode=None, **filters):
    """Up to max_new_tokens new tokens per row (a list of lists), with a KV cache; the filters (temperature, top_k,
    top_p, min_p, minpp=(tau, w)) go to next_token as given; do_sample alone decides sampling vs argmax. Left-padded
    prompts (attention_mask: 0s then 1s) get their real tokens' positions: each row generates what its prompt alone
    would. A row stops after a token of eos_token_id (an int, a list or a tensor of them), or after the first token
    after which its text contains a stop string (vLLM's and transformers' meaning; kept), looked for in its last 1 +
    (the longest stop string's UTF-8 bytes) tokens (a byte a token at least; 1 token of context: a dropped space)."""
    eos, stop_strings = _check_generate_args(model, input_ids, attention_mask, max_new_tokens, eos_token_id,
                                             stop_strings, decode, filters)
    if filters.get("minpp") is not None:
        check_thresholds(*filters["minpp"])  # once per call: per token it would copy tau and w to the host every step
    B = input_ids.shape[0]
    out = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    window = max((len(s.encode("utf-8")) + 1 for s in stop_strings), default=0)
    model.eval()
    dev = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev, torch.long)  # (B, T)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T): padding gets 0, real tokens 0, 1, ...
    done = torch.zeros(B, dtype=torch.bool)  # (B,)
    res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    for _ in range(max_new_tokens):
        tok = next_token(res.logits[:, -1], do_sample=do_sample, generator=generator, check=False, **filters)  # (B,)
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            tail = decode(out[i][-window:]) if window else ""
            if t in eos or any(s in tail for s in stop_strings):
                done[i] = True
        if done.all():
            break
        mask = F.pad(mask, (0, 1), value=1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=res.past_key_values, use_cache=True)
    return out


def minpp_logits_processor(tau, w, temperature=1.0):
    """A transformers LogitsProcessor for model.generate(..., logits_processor=[...]). User processors run BEFORE
    the temperature warper, so pass generate's T here: after temperature r' = r ** (1 / T), so r' >= tau  <=>
    r >= tau ** T on the raw z; it returns z + T log c (thresholds tau ** T), and generate then samples
    softmax(z / T + log c): "temperature, then MinP+". On tau = p_base (w = 1) it masks exactly what
    TemperatureLogitsWarper(T) + MinPLogitsWarper(p_base) mask. float32 inside, scores' dtype out."""
    from transformers import LogitsProcessor

    T = _real("temperature", temperature, 0, math.inf, lo_open=True)
    check_thresholds(tau, w)
    tau_T = (tau.double() ** T).float()  # (K,)
    try:
        check_thresholds(tau_T, w)
    except ValueError as e:
        raise ValueError(f"thresholds tau ** {T} collide in float32 ({e}): use fewer thresholds or T nearer 1") \
            from None

    class MinPPlusLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.tau, self.w = tau_T, w.float()

        def __call__(self, input_ids, scores):
            z = scores.float()  # (B, V)
            out = minpp_logits(z, self.tau.to(z.device), self.w.to(z.device), check=False)  # z + log c
            return torch.where(torch.isfinite(out), z + T * (out - z), out).to(scores.dtype)

    return MinPPlusLogitsProcessor()


# ============================================================================
# 7. Input checks: every bad input is an error that says what and where, checked once per public call


def check_thresholds(tau, w):
    """tau (K,) strictly increasing in [0, 1]; w (K,) finite, >= 0, sum > 0 (bucketize silently misbehaves on
    unsorted boundaries: not optional)."""
    if not torch.is_tensor(w):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    t = _check_tau(tau)
    if w.dim() != 1 or tau.numel() != w.numel():
        raise ValueError(f"tau and w must be 1-D of the same length K >= 1, got {tuple(tau.shape)} and "
                         f"{tuple(w.shape)}")
    wd = w.detach().double().cpu()
    for i, v in enumerate(wd.tolist()):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"weight w[{i}] = {v} (threshold tau[{i}] = {t[i]}) must be finite and >= 0")
    if wd.sum() <= 0:
        raise ValueError("all MinP+ weights are zero: no token could be kept")


def _check_tau(tau):
    """tau as a list of floats after checking it: a 1-D tensor, strictly increasing in [0, 1]."""
    if not torch.is_tensor(tau):
        raise TypeError(f"tau must be a tensor, got {type(tau).__name__}")
    if tau.dim() != 1 or tau.numel() == 0:
        raise ValueError(f"tau must be 1-D with K >= 1 thresholds, got shape {tuple(tau.shape)}")
    t = tau.detach().double().cpu().tolist()
    for i, v in enumerate(t):
        if not 0.0 <= v <= 1.0:  # also catches NaN
            raise ValueError(f"threshold tau[{i}] = {v} is outside [0, 1]")
        if i > 0 and v <= t[i - 1]:
            raise ValueError(f"thresholds must be strictly increasing: tau[{i - 1}] = {t[i - 1]} >= tau[{i}] = {v}")
    return t


def _check_training(steps, lr, reg, lam, log_every):
    for name, v in (("steps", steps), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "steps" else 0):
            raise ValueError(f"{name} must be a whole number >= {1 if name == 'steps' else 0}, got {v!r}")
    _real("lr", lr, 0, math.inf, lo_open=True)
    _real("lam", lam, -math.inf, math.inf)
    if reg not in ("entropy", "l1"):
        raise ValueError(f"regulariser must be 'entropy' or 'l1', got {reg!r}")


def _check_stats(stats, tau=None):
    """BandStats whose fields fit together (N rows, K thresholds) and, given tau, made for these thresholds (the loss
    of another grid would be wrong without any error)."""
    if not isinstance(stats, BandStats):
        raise TypeError(f"need the BandStats of band_statistics, got {type(stats).__name__}")
    n, k = stats.log_p.shape[:1], tuple(stats.tau.shape)
    shapes = {"log_p": n, "band": n, "mass": n + k, "weight": n}
    if any(tuple(getattr(stats, f).shape) != shape for f, shape in shapes.items()):
        raise ValueError("BandStats fields do not fit together: " + ", ".join(
            f"{f} {tuple(getattr(stats, f).shape)}" for f in shapes) + f" for {k[0]} thresholds")
    if not (torch.isfinite(stats.weight).all() and (stats.weight >= 0).all() and stats.weight.sum() > 0):
        raise ValueError("BandStats weight must be finite numbers >= 0, not all 0 (a NaN would train to NaN)")
    if tau is not None and (stats.tau.shape != tau.shape
                            or not torch.equal(stats.tau.cpu().float(), tau.detach().cpu().float())):
        raise ValueError(f"the statistics were made for other thresholds ({stats.tau.numel()} from "
                         f"{stats.tau[:3].tolist()}...) than the head's ({tau.numel()} from {tau[:3].tolist()}...)")


def _check_loss_args(logits, target, tau, w, ignore_index, chunk_rows):
    """(N,) mask of the scored rows, for minpp_loss / band_statistics (w None: tau alone), after checking the inputs."""
    if not (torch.is_tensor(logits) and torch.is_tensor(target)) or logits.dim() != 2 \
            or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be an (N, V) tensor and target (N,), got {getattr(logits, 'shape', logits)!r} "
                         f"and {getattr(target, 'shape', target)!r}")
    if logits.numel() == 0 or target.is_floating_point():
        raise ValueError(f"empty logits {tuple(logits.shape)} or {target.dtype} targets: need N, V >= 1 and token ids")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a whole number >= 1, got {chunk_rows!r}")
    check_thresholds(tau, w) if w is not None else _check_tau(tau)
    scored = target != ignore_index
    bad = scored & ((target < 0) | (target >= logits.shape[1]))
    if bad.any():
        i = bad.nonzero()[0].item()
        raise ValueError(f"target[{i}] = {target[i].item()} is outside [0, {logits.shape[1]}) and is not "
                         f"ignore_index={ignore_index}")
    if not scored.any():
        raise ValueError(f"every target equals ignore_index={ignore_index}: there is nothing to score")
    return scored


def _check_probs(probs):
    """fp32 probs; NaN, inf, negative entries and all-zero rows are errors. Fast path: one sum and one min."""
    if probs.dim() < 2 or probs.numel() == 0:
        raise ValueError(f"probs must be (..., V) with a batch dimension, at least one row and token, got shape "
                         f"{tuple(probs.shape)}")
    p = probs.float()
    total = p.sum(-1)  # NaN and inf propagate into the sums and the min
    if torch.isfinite(total).all() and (total > 0).all() and p.amin() >= 0:
        return p
    bad = ~torch.isfinite(p) | (p < 0)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"probs must be finite and >= 0; entry {idx} is {probs[tuple(idx)].item()}")
    raise ValueError(f"probs row {(~(total > 0)).nonzero()[0].tolist()} has no mass (all zero) or a sum that overflows")


def _check_logits(logits, row0=0):
    """fp32 logits; NaN, +inf and rows with no finite logit are errors (their softmax is undefined).
    row0: the global index of row 0 when logits is a chunk, so the message names the caller's row."""
    if logits.dim() < 2 or logits.numel() == 0:
        raise ValueError(f"logits must be (..., V) with a batch dimension, at least one row and token, got shape "
                         f"{tuple(logits.shape)}")
    z = logits.float()
    bad = torch.isnan(z) | (z == float("inf"))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"logits must not be NaN or +inf; entry {[idx[0] + row0] + idx[1:]} is "
                         f"{logits[tuple(idx)].item()}")
    dead = ~torch.isfinite(z).any(-1)
    if dead.any():
        idx = dead.nonzero()[0].tolist()
        raise ValueError(f"logits row {[idx[0] + row0] + idx[1:]} has no finite logit (all -inf)")
    return z


def _row_max(z, row0=0):
    """Row max of fp32 logits; a NaN, a +inf or a row with no finite logit is an error (one pass, not four)."""
    m = z.amax(-1, keepdim=True) if z.dim() >= 2 and z.numel() else None
    if m is None or not torch.isfinite(m).all():
        _check_logits(z, row0)  # finds and names the offending entry, row or shape
    return m


def _real(name, x, lo, hi, lo_open=False):
    """x as a float; not a real number (a str, None, NaN, inf, a bool) or outside the range is a ValueError."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not ok or x > hi or (x <= lo if lo_open else x < lo):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {x!r}")
    return float(x)


def _check_generate_args(model, input_ids, attention_mask, max_new_tokens, eos_token_id, stop_strings, decode,
                         filters):
    """(eos ids as a set, stop strings as a list) after checking every argument of generate."""
    unknown = sorted(set(filters) - {"temperature", "top_k", "top_p", "min_p", "minpp"})
    if unknown:
        raise ValueError(f"generate got {unknown}: the filters are temperature, top_k, top_p, min_p, minpp")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if t is not None and (not torch.is_tensor(t) or t.dim() != 2 or 0 in t.shape or t.is_floating_point()):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a (B, T) integer tensor with B, T >= 1 (a batch of prompts), got {shape}")
    vocab = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "num_embeddings", None)
    if ((input_ids < 0) | (input_ids >= (vocab or float("inf")))).any():
        raise ValueError(f"input_ids hold a token id outside the model's vocabulary [0, {vocab})")
    if attention_mask is not None:
        m = attention_mask.long()  # one rule for bool and integer masks: 0s then 1s, nothing else
        left_padding = ((m == 0) | (m == 1)).all() and (m[:, -1] == 1).all() and not (m.diff(dim=1) < 0).any()
        if m.shape != input_ids.shape or not left_padding:
            raise ValueError(f"attention_mask must be left padding of input_ids' shape {tuple(input_ids.shape)}: "
                             "0s then 1s in every row, the last column 1")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    eos = eos_token_id.tolist() if torch.is_tensor(eos_token_id) and eos_token_id.dim() <= 1 else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not (isinstance(eos, (list, tuple)) and all(type(e) is int and e >= 0 for e in eos)):
        raise ValueError(f"eos_token_id must be a token id >= 0, a list of them or an integer tensor (0-d or 1-d), "
                         f"got {eos_token_id!r}")
    stops = [] if stop_strings is None else stop_strings
    stops = list(stops) if not isinstance(stops, str) and hasattr(stops, "__iter__") else stops  # a generator: once
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
    if stops and decode is None:
        raise ValueError("stop_strings need a decode function")
    return set(eos), stops
