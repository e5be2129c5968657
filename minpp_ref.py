"""MinP+ reference: a learnable generalisation of min-p sampling.

MinP+ keeps min-p's scale-free test r = p / max p, but instead of one cut it
uses K fixed thresholds tau_1 < ... < tau_K in [0, 1] with learned weights
w_i = softplus(theta_i) >= 0:

    r_v = p_v / max_u p_u                    c_v = sum_{i : tau_i <= r_v} w_i
    q_v = p_v c_v / sum_u p_u c_u            (probs form)
    log q = log_softmax(z + log c)           (logits form, z = logits / T)

A single threshold tau = p_base with w = 1 is min-p; tau = 0 alone is plain
sampling. This file also has the classic samplers done right (temperature,
top-k, top-p, min-p), the head's training loss, generation, a transformers
LogitsProcessor and GSM8K answer checking. It imports with torch alone;
transformers and safetensors are imported inside the functions that need them.

Precision: every function computes in float32 whatever the input dtype
(fp32 / fp16 / bf16) and returns float32. Thresholds are compared in float32.

Run `python minpp_ref.py demo` for an offline end-to-end run on a tiny model.
"""
import json
import math
import os
import re
import warnings
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# input checks: every bad input is an error that says what and where


def check_thresholds(tau, w):
    """Validate MinP+ parameters: tau (K,) strictly increasing in [0, 1]; w (K,) finite, >= 0, sum > 0.

    bucketize silently misbehaves on unsorted boundaries, so this is not optional.
    """
    if tau.dim() != 1 or w.dim() != 1 or tau.numel() != w.numel() or tau.numel() == 0:
        raise ValueError(f"tau and w must be 1-D of the same length K >= 1, got {tuple(tau.shape)} and {tuple(w.shape)}")
    t, wd = tau.detach().double().cpu(), w.detach().double().cpu()
    for i, v in enumerate(t.tolist()):
        if not 0.0 <= v <= 1.0:  # also catches NaN
            raise ValueError(f"threshold tau[{i}] = {v} is outside [0, 1]")
        if i > 0 and v <= t[i - 1]:
            raise ValueError(f"thresholds must be strictly increasing: tau[{i - 1}] = {t[i - 1].item()} >= tau[{i}] = {v}")
    for i, v in enumerate(wd.tolist()):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"weight w[{i}] = {v} (threshold tau[{i}] = {t[i].item()}) must be finite and >= 0")
    if wd.sum() <= 0:
        raise ValueError("all MinP+ weights are zero: no token could be kept")


def _check_probs(probs):
    """fp32 probs; NaN, inf, negative entries and all-zero rows are errors. Fast path: one sum and one min."""
    if probs.dim() < 2:
        raise ValueError(f"probs must be (..., V) with a batch dimension, got shape {tuple(probs.shape)}")
    p = probs.float()
    total = p.sum(-1)  # NaN and inf propagate into the sums and the min
    if torch.isfinite(total).all() and (total > 0).all() and p.amin() >= 0:
        return p
    bad = ~torch.isfinite(p) | (p < 0)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"probs must be finite and >= 0; entry {idx} is {probs[tuple(idx)].item()}")
    empty = ~(total > 0)
    raise ValueError(f"probs row {empty.nonzero()[0].tolist()} has no mass (all zero) or a sum that overflows")


def _check_logits(logits, row0=0):
    """fp32 logits; NaN, +inf and rows with no finite logit are errors (their softmax is undefined).
    row0: the global index of row 0 when logits is a chunk, so the message names the caller's row."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V) with a batch dimension, got shape {tuple(logits.shape)}")
    z = logits.float()
    bad = torch.isnan(z) | (z == float("inf"))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        value = logits[tuple(idx)].item()
        idx[0] += row0
        raise ValueError(f"logits must not be NaN or +inf; entry {idx} is {value}")
    dead = ~torch.isfinite(z).any(-1)
    if dead.any():
        idx = dead.nonzero()[0].tolist()
        idx[0] += row0
        raise ValueError(f"logits row {idx} has no finite logit (all -inf)")
    return z


def _row_max(z, row0=0):
    """Row max of fp32 logits; a NaN, a +inf or a row with no finite logit is an error (one pass, not four)."""
    m = z.amax(-1, keepdim=True) if z.dim() >= 2 else None
    if m is None or not torch.isfinite(m).all():
        _check_logits(z, row0)  # finds and names the offending entry, row or shape
    return m


# ----------------------------------------------------------------------------
# the MinP+ transform


def unit_weights(w):
    """w / max(w), float32. q does not change with the scale of w, and this keeps extreme but valid weights
    (1e-45 or 3e38: subnormal products, sums that overflow) exact. Differentiable (autograd through max)."""
    w = w.double()  # K numbers: float64 keeps subnormal float32 weights exact
    return (w / w.max()).float()


def prefix_weights(w):
    """(K+1,) float32: prefix[j] = w_1 + ... + w_j, so c = prefix[number of thresholds passed]."""
    return F.pad(torch.cumsum(w.float(), 0), (1, 0))


def cumulative_weights(ratio_or_logratio, boundaries, w):
    """c_v = sum_{i: boundary_i <= x_v} w_i, via bucketize (count of boundaries <= x) and a prefix sum.

    fp32 in, fp32 out; boundaries are tau (probs form) or log tau (logits form).
    """
    prefix = prefix_weights(w)
    idx = torch.bucketize(ratio_or_logratio, boundaries.contiguous(), right=True)  # (N, V) in [0, K]
    return prefix[idx]


def minpp_probs(probs, tau, w):
    """Probs form: q = p * c / sum(p * c), c from r = p / max p. float32 in and out; rows sum to 1."""
    check_thresholds(tau, w)
    p = _check_probs(probs)
    p = p / p.sum(-1, keepdim=True)
    r = p / p.amax(-1, keepdim=True)  # (N, V) in [0, 1]; the max token has r == 1 exactly
    q = p * cumulative_weights(r, tau.to(p), unit_weights(w).to(p))
    return q / q.sum(-1, keepdim=True)  # sum > 0: the max token gets c = sum(w) > 0


def minpp_logits(logits, tau, w):
    """Logits form: returns z + log c (-inf where c = 0); r >= tau  <=>  z - max z >= log tau. No softmax.

    float32 in and out; pass z = logits / T for temperature T (temperature comes first). c is summed from
    w / max(w) and log max(w) added back, so weights near float32's limits (1e-45, 3e38) stay finite and exact.
    """
    check_thresholds(tau, w)
    z = logits.float()
    d = z + _row_max(z).neg()  # (N, V) <= 0, log r
    c = cumulative_weights(d, tau.to(z).log(), unit_weights(w).to(z))  # log 0 = -inf: tau = 0 passes every token
    return z + (c.log() + w.double().max().log().float().to(z.device))


def uniform_grid(log_tau):
    """(space, c1, inv_h, n0, K) when the thresholds are evenly spaced, so that the bucket of a token (the number
    of thresholds <= r) is trunc(x / h + c1) with x = log r ('log': the positive thresholds evenly spaced in
    log tau, as threshold_grid's 'log') or x = r ('linear': all of them evenly spaced in tau) -- O(1) per token
    instead of a search. Checked on the float32 thresholds themselves: each must land within 1e-4 of its
    integer, so a token whose u is 1e-3 or more from an integer is bucketed exactly (u is monotone in the
    token's log r); the few nearer ones are bucketized. None for other grids."""
    lt = log_tau.float().cpu()
    n0, K = int(torch.isneginf(lt).sum()), lt.numel()
    for space, x in (("log", lt[n0:]), ("linear", lt.exp())):
        first = n0 if space == "log" else 0  # bucket index of the first threshold of x, minus 1
        if x.numel() < 2 or not (x[-1] > x[0]):
            continue
        h = (x[-1].double() - x[0].double()).item() / (x.numel() - 1)
        inv_h, c1 = 1 / h, first + 1 - x[0].item() / h
        u = torch.mul(x, inv_h).add_(c1)
        if (u - torch.arange(first + 1, first + 1 + x.numel())).abs().max() < 1e-4:
            return space, c1, inv_h, n0, K
    return None


class _MinPPCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log q_t, q = softmax(z + log c), chunk by chunk, without an (N, V) c kept for backward.
    With m the row max, d = z - m (log r), e = exp(d), S = sum_v e_v c_v:

        row loss = log S - d_t - log c_t
        dL/dz_v = e_v c_v / S - [v = t]      dL/dprefix_j = H_j / S - [t in bucket j] / c_t

    with c_v = prefix[bucket_v] (prefix[j] = w_0 + ... + w_{j-1}), H_j = sum of e over bucket j, and
    dL/dw_i = sum_{j > i} dL/dprefix_j. Two ways to find the buckets, both exact:
    - an evenly spaced grid (threshold_grid's 'log' and 'linear'; uniform_grid): every token's bucket in O(1),
      the per-row histogram H (K + 1 numbers) kept for the weights' gradient, the buckets recomputed in
      backward for the logits' gradient;
    - any other grid: most tokens lie below the smallest positive threshold and share c_low, so
      S = c_low * sum_v e_v + sum_{v above} e_v (c_v - c_low) and only the tokens above are bucketized (kept for
      backward when they are at most 1/8 of a chunk). float32 throughout."""

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
    def _workspace(z):
        """Chunk-sized buffers reused by every chunk (fresh large allocations cost page faults)."""
        return {"u": torch.empty(z.shape, device=z.device), "tmp": torch.empty(z.shape, device=z.device),
                "j": torch.empty(z.shape, dtype=torch.long, device=z.device),
                "near": torch.empty(z.shape, dtype=torch.bool, device=z.device)}

    @staticmethod
    def _dense(z, m, log_tau, grid, e, ws, fix=None):
        """e = exp(z - m) written into e (float32), and every token's bucket (int64 (n, V), in ws); the tokens
        within 1e-3 of a threshold in u are bucketized exactly (fix = their (positions, buckets), found if None)."""
        space, c1, inv_h, n0, K = grid
        n = z.shape[0]
        u, tmp, j, near = (ws[k][:n] for k in ("u", "tmp", "j", "near"))
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
            pos = torch.lt(tmp, 1e-3, out=near).view(-1).nonzero()[:, 0]
            d = z.reshape(-1)[pos].float() - m[pos // z.shape[1], 0]
            fix = pos, torch.bucketize(d, log_tau, right=True)
        j.view(-1)[fix[0]] = fix[1]
        return j, fix

    @staticmethod
    def forward(ctx, logits, target, log_tau, w, chunk_rows):
        prefix = prefix_weights(w)
        grid = uniform_grid(log_tau)
        scored = target >= 0  # ignored rows come in as -1
        t = target.clamp(min=0)
        total = logits.new_zeros((), dtype=torch.float32)
        stats = []
        buf = torch.empty(min(chunk_rows, logits.shape[0]), logits.shape[1], device=logits.device)  # reused
        ws = None  # the dense path's buffers, made when a chunk first needs them
        for s in range(0, logits.shape[0], chunk_rows):
            z, tc, sc = logits[s:s + chunk_rows], t[s:s + chunk_rows], scored[s:s + chunk_rows]
            m = _row_max(z, s).float()  # the max is exact in any dtype: no float32 copy of the chunk
            e = buf[:z.shape[0]]
            cand = _MinPPCrossEntropy._candidates(z, m, log_tau)
            if grid and int(torch.count_nonzero(cand[1])) > z.numel() // 8:  # many above tau_min: O(1) buckets
                ws = ws or _MinPPCrossEntropy._workspace(buf)
                j, fix = _MinPPCrossEntropy._dense(z, m, log_tau, grid, e, ws)
                hist = torch.zeros(z.shape[0], prefix.numel(), device=z.device).scatter_add_(1, j, e)  # (n, K+1)
                S, keep = hist @ prefix, ("dense", hist, fix)
            else:  # few tokens above tau_min (or no even grid): bucketize those only
                e_sum = torch.sub(z, m, out=e).exp_().sum(-1)
                n0, pos, rows, e_pos, bucket = above = _MinPPCrossEntropy._above(z, m, log_tau, cand)
                S = prefix[n0] * e_sum
                S.index_add_(0, rows, e_pos * (prefix[bucket] - prefix[n0]))
                # keep the tokens above tau_min for backward unless they are many (flat distributions)
                keep = ("sparse", e_sum, above if pos.numel() <= z.numel() // 8 else None)
            d_t = z.gather(1, tc[:, None])[:, 0].float() - m[:, 0]
            row_loss = S.log() - d_t - prefix[torch.bucketize(d_t, log_tau, right=True)].log()
            total = total + row_loss[sc].sum()
            stats.append((m, S, d_t, keep))
        ctx.save_for_backward(logits, t, scored, log_tau, w)
        ctx.stats, ctx.chunk_rows, ctx.grid = stats, chunk_rows, grid
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, t, scored, log_tau, w = ctx.saved_tensors
        prefix = prefix_weights(w)
        want_z, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_z = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if want_z else None
        g_prefix = torch.zeros_like(prefix)
        ws = _MinPPCrossEntropy._workspace(logits[:ctx.chunk_rows]) if want_z and any(
            k[0] == "dense" for *_, k in ctx.stats) else None
        for (m, S, d_t, keep), s in zip(ctx.stats, range(0, logits.shape[0], ctx.chunk_rows)):
            z, tc = logits[s:s + ctx.chunk_rows], t[s:s + ctx.chunk_rows]
            g_row = scored[s:s + ctx.chunk_rows].float() * grad_total  # (n,) d total / d row loss
            scale = g_row / S
            if want_w:
                b_t = torch.bucketize(d_t, log_tau, right=True)
                g_prefix.index_add_(0, b_t, -g_row / prefix[b_t])
            g = grad_z[s:s + ctx.chunk_rows] if want_z else None
            if keep[0] == "dense":
                _, hist, fix = keep
                if want_w:
                    g_prefix += scale @ hist
                if want_z:  # g = e c scale, c from the buckets recomputed (the near ones as in forward)
                    j, _ = _MinPPCrossEntropy._dense(z, m, log_tau, ctx.grid, g, ws, fix)
                    c = torch.index_select(prefix, 0, j.view(-1), out=ws["u"][:z.shape[0]].view(-1))
                    g.mul_(c.view(g.shape)).mul_(scale[:, None])
            else:
                _, e_sum, above = keep
                n0, pos, rows, e_pos, bucket = above or _MinPPCrossEntropy._above(z, m, log_tau)
                if want_w:  # every token starts in bucket n0 (c_low); the ones above move to their own bucket
                    g_prefix[n0] += (e_sum * scale).sum() - (e_pos * scale[rows]).sum()
                    g_prefix.index_add_(0, bucket, e_pos * scale[rows])
                if want_z:  # q - onehot, scaled, in place in grad_z
                    torch.sub(z, m, out=g).exp_().mul_((prefix[n0] * scale)[:, None])
                    g.view(-1).index_add_(0, pos, e_pos * (prefix[bucket] - prefix[n0]) * scale[rows])
            if want_z:
                g.scatter_add_(1, tc[:, None], -g_row[:, None])
        grad_w = torch.flip(torch.cumsum(torch.flip(g_prefix, [0]), 0), [0])[1:].to(w.dtype) if want_w else None
        return grad_z.to(logits.dtype) if want_z else None, None, None, grad_w, None


def minpp_loss(logits, target, tau, w, ignore_index=-100, chunk_rows=None):
    """Mean over non-ignored rows of -log q_t with log q = log_softmax(z + log c), in float32.

    The plain form is F.cross_entropy(minpp_logits(z, tau, w), target) (see test_minpp.py's loss64); this
    computes the same without an (N, V) c and recomputes in backward, chunk by chunk, so memory stays that of
    the logits' gradient (see _MinPPCrossEntropy). A target with c_t = 0 has probability 0: its loss is +inf
    (math, not a bug) and a warning says how many and where. Gradients flow to logits and w."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    check_thresholds(tau, w)
    V = logits.shape[1]
    scored = target != ignore_index
    bad = scored & ((target < 0) | (target >= V))
    if bad.any():
        i = bad.nonzero()[0].item()
        raise ValueError(f"target[{i}] = {target[i].item()} is outside [0, {V}) and is not ignore_index={ignore_index}")
    n = int(scored.sum())
    if n == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}: there is nothing to score")
    log_tau = tau.to(logits.device, torch.float32).log()
    chunk_rows = chunk_rows or max(1, 2 ** 22 // V)
    w1 = unit_weights(w)  # q is scale-free in w; max 1 keeps extreme weights exact (grad: d w1 / d w by autograd)
    loss = _MinPPCrossEntropy.apply(logits, torch.where(scored, target, -1), log_tau, w1, chunk_rows) / n
    if torch.isinf(loss):  # rare: name the rows (plain form, no grad)
        with torch.no_grad():
            lz = minpp_logits(logits[scored], tau, w)
            rows_ce = F.cross_entropy(lz, target[scored], reduction="none")
            bad = torch.isinf(rows_ce)
            zero_c = torch.isneginf(lz.gather(1, target[scored, None])[:, 0]) & bad
            rows = scored.nonzero()[:, 0][bad]
        warnings.warn(f"MinP+ loss is inf at {rows.numel()} target(s), first at row {rows[0].item()}: "
                      f"{int(zero_c.sum())} have c = 0 (below every threshold with weight > 0; add tau = 0 to the grid), "
                      f"{int(bad.sum() - zero_c.sum())} have a probability that underflows float32 (logits far apart)")
    return loss


# ----------------------------------------------------------------------------
# the classic samplers: temperature, then top-k, top-p, min-p (transformers' order)


def _real(name, x, lo, hi, lo_open=False):
    """x as a float; not a real number (a str, None, NaN, inf, a bool) or outside the range is a ValueError."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not ok or x > hi or (x <= lo if lo_open else x < lo):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {x!r}")
    return float(x)


def apply_temperature(logits, temperature):
    """(z - max z) / T in float32: softmax(z / T) with the row max shifted to 0, so a tiny T never overflows
    (T -> 0 tends to argmax, ties shared; do_sample=False is argmax). T must be finite and > 0."""
    T = _real("temperature", temperature, 0, math.inf, lo_open=True)
    z = _check_logits(logits)
    return (z - z.amax(-1, keepdim=True)) / T


def _renormalise(p, keep):
    q = torch.where(keep, p, 0.0)
    return q.div_(q.sum(-1, keepdim=True))


def apply_top_k(probs, k):
    """Keep p_v >= the k-th largest p (all ties with the k-th are kept: order-free), renormalise. float32."""
    if _real("top_k", k, 1, math.inf) != int(k):
        raise ValueError(f"top_k must be a whole number >= 1, got {k!r}")
    p = _check_probs(probs)
    kth = torch.topk(p, min(int(k), p.shape[-1]), dim=-1).values[..., -1:]
    return _renormalise(p, p >= kth)


def apply_top_p(probs, top_p):
    """Nucleus: keep the smallest prefix (by descending p) with mass >= top_p, i.e. token i of the sorted
    order is kept iff s_1 + ... + s_(i-1) < top_p (an exclusive cumsum, shifted, not cumsum - s: that rounds);
    tokens tied with the last kept one are kept too (order-free). top_p = 1 keeps every token (a float32
    cumsum reaches 1.0 before the tail). float32, renormalised; the most likely token is always kept."""
    top_p = _real("top_p", top_p, 0, 1, lo_open=True)
    p = _check_probs(probs)
    p = p / p.sum(-1, keepdim=True)
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
    p = _check_probs(probs)
    return _renormalise(p, p >= p_base * p.amax(-1, keepdim=True))


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, minpp=None):
    """The sampling distribution: softmax(z / T), then top-k, top-p, min-p, MinP+ (tau, w), each renormalised.

    The order is transformers' (temperature, top-k, top-p, min-p); vLLM applies min-p before top-k/top-p,
    which differs when filters are combined. float32 (N, V)."""
    p = torch.softmax(apply_temperature(logits, temperature), -1)
    if top_k is not None:
        p = apply_top_k(p, top_k)
    if top_p is not None:
        p = apply_top_p(p, top_p)
    if min_p is not None:
        p = apply_min_p(p, min_p)
    if minpp is not None:
        p = minpp_probs(p, *minpp)
    return p


def next_token(logits, do_sample=True, generator=None, **filters):
    """(N,) token ids: argmax of the logits when do_sample is False (every filter keeps the argmax, and MinP+
    never lowers it: q/p grows with r), otherwise a draw from next_token_probs(logits, **filters)."""
    if not do_sample:
        _check_logits(logits)
        return logits.float().argmax(-1)
    return torch.multinomial(next_token_probs(logits, **filters), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------
# the learnable head


def threshold_grid(K=32, grid="log", tau_min=1e-3):
    """K thresholds with tau_1 = 0 (so the loss is always finite): 'log' = [0, geomspace(tau_min, 1, K-1)],
    'linear' = linspace(0, 1, K). float32."""
    if K < 2:
        raise ValueError(f"K must be >= 2 (tau = 0 plus at least one threshold), got {K}")
    if grid == "log":
        if not 0 < tau_min < 1:
            raise ValueError(f"tau_min must be in (0, 1), got {tau_min}")
        rest = torch.logspace(math.log10(tau_min), 0.0, K - 1, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), rest]).float()
    if grid == "linear":
        return torch.linspace(0, 1, K, dtype=torch.float64).float()
    raise ValueError(f"grid must be 'log' or 'linear', got {grid!r}")


class MinPPlusHead(nn.Module):
    """MinP+ as a module: tau is a persistent buffer, w = softplus(theta) (theta = 0 gives w ~ 0.693).

    No pruning inside forward: a hard zero on a small weight would kill its gradient for good.
    Prune only at export (`active`) or inference."""

    def __init__(self, K=32, grid="log", tau_min=1e-3, tau=None):
        super().__init__()
        tau = threshold_grid(K, grid, tau_min) if tau is None else torch.as_tensor(tau, dtype=torch.float32)
        self.register_buffer("tau", tau)  # persistent: saved in state_dict
        self.theta = nn.Parameter(torch.zeros_like(tau))

    @property
    def w(self):
        return F.softplus(self.theta)

    def forward(self, probs):
        return minpp_probs(probs, self.tau, self.w)

    def forward_logits(self, logits):
        return minpp_logits(logits, self.tau, self.w)

    def active(self, min_share=1e-3):
        """(tau, w) pairs whose weight share w / sum(w) is >= min_share."""
        w = self.w.detach()
        keep = w / w.sum() >= min_share
        return self.tau[keep].clone(), w[keep].clone()

    def save(self, path):
        from safetensors.torch import save_file

        save_file({"tau": self.tau.contiguous(), "theta": self.theta.detach().contiguous()}, str(path),
                  metadata={"format": "minpp-head-v1"})

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file

        t = load_file(str(path))
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


def weight_entropy(w):
    """H(pi), pi = w / sum(w), in nats (0 * log 0 = 0). float32."""
    pi = w.float() / w.float().sum()
    return -(pi * torch.log(pi.clamp_min(1e-30))).sum()


def regulariser(w, kind="entropy"):
    """'entropy': H(w / sum w) -- with total = CE + lam * H, lam > 0 SHARPENS (fewer active thresholds) and
    lam < 0 smooths. 'l1': sum(w)."""
    if kind == "entropy":
        return weight_entropy(w)
    if kind == "l1":
        return w.float().sum()
    raise ValueError(f"regulariser must be 'entropy' or 'l1', got {kind!r}")


@torch.no_grad()
def answer_logits(model, input_ids, labels, attention_mask=None):
    """Frozen base-model logits at answer positions: (n, V) float32 and targets (n,), using the causal-LM
    shift (position i predicts labels[i + 1]); rows whose label is -100 are dropped."""
    model.eval()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    tgt = labels[:, 1:]
    keep = tgt != -100
    return logits[keep].float(), tgt[keep]


def head_diagnostics(head, logits, target, min_share=1e-3):
    """Base CE vs MinP+ CE, H(pi), the number of active thresholds (weight share >= min_share) and the mean
    fraction of the vocabulary they keep (c > 0): what sampling with the pruned head would keep."""
    with torch.no_grad():
        tau, w = head.active(min_share)
        return {"base_ce": F.cross_entropy(logits.float(), target).item(),
                "minpp_ce": F.cross_entropy(head.forward_logits(logits), target).item(),
                "weight_entropy": weight_entropy(head.w).item(),
                "active": int(tau.numel()),
                "kept_fraction": torch.isfinite(minpp_logits(logits, tau, w)).float().mean().item()}


def train_head(head, logits, target, steps=300, lr=0.1, reg="entropy", lam=0.0, temperature=1.0, log_every=0):
    """Fit theta by Adam on CE(MinP+(logits / T), target) + lam * regulariser(w); logits are frozen (n, V)."""
    z = apply_temperature(logits, temperature)
    opt = torch.optim.Adam([head.theta], lr=lr)
    for step in range(steps):
        loss = minpp_loss(z, target, head.tau, head.w) + lam * regulariser(head.w, reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return head


# ----------------------------------------------------------------------------
# generation and the transformers integration


def _filters(method, temperature, top_k, top_p, min_p, minpp):
    allowed = {"none": {}, "top_k": {"top_k": top_k}, "top_p": {"top_p": top_p},
               "min_p": {"min_p": min_p}, "minpp": {"minpp": minpp}}
    if method not in allowed:
        raise ValueError(f"method must be one of {sorted(allowed)} or 'greedy', got {method!r}")
    f = allowed[method]
    if any(v is None for v in f.values()):
        raise ValueError(f"method {method!r} needs its parameter {list(f)[0]!r}")
    return dict(f, temperature=temperature)


def _check_generate_args(input_ids, attention_mask, max_new_tokens, stop_strings, decode):
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, T) tensor with B, T >= 1 (a batch of prompts), got {shape}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if not attention_mask[:, -1].all() or not (attention_mask.diff(dim=1) >= 0).all():
            raise ValueError("attention_mask must be left padding (0s then 1s, last column all 1): pad prompts on the left")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if isinstance(stop_strings, str) or not all(isinstance(x, str) and x for x in stop_strings):
        raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, method="none", do_sample=True, temperature=1.0, top_k=None,
             top_p=None, min_p=None, minpp=None, eos_token_id=None, stop_strings=(), decode=None, generator=None,
             attention_mask=None):
    """Sample up to max_new_tokens per row with a KV cache; returns a list of new-token lists.

    do_sample alone decides sampling vs argmax ("greedy" is do_sample=False). Prompts of different lengths
    are left-padded with attention_mask (B, T) of 0s then 1s: position ids count real tokens only and the
    mask grows with the cache, so each row generates what its prompt alone would. A row stops after eos or
    once the text of its last tokens ends with a stop string (decode(list_of_ids) -> str is called on a
    window of the last len(longest stop string) tokens, never on the whole sequence)."""
    if method == "greedy":
        method, do_sample = "none", False
    kw = _filters(method, temperature, top_k, top_p, min_p, minpp)
    _check_generate_args(input_ids, attention_mask, max_new_tokens, stop_strings, decode)
    B = input_ids.shape[0]
    out = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    window = max((len(s) for s in stop_strings), default=0)
    model.eval()
    dev = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev, torch.long)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T): padding gets 0, real tokens 0, 1, ...
    done = torch.zeros(B, dtype=torch.bool)
    res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    for _ in range(max_new_tokens):
        tok = next_token(res.logits[:, -1], do_sample=do_sample, generator=generator, **kw)
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            tail = decode(out[i][-window:]) if window else ""
            if t == eos_token_id or any(tail.endswith(s) for s in stop_strings):
                done[i] = True
        if done.all():
            break
        mask = F.pad(mask, (0, 1), value=1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=res.past_key_values, use_cache=True)
    return out


def minpp_logits_processor(tau, w, temperature=1.0):
    """A transformers LogitsProcessor: model.generate(..., logits_processor=[minpp_logits_processor(tau, w, T)]).

    transformers runs user processors BEFORE its own temperature warper, so for generate(temperature=T) pass
    the same T here. After temperature, r' = r ** (1 / T), so r' >= tau  <=>  r >= tau ** T on the raw z;
    the processor returns z + T log c (c from thresholds tau ** T) and, once generate divides by T, samples
    softmax(z / T + log c): "temperature, then MinP+". On one threshold tau = p_base (w = 1) it masks exactly
    what TemperatureLogitsWarper(T) + MinPLogitsWarper(p_base) mask. float32 inside, scores' dtype out."""
    from transformers import LogitsProcessor

    T = _real("temperature", temperature, 0, math.inf, lo_open=True)
    check_thresholds(tau, w)
    tau_T = (tau.double() ** T).float()
    try:
        check_thresholds(tau_T, w)
    except ValueError as e:
        raise ValueError(f"thresholds tau ** {T} collide in float32 ({e}): use fewer thresholds or T nearer 1") from None

    class MinPPlusLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.tau, self.w = tau_T, w.float()

        def __call__(self, input_ids, scores):
            z = scores.float()
            out = minpp_logits(z, self.tau.to(z.device), self.w.to(z.device))  # z + log c
            return torch.where(torch.isfinite(out), z + T * (out - z), out).to(scores.dtype)

    return MinPPlusLogitsProcessor()


# ----------------------------------------------------------------------------
# GSM8K answers


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


# ----------------------------------------------------------------------------
# demo: python minpp_ref.py demo


def minp_targets(logits, p_base, generator):
    """Targets drawn from min-p(p_base)-truncated softmax(logits): the data MinP+ should learn to imitate."""
    return torch.multinomial(apply_min_p(torch.softmax(logits.float(), -1), p_base), 1, generator=generator)[:, 0]


def demo(p_base=0.1, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # a wide init gives peaked next-token distributions
    model = LlamaForCausalLM(cfg).eval()
    # synthetic answers: continue random prompts with tokens from min-p(p_base) of the frozen model
    prompts = torch.randint(0, 96, (128, 8), generator=g)
    seqs = torch.tensor(generate(model, prompts, 24, method="min_p", min_p=p_base, generator=g))
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
    for method, kw in [("greedy", {}), ("none", {}), ("top_k", {"top_k": 5}), ("top_p", {"top_p": 0.9}),
                       ("min_p", {"min_p": p_base}), ("minpp", {"minpp": (head.tau, head.w.detach())})]:
        print(f"{method:7s}", generate(model, prompt, 12, method=method, generator=g, **kw)[0])


# ----------------------------------------------------------------------------
# command line: python minpp_ref.py {train, eval, generate, demo} --help


def _load(model, gguf_file=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(model, **kw).eval(), tok


def _prompt_text(tok, prompt):
    """The prompt as the model sees it: the chat template's user turn + generation prompt when there is one."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def _records(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "prompt" not in r or "answer" not in r:
            raise ValueError(f"{path}: record {n} needs 'prompt' and 'answer' (GSM8K style: '... #### 42')")
    return rows


def _answer_data(model, tok, rows, max_length):
    """Frozen logits at the answer tokens of every record (prompt as the model sees it, answer + eos): (n, V)."""
    from tqdm import tqdm

    zs, ts = [], []
    for r in tqdm(rows, desc="answer logits"):
        p = tok(_prompt_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        a = tok(r["answer"] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([(p + a)[:max_length]])
        labels = torch.tensor([([-100] * len(p) + a)[:max_length]])
        z, t = answer_logits(model, ids, labels)
        zs.append(z)
        ts.append(t)
    return torch.cat(zs), torch.cat(ts)


def _sampler(spec, head):
    """'greedy', 'none', 'top_k=50', 'top_p=0.9', 'min_p=0.1' or 'minpp' -> generate() keyword arguments."""
    name, _, value = spec.partition("=")
    if name == "greedy":
        return {"method": "greedy"}
    if name == "minpp":
        if head is None:
            raise ValueError("the 'minpp' sampler needs --head")
        return {"method": "minpp", "minpp": (head.tau, head.w.detach())}
    if name not in ("none", "top_k", "top_p", "min_p") or (name != "none") != bool(value):
        raise ValueError(f"sampler {spec!r}: use greedy, none, top_k=K, top_p=P, min_p=P or minpp")
    return {"method": name, **({name: int(value) if name == "top_k" else float(value)} if value else {})}


def _cli(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="minpp_ref.py", description="MinP+ heads: train, evaluate, generate.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fit a head on a frozen model's distributions at reference answers")
    e = sub.add_parser("eval", help="GSM8K-style accuracy per sampler and temperature")
    g = sub.add_parser("generate", help="continue one prompt")
    for p in (t, e, g):
        p.add_argument("--model", required=True, help="model directory or hub id")
        p.add_argument("--gguf-file", help="GGUF file inside --model")
    t.add_argument("--data", required=True, help="JSONL of {prompt, answer}")
    t.add_argument("--K", type=int, default=32)
    t.add_argument("--grid", default="log", choices=["log", "linear"])
    t.add_argument("--tau-min", type=float, default=1e-3)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--reg", default="entropy", choices=["entropy", "l1"])
    t.add_argument("--lam", type=float, default=0.0, help="lam > 0 sharpens (fewer active thresholds)")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--max-length", type=int, default=1024)
    t.add_argument("--out", required=True, help="head.safetensors (and its .jsonl export beside it)")
    e.add_argument("--data", required=True, help="JSONL of {prompt, answer}; answers end in '#### N'")
    e.add_argument("--head", help="a trained head (for the minpp sampler)")
    e.add_argument("--samplers", default="greedy,top_p=0.9,min_p=0.1,minpp")
    e.add_argument("--temperatures", default="0.7,1.0,1.5")
    e.add_argument("--n-samples", type=int, default=1)
    e.add_argument("--batch-size", type=int, default=8)
    for p in (e, g):
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt", required=True)
    g.add_argument("--sampler", default="greedy")
    g.add_argument("--head")
    g.add_argument("--temperature", type=float, default=1.0)
    sub.add_parser("demo", help="an offline end-to-end run on a tiny model")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        return demo()
    model, tok = _load(a.model, a.gguf_file)
    if a.cmd == "train":
        z, target = _answer_data(model, tok, _records(a.data), a.max_length)
        head = MinPPlusHead(K=a.K, grid=a.grid, tau_min=a.tau_min)
        train_head(head, z, target, steps=a.steps, lr=a.lr, reg=a.reg, lam=a.lam, temperature=a.temperature,
                   log_every=max(1, a.steps // 10))
        d = head_diagnostics(head, apply_temperature(z, a.temperature), target)
        print(f"{target.numel()} answer tokens: cross-entropy {d['base_ce']:.4f} (base) -> {d['minpp_ce']:.4f} (MinP+); "
              f"{d['active']} active thresholds keep {100 * d['kept_fraction']:.1f}% of the vocabulary")
        head.save(a.out)
        head.export_jsonl(os.path.splitext(a.out)[0] + ".jsonl")
        print(f"head -> {a.out}")
        return
    head = MinPPlusHead.load(a.head) if a.head else None
    g_ = torch.Generator().manual_seed(a.seed)
    if a.cmd == "generate":
        enc = tok([_prompt_text(tok, a.prompt)], return_tensors="pt", add_special_tokens=False)
        out = generate(model, enc.input_ids, a.max_new_tokens, temperature=a.temperature, attention_mask=enc.attention_mask,
                       eos_token_id=tok.eos_token_id, generator=g_, **_sampler(a.sampler, head))
        print(tok.decode(out[0], skip_special_tokens=True))
        return
    rows = _records(a.data)
    samplers, temps = a.samplers.split(","), [float(x) for x in a.temperatures.split(",")]
    from tqdm import tqdm

    table = {}
    for spec in samplers:
        for T in temps if spec != "greedy" else temps[:1]:
            right = 0
            for b in tqdm(range(0, len(rows), a.batch_size), desc=f"{spec} T={T}", leave=False):
                batch = rows[b:b + a.batch_size]
                enc = tok([_prompt_text(tok, r["prompt"]) for r in batch], return_tensors="pt", padding=True,
                          add_special_tokens=False)
                for _ in range(a.n_samples if spec != "greedy" else 1):
                    outs = generate(model, enc.input_ids, a.max_new_tokens, temperature=T, attention_mask=enc.attention_mask,
                                    eos_token_id=tok.eos_token_id, generator=g_, **_sampler(spec, head))
                    right += sum(answers_match(tok.decode(o, skip_special_tokens=True), r["answer"]) for o, r in zip(outs, batch))
            n = len(rows) * (a.n_samples if spec != "greedy" else 1)
            table[spec, T] = right / n
            print(f"{spec:12s} T={T:<4}  accuracy {right}/{n} = {right / n:.3f}", flush=True)
    return table


if __name__ == "__main__":
    _cli()
