"""A sparse JL projection of its own design, written from SPEC 1.5 (not from less_ref): each input coordinate i
sends x_i to s columns drawn INDEPENDENTLY (two may collide and add up) with random signs, scaled by 1/sqrt(s);
columns and signs come from a 32-bit multiply-xorshift hash of (seed, row, t), so the matrix does not depend
on blocks, batches, slices or the device. Another valid matrix, so it declares its own identity: the suite
skips only the matrix-equality tests and runs every JL / linearity / batch / slice / precision property on it.

    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl own_sjlt

The dense kind is not provided (NotImplementedError: a skip).
"""
import math

import torch

PROJECTION_KINDS = {"sjlt": "own-sjlt-independent-columns-v1"}
_MASK = 0xFFFFFFFF


def _mix(h):
    """A bijection of 32-bit values (h int64 in [0, 2^32)); 31-bit odd multipliers keep int64 products exact."""
    h = ((h ^ (h >> 16)) * 0x2C1B3C6D) & _MASK
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK
    return h ^ (h >> 15)


def _hash(seed, rows, t):
    """32 bits per (row, t): the row's low and high words enter in turn, so rows 2^32 apart differ."""
    h = _mix((rows & _MASK) ^ (seed & _MASK))
    h = _mix(h ^ (rows >> 32) ^ 0x5BD1E995)
    return _mix(h ^ (t * 0x3C6EF372 & _MASK))


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher", s=4, block=65536):
    if kind == "rademacher":
        raise NotImplementedError("own_sjlt provides the sparse kind only")
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    n, d = x.shape
    out = torch.zeros(proj_dim, n, device=x.device)  # transposed: index_add_ adds whole rows
    t = torch.arange(s, device=x.device, dtype=torch.int64)
    for a in range(0, d, block):
        rows = torch.arange(row_offset + a, row_offset + min(a + block, d), device=x.device, dtype=torch.int64)
        h = _hash(seed, rows[:, None], t)  # (rows, s)
        cols = h % proj_dim
        signs = 1.0 - 2.0 * (_mix(h ^ 0x7F4A7C15) & 1).float()
        xt = x[:, a:a + len(rows)].T.float()  # (rows, n)
        out.index_add_(0, cols.reshape(-1), (xt[:, None, :] * signs[..., None]).reshape(-1, n))
    out = out.T / math.sqrt(s)
    return out[0] if squeeze else out
