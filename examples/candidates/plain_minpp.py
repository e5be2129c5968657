"""An independent MinP+ / sampler implementation, written from SPEC Part 2's formulas (not from minpp_ref):
dense broadcasting instead of bucketize, the plain cross-entropy loss, ascending-sort nucleus; the band statistics
and train_head (M2.3, M2.4) in float64 without the optional chunk_rows. Its logits keep
the input dtype (bf16 in, bf16 out), another correct design the suite must accept.
    PYTHONPATH=examples/candidates python -m pytest test_minpp.py --minpp-impl plain_minpp
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _num(name, x, lo, hi, lo_open=False):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if x > hi or x < lo or (lo_open and x == lo):
        raise ValueError(f"{name} = {x} is out of range")
    return x


def _params(tau, w):
    tau, w = torch.as_tensor(tau, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)
    if tau.dim() != 1 or tau.shape != w.shape or not len(tau):
        raise ValueError("tau and w must be 1-D of one length")
    if not ((tau >= 0) & (tau <= 1)).all() or not (tau[1:] > tau[:-1]).all():
        raise ValueError("tau must be strictly increasing in [0, 1]")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() == 0:
        raise ValueError("w must be finite, >= 0, not all zero")
    return tau, w / w.max()


def _c(x, bounds, w):
    """c = sum_i w_i [bound_i <= x], dense over K (fine for K <= a few dozen)."""
    return ((bounds <= x[..., None]).to(w.dtype) * w).sum(-1)


def _probs(probs):
    p = probs.double()
    if p.dim() != 2 or not torch.isfinite(p).all() or (p < 0).any() or (p.sum(-1) <= 0).any():
        raise ValueError("probs must be (N, V), finite, >= 0 and not all zero in a row")
    return p / p.sum(-1, keepdim=True)


def _logits(z):
    if z.dim() != 2 or torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all(-1).any():
        raise ValueError("logits must be (N, V) with no NaN / +inf and a finite entry per row")
    return z.double()


def minpp_probs(probs, tau, w):
    tau, w = _params(tau, w)
    p = _probs(probs)
    q = p * _c(p / p.max(-1, keepdim=True).values, tau, w)
    return (q / q.sum(-1, keepdim=True)).float()


def minpp_logits(logits, tau, w):
    tau, w = _params(tau, w)
    z = _logits(logits)
    m = z.max(-1, keepdim=True).values
    out = z + _c(z - m, tau.log(), w).log()  # w scaled to max 1: z + log c shifted by -log max w, allowed
    return out.to(logits.dtype)


def minpp_loss(logits, target, tau, w, ignore_index=-100):
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError("logits (N, V) and target (N,)")
    ok = target != ignore_index
    if not ok.any() or ((target[ok] < 0) | (target[ok] >= logits.shape[1])).any():
        raise ValueError("targets must be in [0, V) or ignore_index, and at least one scored")
    tau_, w_ = _params(tau, w)  # validation only
    _logits(logits)
    tau = torch.as_tensor(tau, dtype=torch.float32)
    wt = w if torch.is_tensor(w) else torch.as_tensor(w)
    wt = wt / wt.detach().max()
    z = logits.float()
    d = z - z.detach().max(-1, keepdim=True).values
    c = ((tau.log() <= d[..., None]).float() * wt.float()).sum(-1)
    return F.cross_entropy(z + c.log(), target, ignore_index=ignore_index)


def apply_top_k(probs, k):
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k != int(k) or k < 1:
        raise ValueError(f"bad top_k {k!r}")
    p = _probs(probs)
    kth = p.sort(-1, descending=True).values[:, min(int(k), p.shape[1]) - 1:][:, :1]
    q = torch.where(p >= kth, p, 0.0)
    return (q / q.sum(-1, keepdim=True)).float()


def apply_top_p(probs, top_p):
    _num("top_p", top_p, 0, 1, lo_open=True)
    p = _probs(probs)
    s, order = p.sort(-1)  # ascending: drop the low tail whose mass stays <= 1 - top_p
    tail = s.cumsum(-1) <= 1 - top_p
    tail[:, -1] = False
    drop = torch.zeros_like(tail).scatter(-1, order, tail)
    q = torch.where(drop & (p < s.gather(-1, (~tail).long().argmax(-1, keepdim=True))), 0.0, p)
    return (q / q.sum(-1, keepdim=True)).float()


def apply_min_p(probs, p_base):
    _num("min_p", p_base, 0, 1)
    p = _probs(probs)
    q = torch.where(p >= p_base * p.max(-1, keepdim=True).values, p, 0.0)
    return (q / q.sum(-1, keepdim=True)).float()


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, minpp=None):
    _num("temperature", temperature, 0, math.inf, lo_open=True)
    z = _logits(logits)
    z = (z - z.max(-1, keepdim=True).values) / temperature
    p = torch.softmax(z, -1)
    for f, arg in ((apply_top_k, top_k), (apply_top_p, top_p), (apply_min_p, min_p)):
        if arg is not None:
            p = f(p, arg)
    return minpp_probs(p, *minpp) if minpp is not None else p.float()


def next_token(logits, do_sample=True, generator=None, **filters):
    if not do_sample:
        return _logits(logits).argmax(-1)
    return torch.multinomial(next_token_probs(logits, **filters), 1, generator=generator)[:, 0]


# --- the head and its training (SPEC M2.3, M2.4), from the formulas alone: dense float64, no chunking (no chunk_rows)
class BandStats(NamedTuple):
    log_p: torch.Tensor  # (N,) log p_t
    band: torch.Tensor  # (N,) b = #{i : tau_i <= r_t}
    mass: torch.Tensor  # (N, K) M_i = sum_v p_v [r_v >= tau_i]
    weight: torch.Tensor  # (N,)
    tau: torch.Tensor
    temperature: float

    @staticmethod
    def cat(sets):
        sets = list(sets)
        if not sets or any(not torch.equal(s.tau, sets[0].tau) or s.temperature != sets[0].temperature for s in sets):
            raise ValueError("BandStats.cat needs one set at least, all of one grid and temperature")
        return BandStats(*(torch.cat(x) for x in list(zip(*sets))[:4]), sets[0].tau, sets[0].temperature)


def band_statistics(logits, target, tau, temperature=1.0, ignore_index=-100, weight=None):
    T = _num("temperature", temperature, 0, math.inf, lo_open=True)
    tau64, _ = _params(tau, torch.ones(len(tau)))
    z = _logits(logits) / T
    if target.shape != z.shape[:1] or target.is_floating_point():
        raise ValueError("target must be (N,) token ids")
    keep = target != ignore_index
    if not keep.any() or ((target[keep] < 0) | (target[keep] >= z.shape[1])).any():
        raise ValueError("targets must be in [0, V) or ignore_index, and at least one scored")
    if weight is not None and (weight.shape != target.shape or not torch.isfinite(weight).all() or (weight < 0).any()
                               or weight[keep].sum() <= 0):
        raise ValueError("weight must be (N,), finite, >= 0, not all 0 on scored rows")
    p = torch.softmax(z[keep], -1)
    passed = tau64 <= (p / p.max(-1, keepdim=True).values)[..., None]  # (n, V, K)
    rows, t = torch.arange(p.shape[0]), target[keep]
    w = torch.ones(p.shape[0], dtype=torch.float64) if weight is None else weight[keep].double()
    return BandStats(p[rows, t].log(), passed[rows, t].sum(-1), (p[..., None] * passed).sum(1), w,
                     torch.as_tensor(tau, dtype=torch.float32).clone(), T)


def _stats(stats, tau=None):
    if not isinstance(stats, BandStats):
        raise TypeError("need BandStats")
    n, K = stats.log_p.shape[0], stats.tau.numel()
    if stats.band.shape != (n,) or stats.mass.shape != (n, K) or stats.weight.shape != (n,):
        raise ValueError("BandStats fields do not fit together")
    wt = stats.weight
    if not torch.isfinite(wt).all() or (wt < 0).any() or wt.sum() <= 0:
        raise ValueError("BandStats weight must be finite, >= 0 and not all 0")
    if tau is not None and (tau.shape != stats.tau.shape or not torch.equal(tau.float(), stats.tau.float())):
        raise ValueError("the statistics were made for other thresholds")


def band_loss(stats, w):
    _stats(stats)
    _, w = _params(stats.tau, w)  # checked, divided by its max (q is scale-free), float64, differentiable
    row = (stats.mass @ w).log() - F.pad(w.cumsum(0), (1, 0))[stats.band].log() - stats.log_p
    return ((stats.weight * row).sum() / stats.weight.sum()).float()


class MinPPlusHead(torch.nn.Module):
    def __init__(self, K=32, grid="log", tau_min=1e-3, tau=None):
        super().__init__()
        if tau is None:
            if grid not in ("log", "linear"):
                raise ValueError(f"grid must be 'log' or 'linear', got {grid!r}")
            tau = torch.linspace(0, 1, K, dtype=torch.float64) if grid == "linear" else torch.cat(
                [torch.zeros(1, dtype=torch.float64), torch.logspace(math.log10(tau_min), 0, K - 1, dtype=torch.float64)])
        self.register_buffer("tau", torch.as_tensor(tau, dtype=torch.float32))
        self.theta = torch.nn.Parameter(torch.zeros(self.tau.shape))

    @property
    def w(self):
        return F.softplus(self.theta)

    def forward(self, probs):
        return minpp_probs(probs, self.tau, self.w)

    def save(self, path):
        from safetensors.torch import save_file
        save_file({"tau": self.tau.contiguous(), "theta": self.theta.detach().contiguous()}, str(path))

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file
        t = load_file(str(path))
        head = cls(tau=t["tau"])
        with torch.no_grad():
            head.theta.copy_(t["theta"])
        return head


def train_head(head, logits, target=None, steps=300, lr=0.1, reg="entropy", lam=0.0, temperature=None, log_every=0):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or reg not in ("entropy", "l1"):
        raise ValueError("steps must be a whole number >= 1 and reg 'entropy' or 'l1'")
    _num("lr", lr, 0, math.inf, lo_open=True)
    _num("lam", lam, -math.inf, math.inf)
    if isinstance(logits, BandStats):
        if target is not None or (temperature is not None and temperature != logits.temperature):
            raise ValueError("BandStats hold their targets and temperature: no target, the same temperature")
        _stats(logits, head.tau)
        stats = logits
    else:
        stats = band_statistics(logits, target, head.tau, 1.0 if temperature is None else temperature)
    opt = torch.optim.Adam([head.theta], lr=lr)
    for _ in range(steps):
        w = head.w.double()
        pi = w / w.sum()
        penalty = -(pi * pi.clamp_min(1e-300).log()).sum() if reg == "entropy" else w.sum()
        loss = band_loss(stats, w) + lam * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head
