"""Candidate adapter: dattri's BasicProjector (pip install dattri==0.3.0; pure Python, needs numpy and scipy) as
`project`.

dattri 0.3.0 projects on CPU with `BasicProjector` (the projector `make_random_projector` returns for a CPU device):
the matrix is filled block of 100 columns by block with torch.bernoulli_ seeded seed + 1000 * block, then scaled by
1/sqrt(k) -- another valid Rademacher matrix, so this module declares its own PROJECTION and the suite skips only
the clause that asks for the reference's bits (L4.4):
    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl dattri_projector
Row offsets are served by a projector over rows [0, row_offset + D) with x placed at its rows (the matrix's first
rows do not depend on the feature dimension), up to 2^20 (NotImplementedError beyond: a skip). dattri's sparse
kinds ("sjlt", "grass") run only in its CudaProjector with the compiled `sjlt` CUDA package: kind="sjlt" is
NotImplementedError here (a skip).
"""
import torch
from _projector_adapter import check_args, from_row_zero
from dattri.func.projection import BasicProjector, ProjectionType

PROJECTION = "dattri-basic-rademacher-block100"
_MAX_OFFSET = 2 ** 20


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher"):
    check_args(proj_dim, seed, row_offset, kind, "dattri's SJLT needs CUDA and the compiled sjlt package",
               _MAX_OFFSET)

    def project_rows(padded):
        proj = BasicProjector(feature_dim=padded.shape[1], proj_dim=proj_dim, seed=seed,
                              proj_type=ProjectionType.rademacher, device=x.device, block_size=100,
                              dtype=torch.float32)
        return proj.project(padded, ensemble_id=0)  # dattri divides by sqrt(proj_dim) itself
    return from_row_zero(x, row_offset, project_rows)
