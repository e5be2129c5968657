"""The classic samplers (and MinP+'s probs form) as a plain float32 kernel would write them, from SPEC Part 2
(not from minpp_ref): a correct implementation with none of this project's extra promises, which must pass
the suite's core tier.

    PYTHONPATH=examples/candidates python -m pytest test_minpp.py --minpp-impl fp32_samplers

- temperature: softmax(logits / T) in float32 (transformers' TemperatureLogitsWarper divides the same way);
- top-p as transformers' formulation: token i of the descending order is dropped when cumsum_i - p_i >= top_p,
  on the row renormalised first (low-precision rows do not sum to 1); top_p = 1 keeps every token;
- top-k: every token >= the k-th largest; min-p: p >= p_base * max p; MinP+: q = p c / sum(p c);
- no input validation: a bad parameter gives whatever torch gives (the policy tier reports it).
"""
import torch


def _renormalise(p, keep):
    q = p * keep
    return q / q.sum(-1, keepdim=True)


def apply_top_k(probs, k):
    p = probs.float()
    kth = torch.topk(p, min(int(k), p.shape[-1]), dim=-1).values[..., -1:]
    return _renormalise(p, p >= kth)


def apply_top_p(probs, top_p):
    p = probs.float()
    p = p / p.sum(-1, keepdim=True)
    if top_p >= 1:
        return p
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    drop_sorted = (torch.cumsum(sorted_p, -1) - sorted_p) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return _renormalise(p, ~drop)


def apply_min_p(probs, p_base):
    p = probs.float()
    return _renormalise(p, p >= p_base * p.max(-1, keepdim=True).values)


def minpp_probs(probs, tau, w):
    p = probs.float()
    r = p / p.max(-1, keepdim=True).values
    c = ((tau.float() <= r[..., None]) * w.float()).sum(-1)  # (N, V): sum of w_i with tau_i <= r_v
    q = p * c
    return q / q.sum(-1, keepdim=True)


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, minpp=None):
    p = torch.softmax(logits.float() / temperature, -1)
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
    if not do_sample:
        return logits.float().argmax(-1)
    return torch.multinomial(next_token_probs(logits, **filters), 1, generator=generator)[:, 0]
