"""Candidate adapter: bergson's global projection (EleutherAI, bergson==2.5.1) as `project`.

bergson's `projection_target="global"` projects a flat gradient P (N, D) as P @ R.T / sqrt(k), R (k, D) streamed
in column blocks of 2^27 // k gradient coordinates, block `start` being `random_matrix(f"{identifier}/{start}", k,
width, "rademacher")`: Philox4x32-10 keyed by md5(identifier), one bit per entry, the same on every device. That is
an R of its own, so PROJECTION is declared and only L4.4 (the reference's bits) is skipped:
    pip install --no-deps bergson==2.5.1
    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl bergson_projector
`pip install bergson` pulls torch 2.14 with CUDA wheels, torchvision, torchaudio, datasets and bitsandbytes, and its
package __init__ imports them all; its projection module needs only numpy and torch, so when the package does not
import, this adapter loads that one file (bergson/collector/projection_matrix.py) with a stand-in logger. Any row
offset works (a block is named by its start). Blocks are generated a few columns at a time (bergson's own CPU path
generates a whole block: 512 MB at k = 8192). bergson has no sparse projection: kind="sjlt" is NotImplementedError.
"""
import importlib.util
import logging
import math
import os
import sys
import types

import numpy as np
import torch
from _projector_adapter import check_args

PROJECTION = "bergson-2.5.1-philox-rademacher-global"
IDENTIFIER = "flat/single/seed{seed}"  # bergson's projection_identifier(name, "single", seed) for one flat gradient
BLOCK_NUMEL = 1 << 27  # bergson.collector.collector.CHUNKED_PROJECTION_INSTANTIATION_NUMEL


def _projection_matrix_module():
    try:
        from bergson.collector import projection_matrix
        return projection_matrix
    except ImportError:  # bergson installed --no-deps: its __init__ needs datasets, jaxtyping, ...
        spec = importlib.util.find_spec("bergson")
        if spec is None:
            raise
        path = os.path.join(spec.submodule_search_locations[0], "collector", "projection_matrix.py")
        logger = types.ModuleType("bergson.utils.logger")
        logger.get_logger = lambda name=None, level=None, **_: logging.getLogger(name)
        saved = {k: sys.modules.get(k) for k in ("bergson", "bergson.utils", "bergson.utils.logger")}
        sys.modules.update({"bergson": types.ModuleType("bergson"), "bergson.utils": types.ModuleType("bergson.utils"),
                            "bergson.utils.logger": logger})
        try:
            file_spec = importlib.util.spec_from_file_location("_bergson_projection_matrix", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        finally:
            for k, v in saved.items():
                sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
        return module


_pm = _projection_matrix_module()


def block_columns(identifier, start, c0, c1, proj_dim):
    """Columns [c0, c1) of bergson's block `start` (k, width), as float32 (k, c1 - c0): random_matrix's CPU path."""
    k1, k2 = _pm._keys(f"{identifier}/{start}")
    return torch.from_numpy(_pm._rademacher_cpu(k1, k2, np.arange(proj_dim, dtype=np.uint32)[:, None], c0, c1))


def project(x, proj_dim, seed=0, row_offset=0, kind="rademacher"):
    check_args(proj_dim, seed, row_offset, kind, "bergson has no sparse projection")
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    ident, width = IDENTIFIER.format(seed=seed), max(1, BLOCK_NUMEL // proj_dim)
    step = max(128, (1 << 22) // proj_dim // 128 * 128)  # columns generated at a time
    out = torch.zeros(x.shape[0], proj_dim, dtype=torch.float32)
    lo, hi = row_offset, row_offset + x.shape[1]  # the gradient coordinates x holds
    for start in range(lo // width * width, hi, width):
        for a in range(max(lo, start), min(hi, start + width), step):
            b = min(a + step, hi, start + width)
            out.addmm_(x[:, a - lo:b - lo].float().cpu(), block_columns(ident, start, a - start, b - start, proj_dim).T)
    out = out.div_(math.sqrt(proj_dim)).to(x.device)
    return out[0] if squeeze else out
