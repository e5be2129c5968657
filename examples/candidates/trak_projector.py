"""Candidate adapter: TRAK's BasicProjector (pip install --no-deps traker) as `project`.

Another valid Rademacher matrix, so it declares its own identity: the suite skips only the test that asks for
the reference's matrix and runs every JL / linearity / batch / slice / precision property on it:
    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl trak_projector
TRAK applies no 1/sqrt(k) scale (added here) and its matrix depends on its block size (fixed here). Row
offsets are served by a projector over rows [0, row_offset + D) with x placed at its rows, so only offsets up
to 2^20 are supported (NotImplementedError beyond: a skip, not a failure); the sparse kind is not provided.
"""
import math

import torch
from trak.projectors import BasicProjector, ProjectionType

PROJECTION = "trak-basic-rademacher-block100"
_MAX_OFFSET = 2 ** 20


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher"):
    if kind == "sjlt":
        raise NotImplementedError("kind='sjlt': TRAK has no sparse projector")
    if kind != "rademacher":
        raise ValueError(f"kind must be 'rademacher' or 'sjlt', got {kind!r}")
    for name, v, lo in (("proj_dim", proj_dim, 1), ("seed", seed, 0), ("row_offset", row_offset, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")
    if row_offset > _MAX_OFFSET:
        raise NotImplementedError(f"row_offset={row_offset} > {_MAX_OFFSET}")
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    padded = torch.zeros(x.shape[0], row_offset + x.shape[1], dtype=torch.float32, device=x.device)
    padded[:, row_offset:] = x.float()
    proj = BasicProjector(grad_dim=padded.shape[1], proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.rademacher,
                          device=x.device, block_size=100, dtype=torch.float32)
    out = proj.project(padded, model_id=0) / math.sqrt(proj_dim)
    return out[0] if squeeze else out
