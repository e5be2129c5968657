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
from _projector_adapter import check_args, from_row_zero
from trak.projectors import BasicProjector, ProjectionType

PROJECTION = "trak-basic-rademacher-block100"
_MAX_OFFSET = 2 ** 20


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher"):
    check_args(proj_dim, seed, row_offset, kind, "TRAK has no sparse projector", _MAX_OFFSET)

    def project_rows(padded):
        proj = BasicProjector(grad_dim=padded.shape[1], proj_dim=proj_dim, seed=seed,
                              proj_type=ProjectionType.rademacher, device=x.device, block_size=100,
                              dtype=torch.float32)
        return proj.project(padded, model_id=0) / math.sqrt(proj_dim)
    return from_row_zero(x, row_offset, project_rows)
