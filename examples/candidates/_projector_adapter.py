"""What the third-party projector adapters (trak_projector, dattri_projector, bergson_projector) share: the argument
checks of `project` and, for libraries whose matrix starts at row 0, serving a row offset by padding. Not a
candidate itself."""
import torch


def check_args(proj_dim, seed, row_offset, kind, no_sjlt_because, max_offset=None):
    """SPEC L4.7's refusals; an unsupported kind or offset is NotImplementedError (the suite skips, naming it)."""
    if kind == "sjlt":
        raise NotImplementedError(f"kind='sjlt': {no_sjlt_because}")
    if kind != "rademacher":
        raise ValueError(f"kind must be 'rademacher' or 'sjlt', got {kind!r}")
    for name, v, lo in (("proj_dim", proj_dim, 1), ("seed", seed, 0), ("row_offset", row_offset, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")
    if max_offset is not None and row_offset > max_offset:
        raise NotImplementedError(f"row_offset={row_offset} > {max_offset}")


def from_row_zero(x, row_offset, project_rows):
    """project_rows(padded) for x (N, D) or (D,) placed at rows [row_offset, row_offset + D) of a zero float32
    (N, row_offset + D) input: a matrix generated from row 0 then serves any offset (at the cost of those rows)."""
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    padded = torch.zeros(x.shape[0], row_offset + x.shape[1], dtype=torch.float32, device=x.device)
    padded[:, row_offset:] = x.float()
    out = project_rows(padded)
    return out[0] if squeeze else out
