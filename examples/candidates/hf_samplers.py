"""Candidate adapter: transformers' own logits warpers as the classic samplers.

A correct third-party implementation, so the suite must pass it:
    PYTHONPATH=examples/candidates python -m pytest test_minpp.py --minpp-impl hf_samplers
Only apply_top_k / apply_top_p / apply_min_p are provided; everything MinP+ is "not provided" (skipped).
Each takes probabilities (N, V), masks with the warper on log p, and renormalises in float32.
"""
import math

import torch
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def _number(name, x, ok):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not ok(x):
        raise ValueError(f"bad {name}: {x!r}")


def _apply(warper, probs):
    p = probs.float()
    if p.dim() < 2 or not torch.isfinite(p).all() or (p < 0).any() or not (p.sum(-1) > 0).all():
        raise ValueError("probs must be (N, V), finite, >= 0, with positive row sums")
    keep = warper(None, p.log()) > float("-inf")
    return p * keep / (p * keep).sum(-1, keepdim=True)


def apply_top_k(probs, k):
    _number("top_k", k, lambda v: v >= 1 and v == int(v))
    return _apply(TopKLogitsWarper(int(k)), probs)


def apply_top_p(probs, top_p):
    _number("top_p", top_p, lambda v: 0 < v <= 1)
    if top_p == 1:  # transformers does not add the warper at 1.0 (its float32 cumsum would drop the tail)
        return _apply(lambda ids, z: z, probs)
    return _apply(TopPLogitsWarper(top_p), probs)


def apply_min_p(probs, p_base):
    _number("min_p", p_base, lambda v: 0 <= v <= 1)
    return _apply(MinPLogitsWarper(p_base), probs)
