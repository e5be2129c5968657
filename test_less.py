"""Conformance suite for LESS gradient features, projection, matching and selection (SPEC Part 1).

Part A reaches the implementation only through the `impl` fixture (less_ref, or --less-impl NAME) and
compares it with computations written here: float64 formulas, a per-example autograd loop over a tiny
Llama, optimizer moments read straight from torch.optim, the storage contract under 1, 2 and 3 gloo ranks.
Part B tests reference-only internals (hash arithmetic, chunk files, fake ranks, the demo) on less_ref
itself; it is deselected when a candidate is named.
"""
import json
import math
import os
import re

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import REFUSED, TOL, word_tokenizer

IMPL_KIND = "less"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, msg="", dtype=torch.float32):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{msg}\n{m}")


def adam64(g, m, v, eps_outside=False):
    """The Adam feature in float64: m_hat / sqrt(v_hat + eps) (eps outside the root when asked)."""
    g, m, v = g.double(), m.double(), v.double()
    m_hat, v_hat = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return m_hat / (v_hat.sqrt() + 1e-8) if eps_outside else m_hat / (v_hat + 1e-8).sqrt()


def assert_projections_close(a, b, x, k):
    """Equal up to float32 summation order: |a - b| <= 1e-5 |x|_1 / sqrt(k) (entries can cancel to ~0)."""
    bound = 1e-5 * x.double().abs().sum(-1, keepdim=True) / math.sqrt(k) + 1e-30
    assert ((a.double() - b.double()).abs() <= bound).all(), (a - b).abs().max()


@st.composite
def matrix(draw, max_rows=6, max_cols=300, name="x"):
    n = draw(st.integers(1, max_rows), label=f"{name} rows")
    d = draw(st.integers(1, max_cols), label=f"{name} cols")
    seed = draw(st.integers(0, 2 ** 31 - 1), label=f"{name} seed")
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0]), label=f"{name} scale")
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ============================================================================
# Part A: properties, through impl

# --- Adam features


@pytest.mark.parametrize("dtype", DTYPES)
@given(g=matrix(), mseed=st.integers(0, 2 ** 31 - 1), vscale=st.sampled_from([0.0, 1e-12, 1e-8, 1.0]))
def test_adam_features_formula(impl, dtype, g, mseed, vscale):
    """m_hat / sqrt(v_hat + eps), eps inside, no bias correction; low-precision grads computed in fp32."""
    gen = torch.Generator().manual_seed(mseed)
    m = torch.randn(g.shape[1], generator=gen).float() * 1e-3
    v = torch.rand(g.shape[1], generator=gen).float() * vscale
    gd = g.to(dtype)
    out = impl.adam_features(gd, m, v)
    expected = adam64(gd, m, v)
    assert out.dtype == torch.float32
    assert_close(out, expected, f"adam_features, grad {dtype}")


def test_adam_eps_inside_the_root_and_no_bias_correction(impl):
    g, m, v = torch.zeros(1, 3), torch.tensor([1.0, 0.0, -2.0]), torch.zeros(3)
    # m_hat = 0.9 m, v_hat = 0: eps inside gives 0.9 m / 1e-4 (outside would be 0.9 m / 1e-8)
    assert_close(impl.adam_features(g, m, v), torch.tensor([[9000.0, 0.0, -18000.0]]))
    out = impl.adam_features(torch.tensor([[2.0]]), torch.tensor([1.0]), torch.tensor([4.0]))
    assert_close(out, torch.tensor([[(0.9 + 0.2) / math.sqrt(0.999 * 4 + 0.004 + 1e-8)]]))


def test_adam_zero_state_and_zero_grad_are_finite(impl):
    out = impl.adam_features(torch.zeros(2, 5), torch.zeros(5), torch.zeros(5))
    assert torch.equal(out, torch.zeros(2, 5))


# --- gradient types


@pytest.mark.parametrize("grad_type", ["sgd", "sign", "adam"])
@given(g=matrix(max_cols=100), mseed=st.integers(0, 2 ** 31 - 1))
def test_gradient_features_by_type(impl, grad_type, g, mseed):
    """'sgd': g, 'sign': sign(g), 'adam': the Adam feature with the given moments; float32 (N, D)."""
    gen = torch.Generator().manual_seed(mseed)
    m, v = torch.randn(g.shape[1], generator=gen) * 1e-3, torch.rand(g.shape[1], generator=gen) * 1e-6
    g = g.float()
    out = impl.gradient_features(g, grad_type, (m, v) if grad_type == "adam" else None)
    expected = {"sgd": g.double(), "sign": torch.sign(g.double()), "adam": adam64(g, m, v)}[grad_type]
    assert out.dtype == torch.float32 and out.shape == g.shape
    assert_close(out, expected, grad_type)


@pytest.mark.policy
def test_adam_gradient_type_without_optimizer_state_is_error(impl):
    with pytest.raises(ValueError, match="optimizer state|exp_avg"):
        impl.gradient_features(torch.randn(2, 4), "adam", None)
    with pytest.raises(ValueError, match="adagrad"):
        impl.gradient_features(torch.randn(2, 4), "adagrad")


# --- projection
# A candidate whose matrix is another valid Rademacher / SJLT matrix declares its own identity in a module-level
# PROJECTION (dense) / PROJECTION_KINDS (both) string; then only the matrix-equality tests are skipped.

KINDS = ["rademacher", "sjlt"]


def proj(impl, x, k, seed=0, kind="rademacher", row_offset=0):
    """impl.project with the optional arguments only when needed; a candidate without them gets a skip that
    names the missing feature (TypeError / NotImplementedError), never a failure."""
    kw = {}
    if kind != "rademacher":
        kw["kind"] = kind
    if row_offset:
        kw["row_offset"] = row_offset
    try:
        return impl.project(x, k, seed, **kw)
    except (TypeError, NotImplementedError) as e:
        if isinstance(e, NotImplementedError) or (kw and "argument" in str(e)):
            what = ", ".join(f"{a}={v!r}" for a, v in kw.items()) or f"kind={kind!r}"
            pytest.skip(f"{impl.name}.project does not support {what}: {e}")
        raise


def same_matrix_as_reference(impl, kind):
    import less_ref

    ours = less_ref.PROJECTION_KINDS[kind]
    mod = impl._module
    theirs = getattr(mod, "PROJECTION_KINDS", {}).get(kind, getattr(mod, "PROJECTION", ours) if kind == "rademacher" else ours)
    if theirs != ours:
        pytest.skip(f"{impl.name} declares projection {theirs!r}, not {ours!r}: matrix equality is not asked")


@pytest.mark.parametrize("kind", KINDS)
@given(x=matrix(max_cols=200), k=st.sampled_from([1, 4, 8, 12, 64, 96]), a=st.floats(-3, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_is_linear(impl, kind, x, k, a, seed):
    k = max(8, k - k % 8) if kind == "sjlt" else k  # sjlt: proj_dim a multiple of 8 (any s <= 8 divides it)
    x = x.float()
    y = torch.roll(x, 1, 0)
    lhs = proj(impl, a * x + y, k, seed, kind)
    rhs = a * proj(impl, x, k, seed, kind) + proj(impl, y, k, seed, kind)
    assert_projections_close(lhs, rhs, x.abs() * (abs(a) + 1) + y.abs(), k)


@pytest.mark.parametrize("kind", KINDS)
@given(x=matrix(max_cols=200), k=st.sampled_from([4, 8, 64, 96]), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_rows_do_not_depend_on_the_batch(impl, kind, x, k, seed):
    x = x.float()
    full = proj(impl, x, k, seed, kind)
    assert full.shape == (x.shape[0], k) and full.dtype == torch.float32
    for i in range(x.shape[0]):
        assert_projections_close(proj(impl, x[i:i + 1], k, seed, kind)[0], full[i], x[i], k)


def check_slices(impl, kind, x, cut, k, seed, offset):
    x = x.float()
    D = x.shape[1]
    bounds = sorted({0, D} | {int(c * D) for c in cut})
    whole = proj(impl, x, k, seed, kind, row_offset=offset)
    parts = sum(proj(impl, x[:, a:b], k, seed, kind, row_offset=offset + a) for a, b in zip(bounds, bounds[1:]) if b > a)
    assert_projections_close(parts, whole, x, k)


SLICES = dict(x=matrix(max_rows=3, max_cols=300), cut=st.lists(st.floats(0, 1), min_size=1, max_size=3),
              k=st.sampled_from([8, 64]), seed=st.integers(0, 2 ** 32 - 1))


@pytest.mark.parametrize("kind", KINDS)
@given(offset=st.sampled_from([0, 1, 1000, 2 ** 12 - 3]), **SLICES)
def test_slices_project_to_the_whole(impl, kind, x, cut, k, seed, offset):
    """x holds rows [offset, offset + D) of a gradient: projecting its slices with their own row offsets and
    summing equals projecting it whole (the gradient split per layer, or an FSDP rank's flat shard)."""
    check_slices(impl, kind, x, cut, k, seed, offset)


@pytest.mark.parametrize("kind", KINDS)
@given(offset=st.sampled_from([2 ** 24 - 3, 2 ** 32 - 7, 2 ** 40 - 11, 2 ** 40]), **SLICES)
def test_slices_at_huge_row_indices(impl, kind, x, cut, k, seed, offset):
    """The same at row indices past 2^24, 2^32 and up to 2^40 (a 7B model with LoRA has D ~ 1.3e8)."""
    check_slices(impl, kind, x, cut, k, seed, offset)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_far_apart_are_not_copies(impl, kind):
    """Rows at 0, 2^24, 2^25, 2^32, 2^36, 2^40 (+ a few): a hash counter that drops its high word makes some
    of them equal; distinct rows of a random matrix agree on about half their signs."""
    k = 8192
    rows = torch.cat([proj(impl, torch.eye(4), k, 3, kind, row_offset=o) for o in (0, 2 ** 24, 2 ** 25, 2 ** 32, 2 ** 36, 2 ** 40)])
    R = rows.double() * math.sqrt(k) if kind == "rademacher" else rows.double()
    gram = R @ R.T / (R.norm(dim=1)[:, None] * R.norm(dim=1)[None])
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 6 / math.sqrt(k) + (0.75 if kind == "sjlt" else 0), "two far-apart rows are (near) copies"
    if kind == "rademacher":
        assert torch.equal(rows.abs(), torch.full_like(rows, 1 / math.sqrt(k)))


@pytest.mark.parametrize("D,k", [(1, 1), (7, 33), (64, 512), (300, 100)])
def test_basis_vectors_map_to_signs(impl, D, k):
    """project(e_i) = row i of R / sqrt(k): every entry exactly +-1/sqrt(k), both signs present."""
    out = proj(impl, torch.eye(D), k, seed=3)
    assert out.shape == (D, k) and out.dtype == torch.float32
    assert torch.equal(out.abs(), torch.full((D, k), 1 / math.sqrt(k), dtype=torch.float32))
    if D * k >= 64:
        frac = (out > 0).double().mean().item()
        assert abs(frac - 0.5) < 6 * 0.5 / math.sqrt(D * k), f"fraction of +1 is {frac}"


def test_sjlt_rows_are_sparse_signs(impl):
    """SJLT: row i of R has at most s nonzeros, each a whole multiple of 1/sqrt(s) (colliding columns may
    add up), E |R_i|^2 = 1; signs balanced. s is whatever the candidate uses (at most k / 8 here)."""
    k = 1024
    out = proj(impl, torch.eye(2000), k, seed=5, kind="sjlt").double()
    nnz = (out != 0).sum(1)
    s = int(nnz.max())
    assert 1 <= s <= k // 8, f"up to {s} nonzeros per row is not sparse"
    scaled = out * math.sqrt(s)
    assert torch.allclose(scaled, scaled.round(), atol=1e-5), "entries must be multiples of 1/sqrt(s)"
    assert abs((out ** 2).sum(1).mean().item() - 1) < 0.05, "E |R_i|^2 must be 1"
    frac = (out[out != 0] > 0).double().mean().item()
    assert abs(frac - 0.5) < 6 * 0.5 / math.sqrt(int((out != 0).sum()))


@pytest.mark.parametrize("k", [1023, 1030])
def test_sjlt_with_k_not_a_multiple_of_s_uses_every_column(impl, k):
    """k not divisible by s (4 here for the reference): every output column still receives rows (8000 rows,
    ~30 per column; a construction that drops the last k mod s columns leaves them empty), E |R_i|^2 = 1."""
    out = proj(impl, torch.eye(8000), k, seed=2, kind="sjlt").double()
    assert out.shape == (8000, k)
    empty = (out == 0).all(0).nonzero()[:, 0].tolist()
    assert not empty, f"columns {empty[:8]} receive no row"
    assert abs((out ** 2).sum(1).mean().item() - 1) < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_long_input_projects_like_its_rows(impl, kind):
    """A 1M-coordinate sparse input (more rows than any one generated block) projects to the sum of its rows'
    projections, each row read with row_offset: whatever blocks the candidate generates R in."""
    D = 2 ** 20 + 3
    idx = [0, 1, 4095, 4096, 65537, 2 ** 19 + 7, D - 1]
    x = torch.zeros(2, D)
    x[0, idx] = torch.arange(1.0, 8.0)
    x[1, idx[-1]] = -2.0
    rows = torch.cat([proj(impl, torch.ones(1, 1), 96, 3, kind, row_offset=i) for i in idx]).double()  # (7, k)
    expected = x[:, idx].double() @ rows
    assert_projections_close(proj(impl, x, 96, 3, kind), expected, x, 96)


@pytest.mark.parametrize("grad_type", ["adam", "sgd"])
def test_features_of_gradients_longer_than_one_slice(impl, grad_type):
    """projected_features with slices of 1000 coordinates over a 4500-long gradient (a 7B model's gradient is
    many slices long): the projection of the whole feature vector, Adam moments sliced with it."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 4500, generator=gen)
    m, v = torch.randn(4500, generator=gen) * 1e-3, torch.rand(4500, generator=gen) * 1e-6
    adam = (m, v) if grad_type == "adam" else None
    try:
        out = impl.projected_features(g, grad_type, adam, impl.Projection(64, 2), slice_cols=1000)
    except TypeError as e:
        pytest.skip(f"{impl.name}.projected_features does not take slice_cols: {e}")
    feats = adam64(g, m, v) if adam else g.double()
    expected = feats @ projection_matrix(impl, 4500, 64, 2)
    assert out.dtype == torch.float32
    assert_projections_close(out, expected, feats, 64)


def test_projection_rows_are_nearly_orthogonal(impl):
    """R R^T / k ~ I: off-diagonal entries within 6 standard deviations (1 / sqrt(k))."""
    k = 1024
    R = proj(impl, torch.eye(256), k, seed=11).double() * math.sqrt(k)
    gram = R @ R.T / k
    assert torch.allclose(gram.diagonal(), torch.ones(256, dtype=torch.float64))
    assert (gram - torch.eye(256, dtype=torch.float64)).abs().max() < 6 / math.sqrt(k)


@pytest.mark.parametrize("offset", [0, 2 ** 40])
@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2 ** 32 - 1), pair=st.integers(0, 2 ** 31 - 1))
def test_jl_norm_and_inner_products_are_preserved(impl, kind, offset, seed, pair):
    """For k = 2048, |Px|^2 / |x|^2 and <Px, Py> - <x, y> deviate by less than 6 sqrt(2 / k) |x| |y|
    (gradient-like vectors: dense, uneven scales), also at row indices near 2^40."""
    gen = torch.Generator().manual_seed(pair)
    x = torch.randn(3, 3000, generator=gen) * torch.rand(3, 3000, generator=gen)
    px = proj(impl, x, 2048, seed, kind, row_offset=offset).double()
    x64 = x.double()
    bound = 6 * math.sqrt(2 / 2048)
    nx = x64.norm(dim=1)
    assert ((px.norm(dim=1) ** 2 / nx ** 2 - 1).abs() < bound).all()
    err = (px @ px.T - x64 @ x64.T) / (nx[:, None] * nx[None, :])
    assert (err.abs() < bound).all()


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_deterministic_and_seeded(impl, kind):
    x = torch.randn(4, 500)
    a, b = proj(impl, x, 64, 1, kind), proj(impl, x, 64, 1, kind)
    assert torch.equal(a, b)
    c = proj(impl, torch.eye(500), 64, 2, kind)
    d = proj(impl, torch.eye(500), 64, 1, kind)
    changed = (c != d).any(1).double().mean() if kind == "sjlt" else (c != d).double().mean()
    assert changed > 0.4, "different seeds must give different matrices"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_of_low_precision_input_is_fp32_quality(impl, kind, dtype):
    x = (torch.randn(5, 1000) * 100).to(dtype)
    out = proj(impl, x, 256, 0, kind)
    assert out.dtype == torch.float32
    expected = proj(impl, torch.eye(1000), 256, 0, kind).double()  # R / scale, exactly
    assert_projections_close(out, x.double() @ expected, x, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_agrees_with_the_reference(impl, kind):
    """A candidate that claims the reference's matrix (PROJECTION / PROJECTION_KINDS, or nothing declared)
    must produce it: the same (seed, row, column) -> sign function, at small and huge row indices."""
    same_matrix_as_reference(impl, kind)
    import less_ref

    x = torch.randn(3, 777)
    assert_projections_close(proj(impl, x, 304, 12345, kind), less_ref.project(x, 304, 12345, kind=kind), x, 304)
    D = 2 ** 20 + 3  # a long, sparse input: rows far apart, whatever block size the candidate uses inside
    idx = torch.tensor([0, 1, 2 ** 16 + 1, 2 ** 19 - 1, 2 ** 19, D - 1])
    x = torch.zeros(2, D)
    x[0, idx] = torch.arange(1.0, 7.0)
    x[1, idx[-1]] = 1.0
    assert_projections_close(proj(impl, x, 16, 3, kind), less_ref.project(x, 16, 3, kind=kind), x, 16)
    e = torch.eye(3)
    for o in (2 ** 32 - 1, 2 ** 40):
        assert torch.equal(proj(impl, e, 64, 7, kind, row_offset=o), less_ref.project(e, 64, 7, row_offset=o, kind=kind))


def test_reference_matrix_is_the_documented_hash(impl):
    """The dense matrix of the reference's identity equals the formula written out in this file, at small and
    huge row indices (a candidate claiming this identity must produce exactly these signs)."""
    same_matrix_as_reference(impl, "rademacher")
    for row0, D, k in ((0, 40, 70), (2 ** 40 - 5, 6, 64), (2 ** 33 + 1, 3, 33)):
        out = proj(impl, torch.eye(D), k, 9, row_offset=row0)
        assert torch.equal(out.double(), documented_matrix(D, k, 9, row0).float().double()), (row0, D, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_the_same_on_cuda(impl, kind):
    device = "cuda"
    x = torch.randn(3, 2000)
    assert_projections_close(proj(impl, x.to(device), 1000, 7, kind).cpu(), proj(impl, x, 1000, 7, kind), x, 1000)
    basis = proj(impl, torch.eye(300, device=device), 200, 7, kind).cpu()
    assert torch.equal(basis, proj(impl, torch.eye(300), 200, 7, kind)), "the matrix must be bit-identical across devices"


@pytest.mark.policy
@pytest.mark.parametrize("bad", [{"proj_dim": 0}, {"proj_dim": 2.5}, {"seed": -1}, {"kind": "gaussian"},
                                 {"row_offset": -3}, {"row_offset": 1.5}, {"block_rows": -5}])
def test_bad_projection_arguments_are_errors(impl, bad):
    """A bad argument is refused (TypeError for a wrong type, ValueError for a wrong value), never a silent
    result; an optional argument the candidate does not take is a skip."""
    args = dict(proj_dim=16, seed=0)
    args.update(bad)
    x = torch.randn(2, 10)
    try:
        impl.project(x, args.pop("proj_dim"), **args)
    except NotImplementedError as e:
        pytest.skip(f"{impl.name}.project: {e}")
    except REFUSED as e:
        if isinstance(e, TypeError) and "unexpected keyword" in str(e):
            pytest.skip(f"{impl.name}.project does not take {list(args)}: {e}")
        return
    pytest.fail(f"project accepted {bad}")


# --- influence scores


def scores64(train, val, eta, n_sub):
    s = 0
    for t, v, e in zip(train, val, eta):
        t, v = t.double(), v.double()
        s = s + e / sum(eta) * (t / t.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
    per = v.shape[0] // n_sub
    return torch.stack([s[:, i * per:(i + 1) * per].mean(1) for i in range(n_sub)], 1).max(1).values


@pytest.mark.parametrize("dtype", DTYPES)
@given(n_ckpt=st.integers(1, 3), n_sub=st.integers(1, 4), per=st.integers(1, 4), N=st.integers(1, 12),
       k=st.integers(2, 40), seed=st.integers(0, 2 ** 31 - 1), eta=st.lists(st.floats(0.01, 5), min_size=3, max_size=3))
def test_influence_mean_then_max_over_subtasks(impl, dtype, n_ckpt, n_sub, per, N, k, seed, eta):
    gen = torch.Generator().manual_seed(seed)
    train = [torch.randn(N, k, generator=gen).to(dtype) for _ in range(n_ckpt)]
    val = [torch.randn(n_sub * per, k, generator=gen).to(dtype) for _ in range(n_ckpt)]
    out = impl.influence_scores(train if n_ckpt > 1 else train[0], val if n_ckpt > 1 else val[0],
                                eta[:n_ckpt] if n_ckpt > 1 else None, n_sub)
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert_close(out, scores64(train, val, eta[:n_ckpt] if n_ckpt > 1 else [1.0], n_sub), f"inputs {dtype}")


def check_scale_invariance(impl, seed, c, big):
    gen = torch.Generator().manual_seed(seed)
    t, v = [torch.randn(6, 16, generator=gen) for _ in range(2)], [torch.randn(4, 16, generator=gen) for _ in range(2)]
    base = impl.influence_scores(t, v, [1.0, 3.0], 2)
    row_scale = (torch.rand(6, 1, generator=gen) * 10 + 0.01) * big
    assert_close(impl.influence_scores([x * row_scale for x in t], [y * c for y in v], [c, 3 * c], 2), base)


@given(seed=st.integers(0, 2 ** 31 - 1), c=st.floats(1e-3, 1e3))
def test_influence_invariant_to_row_scale_and_weight_scale(impl, seed, c):
    """Rows scaled by any positive factor (0.01 to 10) and checkpoint weights by any factor score the same."""
    check_scale_invariance(impl, seed, c, 1.0)


@pytest.mark.policy
@given(seed=st.integers(0, 2 ** 31 - 1), c=st.floats(1e-3, 1e3), big=st.sampled_from([1e20, 1e-30]))
def test_influence_of_rows_whose_norms_overflow_float32(impl, seed, c, big):
    """Rows of 1e20 or 1e-30 entries (their float32 norms over/underflow) score like the same rows at scale 1:
    beyond the original code, whose plain float32 F.normalize gives 0 there."""
    check_scale_invariance(impl, seed, c, big)


@pytest.mark.policy
def test_influence_bad_inputs_are_errors(impl):
    t, v = torch.randn(4, 8), torch.randn(6, 8)
    for bad in (lambda: impl.influence_scores(t, v, n_subtasks=4),  # 6 val examples do not split into 4 subtasks
                lambda: impl.influence_scores(torch.cat([t, torch.zeros(1, 8)]), v),  # a zero row has no direction
                lambda: impl.influence_scores([t, t], [v], [0.5, 0.5]),
                lambda: impl.influence_scores(t, v[:0]),  # an empty validation side: the mean of nothing
                lambda: impl.influence_scores(t[:0], v),
                lambda: impl.influence_scores(t, v, n_subtasks=2.0)):
        with pytest.raises(REFUSED):
            bad()


# --- selection


SCORES = dict(scores=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.25]), min_size=1, max_size=40), k=st.integers(0, 40))


@given(**SCORES)
def test_select_top_is_the_k_best_in_descending_order(impl, scores, k):
    """k distinct indices whose scores are the k largest, in non-increasing order (any order among ties)."""
    k = min(k, len(scores))
    idx = impl.select_top(torch.tensor(scores), k=k).tolist()
    assert len(idx) == len(set(idx)) == k
    assert [scores[i] for i in idx] == sorted(scores, reverse=True)[:k]


@pytest.mark.policy
@given(**SCORES)
def test_select_top_breaks_ties_by_position(impl, scores, k):
    """Ties go to the earlier position: a deterministic order the original's unstable sort does not promise."""
    k = min(k, len(scores))
    idx = impl.select_top(torch.tensor(scores), k=k).tolist()
    assert idx == sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


@pytest.mark.parametrize("N,fraction,k", [(10, 0.05, 0), (30, 0.1, 3), (7, 0.5, 3), (100, 0.05, 5), (3, 1.0, 3)])
def test_select_top_fraction_rounds_down(impl, N, fraction, k):
    """k = int(fraction * N) (LESS's rounding), the k best in descending order."""
    scores = torch.randperm(N, generator=torch.Generator().manual_seed(N)).float()
    assert impl.select_top(scores, fraction=fraction).tolist() == scores.argsort(descending=True)[:k].tolist()


@pytest.mark.policy
def test_select_top_bad_inputs_are_errors(impl):
    for kw in ({"scores": torch.tensor([0.1, float("nan"), 0.3]), "k": 2}, {"scores": torch.rand(3, 2), "k": 1},
               {"scores": torch.rand(5), "k": 2.0}, {"scores": torch.rand(5), "k": 6}, {"scores": torch.rand(5)}):
        with pytest.raises(REFUSED):
            impl.select_top(**kw)


# --- per-example gradients of a transformers causal LM (the independent computation is written here)


def _lm(seed=0, dropout=0.0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        attention_dropout=dropout)).to(dtype)


def _examples(n, seed=0, prefix="ex"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(0, 64, (L,), generator=g).tolist()
        p = int(torch.randint(2, L - 2, (1,), generator=g))
        out.append({"id": f"{prefix}{i}", "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _train_only(model, which):
    for n, p in model.named_parameters():
        p.requires_grad_(which == "all" or any(k in n for k in which.split(",")))
    return model


def loop_gradients(model, examples):
    """One example at a time, no padding, eval mode: the mean cross-entropy of the response tokens (labels
    shifted by one, -100 ignored), differentiated by autograd over the trainable parameters in
    named_parameters() order. float32 (B, D)."""
    model.eval()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    rows = []
    for ex in examples:
        ids, lab = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])[1:]
        logits = model(input_ids=ids).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits[lab != -100], lab[lab != -100])
        rows.append(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("trainable", ["all", "q_proj,v_proj", "layers.1"])
def test_example_gradients_equal_a_per_example_loop(impl, trainable):
    """Mixed lengths in one call (padding must never enter a loss), a model with dropout (eval mode: dropout
    must not change features), every trainable subset laid out in named_parameters() order."""
    model = _train_only(_lm(dropout=0.3), trainable)
    model.train()
    ex = _examples(5)
    out = impl.example_gradients(model, ex)
    expected = loop_gradients(model, ex)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(impl.example_gradients(model, ex[2:3]), expected[2:3], rtol=1e-4, atol=1e-6)


def test_example_gradients_of_a_bf16_model(impl):
    """A bf16 model: float32 gradient rows that agree with the per-example loop on the same model to bf16
    rounding (cosine > 0.99, norm within 5%) whatever else is in the batch."""
    model = _train_only(_lm(dtype=torch.bfloat16), "q_proj,v_proj,mlp")
    ex = _examples(4)
    out = impl.example_gradients(model, ex)
    expected = loop_gradients(model, ex)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.double(), expected.double(), dim=1)
    ratio = out.double().norm(dim=1) / expected.double().norm(dim=1)
    assert (cos > 0.99).all() and ((ratio - 1).abs() < 0.05).all(), (cos, ratio)


def test_a_label_at_the_first_position_is_never_scored(impl):
    """Position 0 predicts nothing (the causal shift): a label there changes no gradient."""
    model = _train_only(_lm(), "q_proj,v_proj")
    ex = _examples(3)
    with_first = [dict(e, id=e["id"] + "-first", labels=[e["input_ids"][0]] + e["labels"][1:]) for e in ex]
    torch.testing.assert_close(impl.example_gradients(model, with_first), loop_gradients(model, ex), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,culprit", [
    ("input_ids", [1, 2, 84.7, 3, 4, 5, 6], "84.7"), ("input_ids", [1, 2, 64, 3, 4, 5, 6], "64"),
    ("input_ids", [1, 2, -1, 3, 4, 5, 6], "-1"), ("labels", [-100, -100, -100, 3, 64, 5, 6], "64"),
    ("labels", [-100, -100, -100, 3, -5, 5, 6], "-5"), ("input_ids", [[1, 2, 3, 4, 5, 6, 7]], "shape")])
@pytest.mark.policy
def test_bad_token_ids_are_errors_naming_the_sample(impl, field, value, culprit):
    """Float, out-of-vocabulary or negative token ids and out-of-range labels: a ValueError naming the sample
    id, never a silent truncation or a raw IndexError."""
    ex = _examples(3)
    ex[1] = {"id": "bad-one", "input_ids": [1, 2, 3, 3, 4, 5, 6], "labels": [-100, -100, -100, 3, 4, 5, 6]}
    ex[1][field] = value
    with pytest.raises(ValueError, match="bad-one"):
        impl.example_gradients(_lm(), ex)


# --- optimizer state: live, Trainer optimizer.pt (index-keyed, two groups), FSDP optimizer.bin (name-keyed)


def _trainer_setup():
    """A model whose trainable set mixes decay and no-decay parameters, with AdamW grouped as transformers'
    Trainer does (decay group, then no-decay group), so optimizer index order != named_parameters() order;
    one step taken so the moments are non-zero."""
    from transformers import Trainer

    model = _train_only(_lm(), "layers.1,norm")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [[p for n, p in named if n in decay], [p for n, p in named if n not in decay]]
    assert groups[0] and groups[1]
    opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.1}, {"params": groups[1], "weight_decay": 0.0}], lr=1e-2)
    ex = _examples(1, seed=9)[0]
    model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.backward()
    opt.step()
    order = [n for n, p in named if n in decay] + [n for n, p in named if n not in decay]
    assert order != [n for n, _ in named], "the test needs two groups out of named order"
    return model, opt, named


def test_optimizer_state_from_all_three_sources(impl, tmp_path):
    model, opt, named = _trainer_setup()
    expected_m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for _, p in named])
    expected_v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for _, p in named])
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save({"state": {"_fsdp_wrapped_module." + n: opt.state[p] for n, p in reversed(named)}, "param_groups": []},
               tmp_path / "optimizer.bin")
    for source in (opt, str(tmp_path / "optimizer.pt"), str(tmp_path / "optimizer.bin")):
        m, v = impl.adam_state(model, source)
        assert torch.equal(m.float(), expected_m) and torch.equal(v.float(), expected_v), source


@pytest.mark.policy
def test_optimizer_state_errors_name_the_parameter(impl, tmp_path):
    model, opt, named = _trainer_setup()
    state = {n: dict(opt.state[p]) for n, p in named}
    missing = dict(state)
    del missing[named[1][0]]
    torch.save({"state": missing, "param_groups": []}, tmp_path / "a.bin")
    with pytest.raises(ValueError, match=named[1][0]):
        impl.adam_state(model, str(tmp_path / "a.bin"))
    state[named[0][0]]["exp_avg"] = torch.zeros(3)
    torch.save({"state": state, "param_groups": []}, tmp_path / "b.bin")
    with pytest.raises(ValueError, match=named[0][0]):
        impl.adam_state(model, str(tmp_path / "b.bin"))
    torch.save(model.state_dict(), tmp_path / "model.pt")  # a model state_dict given as optimizer state
    with pytest.raises(ValueError, match="model.pt"):
        impl.adam_state(model, str(tmp_path / "model.pt"))
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="x.safetensors"):
        impl.adam_state(model, str(tmp_path / "x.safetensors"))


def _evil_optimizer_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, tmp_path / "optimizer.pt")
    return str(tmp_path / "optimizer.pt")


def test_optimizer_file_with_pickled_code_does_not_run_it(impl, tmp_path):
    """A file whose pickle runs a command: the command never runs (whatever error the loader gives)."""
    path = _evil_optimizer_file(tmp_path)
    try:
        impl.adam_state(_lm(), path)
    except Exception:  # noqa: BLE001 -- which error is policy; that no code ran is the point
        pass
    assert not (tmp_path / "pwned").exists(), "loading optimizer state ran pickled code"


@pytest.mark.policy
def test_optimizer_file_with_pickled_code_is_refused_naming_it(impl, tmp_path):
    with pytest.raises(ValueError, match="optimizer.pt"):
        impl.adam_state(_lm(), _evil_optimizer_file(tmp_path))


# --- storage: collect, merge, load; ids stay with their rows


def _collect(impl, model, ex, out, proj_dim=64, seed=1, kind="rademacher", s=4, **kw):
    args = dict(grad_type="sgd", checkpoint="ck1", chunk_size=4, batch_size=3)
    args.update(kw)
    try:
        return impl.collect_features(model, ex, str(out), projection=impl.Projection(proj_dim, seed, kind, s), **args)
    except TypeError as e:
        if "unexpected keyword" in str(e) and any(a in str(e) for a in kw):
            pytest.skip(f"{_module_name(impl)}.collect_features does not support {e}")
        raise


def _fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B % 2 ** 32
    h ^= h >> 13
    h = h * 0xC2B2AE35 % 2 ** 32
    return h ^ (h >> 16)


def documented_matrix(D, k, seed, row0=0):
    """Rows [row0, row0 + D) of the reference's dense R / sqrt(k) (float64), from its documented formula in
    Python integers: sign (i, j) = bit j % 32 of fmix32(fmix32(lo ^ s1) ^ hi ^ s2) (1 -> -1), where the counter
    i * W + j // 32 = hi * 2^32 + lo, W = ceil(k / 32), s1 = fmix32(seed ^ 0x9E3779B9), s2 = fmix32(seed ^ 0x7F4A7C15)."""
    s1, s2, W = _fmix32(seed ^ 0x9E3779B9), _fmix32(seed ^ 0x7F4A7C15), (k + 31) // 32
    words = torch.tensor([_fmix32(_fmix32((c & 0xFFFFFFFF) ^ s1) ^ (c >> 32) ^ s2)
                          for c in range(row0 * W, (row0 + D) * W)], dtype=torch.int64).reshape(D, W)
    bits = (words[..., None] >> torch.arange(32)) & 1
    return (1 - 2 * bits).double().reshape(D, W * 32)[:, :k] / math.sqrt(k)


def projection_matrix(impl, D, k, seed):
    """R / sqrt(k) as the candidate defines it: the documented matrix for the reference's identity, else the
    candidate's own matrix read off its projection of basis vectors (its JL properties are tested above)."""
    import less_ref

    mod = impl._module if hasattr(impl, "_module") else impl
    if getattr(mod, "PROJECTION", less_ref.PROJECTION) == less_ref.PROJECTION:
        return documented_matrix(D, k, seed)
    return torch.cat([proj(impl, torch.eye(min(4096, D - o)), k, seed, row_offset=o).double()
                      for o in range(0, D, 4096)])


def expected_features(impl, model, ex, k=64, seed=1, adam=None):
    """The single-process result computed here: per-example loop gradients, float64 features, the projection
    matrix, rows normalised."""
    g = loop_gradients(model, ex)
    y = (adam64(g, *adam) if adam is not None else g.double()) @ projection_matrix(impl, g.shape[1], k, seed)
    return y / y.norm(dim=1, keepdim=True)


def test_collected_rows_keep_their_ids(impl, tmp_path):
    model = _lm()
    ex = _examples(11)
    _collect(impl, model, ex, tmp_path / "a")
    feats, ids, identity = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == [e["id"] for e in ex] and feats.shape == (11, 64)
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex), rtol=1e-4, atol=1e-6)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0)).tolist()  # shuffled: each id its own row
    _collect(impl, model, [ex[i] for i in perm], tmp_path / "b")
    feats_b, ids_b, _ = impl.load_features(tmp_path / "b" / "features.safetensors")
    assert ids_b == [ex[i]["id"] for i in perm]
    torch.testing.assert_close(feats_b, feats[perm], rtol=1e-4, atol=1e-6)


def test_adam_collection_from_a_trainer_checkpoint(impl, tmp_path):
    model, opt, named = _trainer_setup()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ex = _examples(6)
    _collect(impl, model, ex, tmp_path / "a", grad_type="adam", optimizer_state=str(tmp_path / "optimizer.pt"))
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    adam = (torch.cat([opt.state[p]["exp_avg"].reshape(-1) for _, p in named]),
            torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for _, p in named]))
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex, adam=adam), rtol=1e-4, atol=1e-6)


def test_resume_after_a_removed_chunk_equals_the_clean_run(impl, tmp_path):
    model = _lm()
    ex = _examples(13)
    _collect(impl, model, ex, tmp_path / "a")
    clean = impl.load_features(tmp_path / "a" / "features.safetensors")
    chunks = sorted(p for p in (tmp_path / "a").rglob("*.safetensors") if p.name != "features.safetensors")
    assert len(chunks) >= 2, "collection must write chunks as it goes"
    chunks[1].unlink()
    (tmp_path / "a" / "features.safetensors").unlink()
    chunks[0].write_bytes(chunks[0].read_bytes()[:100])  # and a torn one: recomputed or refused, never used
    try:
        _collect(impl, model, ex, tmp_path / "a")
    except ValueError as e:
        assert chunks[0].name in str(e), f"a torn chunk must be named: {e}"
        chunks[0].unlink()
        _collect(impl, model, ex, tmp_path / "a")
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0], rtol=1e-5, atol=1e-7)


def _flip_a_byte_of_the_features(path):
    """Flip one bit of the last feature value stored in a safetensors file (the data sit after the header)."""
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40  # an exponent bit of the last float32 row's last value
    path.write_bytes(bytes(data))


def test_a_corrupt_chunk_is_never_used(impl, tmp_path):
    """A stored chunk whose bytes changed after it was written (one bit of one feature): a re-run recomputes it
    (or refuses naming it) and the merged result is the clean run's -- never the corrupt row."""
    model, ex = _lm(), _examples(9)
    _collect(impl, model, ex, tmp_path / "a")
    clean = impl.load_features(tmp_path / "a" / "features.safetensors")
    chunks = sorted(p for p in (tmp_path / "a").rglob("chunk*.safetensors"))
    _flip_a_byte_of_the_features(chunks[1])
    (tmp_path / "a" / "features.safetensors").unlink()
    try:
        with pytest.warns(UserWarning):
            _collect(impl, model, ex, tmp_path / "a")
    except ValueError as e:
        assert chunks[1].name in str(e)
        return
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0], rtol=1e-5, atol=1e-7)


def test_a_corrupt_or_partial_features_file_is_not_matched(impl, tmp_path):
    """match refuses a merged file whose bytes changed and a single chunk file given in place of the merged file
    (it would score only that chunk's rows)."""
    model = _lm()
    t, v = _files(impl, tmp_path, model, "t", _examples(9)), _files(impl, tmp_path, model, "v", _examples(2, seed=3, prefix="val"))
    chunk = str(sorted((tmp_path / "t").rglob("chunk*.safetensors"))[0])
    with pytest.raises(REFUSED):
        impl.match([chunk], [v])
    _flip_a_byte_of_the_features(tmp_path / "t" / "features.safetensors")
    with pytest.raises(REFUSED):
        impl.match([t], [v])


@pytest.mark.policy
def test_broken_optimizer_states_are_errors_naming_the_cause(impl, tmp_path):
    """An empty file, NaN or negative exp_avg_sq moments: a ValueError naming the file or the parameter, not an
    IndexError or NaN features."""
    model, opt, named = _trainer_setup()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt"):
        impl.adam_state(model, str(tmp_path / "empty.pt"))
    for what, value in (("exp_avg", float("nan")), ("exp_avg_sq", -1.0)):
        state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in named}
        state[named[1][0]][what].view(-1)[0] = value
        torch.save({"state": state, "param_groups": []}, tmp_path / f"{what}.bin")
        with pytest.raises(ValueError, match=re.escape(named[1][0])):
            impl.adam_state(model, str(tmp_path / f"{what}.bin"))


@pytest.mark.policy
def test_bad_records_and_lengths_are_errors_naming_them(impl):
    """A negative or fractional max_length (which would silently cut eos and the response), messages given as a
    string, a prompt that is not a string, a chat with no assistant turn: errors naming the record."""
    tok = _word_tokenizer()
    rec = {"id": "r", "prompt": "what is 3 + 4 ?", "response": "7"}
    for bad in ({"max_length": -2}, {"max_length": 5.5}, {"max_length": 0}):
        with pytest.raises(REFUSED, match="max_length"):
            impl.encode_example(rec, tok, **bad)
    for record, says in (({"id": "m", "messages": "what is 1 ?"}, "'m'.*messages"), ({"id": "p", "prompt": 7, "response": "7"}, "'p'.*string"),
                         ({"id": "u", "messages": [{"role": "user", "content": "1 ?"}]}, "'u'.*assistant")):
        with pytest.raises(REFUSED, match=says):
            impl.encode_example(record, tok)


def _permute_in_place(t):
    """Swap two distinct entries: same sum, same sum of squares, other content."""
    flat = t.data.view(-1)
    j = int((flat != flat[0]).nonzero()[0])
    flat[0], flat[j] = flat[j].clone(), flat[0].clone()


@pytest.mark.parametrize("change", ["proj_dim", "seed", "checkpoint", "grad_type", "kind", "sjlt s", "data", "labels only",
                                    "trainable weight", "frozen weight", "trainable set", "permuted trainable values",
                                    "reordered moments"])
def test_changed_configuration_is_refused(impl, tmp_path, change):
    """Re-running into a directory of another configuration is refused (a ValueError), never resumed or
    mixed: also for a change in a FROZEN weight and for permutations that keep sums and sums of squares."""
    model, opt, named = _trainer_setup()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ex = _examples(5)
    kw = dict(grad_type="adam", optimizer_state=str(tmp_path / "optimizer.pt"))
    if change in ("sjlt s", "trainable set"):  # sjlt: s is part of the identity; another trainable set: sgd
        kw = dict(kind="sjlt") if change == "sjlt s" else dict(grad_type="sgd")
    _collect(impl, model, ex, tmp_path / "a", **kw)
    if change in ("proj_dim", "seed", "checkpoint", "grad_type", "kind"):
        kw[change] = {"proj_dim": 32, "seed": 2, "checkpoint": "ck2", "grad_type": "sign", "kind": "sjlt"}[change]
    elif change == "sjlt s":
        kw["s"] = 2
    elif change == "data":
        ex = ex[:4] + _examples(1, seed=5, prefix="other")
    elif change == "labels only":  # the same tokens, one more of them scored (position 1 is prompt: -100)
        ex[2]["labels"][1] = ex[2]["input_ids"][1]
    elif change == "trainable set":  # the same gradient length, other parameters: layer 0's q_proj for layer 1's o_proj
        out_w, in_w = model.model.layers[1].self_attn.o_proj.weight, model.model.layers[0].self_attn.q_proj.weight
        assert out_w.requires_grad and not in_w.requires_grad and out_w.shape == in_w.shape
        out_w.requires_grad_(False)
        in_w.requires_grad_(True)
    elif change == "trainable weight":
        with torch.no_grad():
            named[0][1].mul_(1.01)
    elif change == "frozen weight":
        with torch.no_grad():
            model.model.embed_tokens.weight[3, 0] += 0.5
        assert not model.model.embed_tokens.weight.requires_grad
    elif change == "permuted trainable values":
        _permute_in_place(named[0][1])
    elif change == "reordered moments":
        sd = torch.load(tmp_path / "optimizer.pt", weights_only=True)
        _permute_in_place(sd["state"][0]["exp_avg"])
        _permute_in_place(sd["state"][0]["exp_avg_sq"])
        torch.save(sd, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError):
        _collect(impl, model, ex, tmp_path / "a", **kw)


def test_failed_first_run_does_not_poison_the_directory(impl, tmp_path):
    model = _lm()
    ex = _examples(4)
    for bad in ({"proj_dim": 0}, {"chunk_size": 0}, {"batch_size": -1}, {"grad_type": "adam"}):  # adam: no state
        with pytest.raises(REFUSED):
            _collect(impl, model, ex, tmp_path / "a", **bad)
    frozen = _train_only(_lm(), "nothing")  # no trainable parameter
    with pytest.raises(REFUSED):
        _collect(impl, frozen, ex, tmp_path / "a")
    _collect(impl, model, ex, tmp_path / "a")  # the corrected run is not refused
    assert impl.load_features(tmp_path / "a" / "features.safetensors")[1] == [e["id"] for e in ex]


def test_collection_files_follow_the_umask(impl, tmp_path):
    old = os.umask(0o022)
    try:
        _collect(impl, _lm(), _examples(3), tmp_path / "a")
    finally:
        os.umask(old)
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o044 == 0o044, f"{p} is not readable by others: {oct(p.stat().st_mode)}"


def _bad_examples(case):
    """(model, examples, what the error must name) for one kind of bad example."""
    model, ex = _lm(), _examples(4)
    if case in ("no response token", "label at position 0 only"):
        ex[2]["labels"] = [-100] * len(ex[2]["labels"])
        if case == "label at position 0 only":  # nothing predicts position 0: still no scored token
            ex[2]["labels"][0] = ex[2]["input_ids"][0]
        return model, ex, "ex2"
    if case == "duplicate id":
        ex[3]["id"] = "ex1"
        return model, ex, "ex1"
    if case == "missing id":
        del ex[2]["id"]
        return model, ex, "id"
    if case == "tensor id":  # not storable as JSON: refused, never stored as a string of a tensor
        ex[2]["id"] = torch.tensor(7)
        return model, ex, "id"
    ex[1]["input_ids"][0] = 63  # non-finite gradient: only example ex1 touches token 63, a NaN embedding row
    for e in ex[:1] + ex[2:]:
        e["input_ids"] = [t % 63 for t in e["input_ids"]]
    with torch.no_grad():
        model.model.embed_tokens.weight[63] = float("nan")
    return model, ex, "ex1"


BAD_EXAMPLES = ["no response token", "label at position 0 only", "duplicate id", "missing id", "tensor id",
                "non-finite gradient"]


@pytest.mark.parametrize("case", BAD_EXAMPLES)
def test_bad_examples_are_refused(impl, tmp_path, case):
    """An example with no scored token (its loss is NaN), two rows for one id, an id that cannot be stored, a
    non-finite gradient: collection refuses, never stores NaN or zero rows or rows that ids cannot find."""
    model, ex, _ = _bad_examples(case)
    with pytest.raises(REFUSED):
        _collect(impl, model, ex, tmp_path / "a")


@pytest.mark.policy
@pytest.mark.parametrize("case", BAD_EXAMPLES)
def test_bad_examples_are_errors_naming_the_id(impl, tmp_path, case):
    model, ex, culprit = _bad_examples(case)
    with pytest.raises(ValueError, match=culprit):
        _collect(impl, model, ex, tmp_path / "a")


# --- matching: which files may be scored together


def _files(impl, tmp_path, model, name, ex, **kw):
    _collect(impl, model, ex, tmp_path / name, **kw)
    return str(tmp_path / name / "features.safetensors")


def test_match_scores_stored_files_and_refuses_incompatible_ones(impl, tmp_path):
    model = _lm()
    ex, val = _examples(6), _examples(4, seed=3, prefix="val")
    t1, v1 = _files(impl, tmp_path, model, "t1", ex), _files(impl, tmp_path, model, "v1", val)
    other_model = _lm()
    with torch.no_grad():
        other_model.model.embed_tokens.weight[5, 3] += 0.25  # another base model: another gradient everywhere
    scores, ids = impl.match([t1], [v1], n_subtasks=2)
    assert ids == [e["id"] for e in ex]
    tf, vf = impl.load_features(t1)[0], impl.load_features(v1)[0]
    assert_close(scores, scores64([tf], [vf], [1.0], 2))
    bad_pairs = {
        "seed": ([t1], [_files(impl, tmp_path, model, "v-seed", val, seed=9)]),
        "kind": ([t1], [_files(impl, tmp_path, model, "v-sjlt", val, kind="sjlt")]),
        "checkpoint": ([t1], [_files(impl, tmp_path, model, "v-ck", val, checkpoint="ck2")]),
        "model": ([t1], [_files(impl, tmp_path, other_model, "v-model", val)]),
        "val ids differ between checkpoints": ([t1, _files(impl, tmp_path, model, "t2", ex, checkpoint="ck2")],
                                               [v1, _files(impl, tmp_path, model, "v2", val[::-1], checkpoint="ck2")]),
        "train ids differ between checkpoints": ([t1, _files(impl, tmp_path, model, "t3", ex[::-1], checkpoint="ck3")],
                                                 [v1, _files(impl, tmp_path, model, "v3", val, checkpoint="ck3")]),
        "one val file for two train files": ([t1, t1], [v1]),
    }
    for what, (tp, vp) in bad_pairs.items():
        with pytest.raises(ValueError):
            impl.match(tp, vp)
            pytest.fail(f"match accepted files whose {what}")


# --- data preparation: which tokens carry the loss


def _word_tokenizer():
    return word_tokenizer(["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] +
                          [str(i) for i in range(20)] + ["what", "is", "+", "?", "=", "####", "the", "answer"])


def test_encode_prompt_response_and_messages(impl):
    """Labels exactly on the response and its eos ({"prompt", "response"}), or on the assistant turns of a chat
    (each turn's tokens through its end marker), -100 elsewhere."""
    tok = _word_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ex = impl.encode_example({"id": "a", "prompt": "what is 3 + 4 ?", "response": "7"}, tok)
    assert ex["id"] == "a" and ex["input_ids"] == ids("what is 3 + 4 ? 7 <eos>")
    assert ex["labels"] == [-100] * 6 + ids("7 <eos>")
    msgs = [{"role": "system", "content": "the answer"}, {"role": "user", "content": "what is 1 + 2 ?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "+ 4 ?"}, {"role": "assistant", "content": "7"}]
    ex = impl.encode_example({"id": "b", "messages": msgs}, tok)
    assert ex["input_ids"] == ids(tok.apply_chat_template(msgs, tokenize=False))
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert kept == ids("3 <|im_end|> 7 <|im_end|>"), tok.decode(kept)
    assert all(lab in (-100, t) for t, lab in zip(ex["input_ids"], ex["labels"]))


def test_encode_truncates_the_end_and_refuses_a_record_left_without_response(impl):
    """max_length keeps the first tokens (the prompt stays whole, the response is cut); a cut that leaves no
    response token, or a record of another shape, is refused."""
    tok = _word_tokenizer()
    rec = {"id": "long", "prompt": "what is 3 + 4 ?", "response": "1 2 3 4 5"}
    full, cut = impl.encode_example(rec, tok), impl.encode_example(rec, tok, max_length=8)
    assert cut["input_ids"] == full["input_ids"][:8] and cut["labels"] == full["labels"][:8]
    assert cut["labels"][6:] == full["input_ids"][6:8]
    with pytest.raises(REFUSED):
        impl.encode_example(rec, tok, max_length=6)  # the prompt's 6 tokens only
    with pytest.raises(REFUSED):
        impl.encode_example({"id": "x", "text": "what"}, tok)


@pytest.mark.policy
def test_encode_errors_name_the_record(impl):
    tok = _word_tokenizer()
    with pytest.raises(ValueError, match="'long'.*max_length=6"):
        impl.encode_example({"id": "long", "prompt": "what is 3 + 4 ?", "response": "7"}, tok, max_length=6)
    with pytest.raises(ValueError, match="'x'.*prompt"):
        impl.encode_example({"id": "x", "text": "what"}, tok)


# --- the whole method in memory, and DataFlex's dynamic selection


def test_in_memory_method_equals_the_stored_pipeline(impl, tmp_path):
    """less_scores over two checkpoints (weights, Adam moments, eta) equals collect_features per checkpoint +
    match with the same weights, and both equal the float64 scores computed here."""
    model, opt, named = _trainer_setup()
    pool, val = _examples(7), _examples(4, seed=3, prefix="val")
    ckpts, train_files, val_files, t64, v64 = [], [], [], [], []
    for c in range(2):
        if c:  # a second checkpoint: one more step moves weights and moments
            model(input_ids=torch.tensor([pool[0]["input_ids"]]), labels=torch.tensor([pool[0]["labels"]])).loss.backward()
            opt.step()
        torch.save(opt.state_dict(), tmp_path / f"opt{c}.pt")
        moments = tuple(torch.cat([opt.state[p][k].reshape(-1) for _, p in named]) for k in ("exp_avg", "exp_avg_sq"))
        ckpts.append(({n: p.detach().clone() for n, p in model.named_parameters()}, moments, [0.7, 0.3][c]))
        train_files.append(_files(impl, tmp_path, model, f"t{c}", pool, grad_type="adam", checkpoint=f"ck{c}",
                                  optimizer_state=str(tmp_path / f"opt{c}.pt")))
        val_files.append(_files(impl, tmp_path, model, f"v{c}", val, checkpoint=f"ck{c}"))
        t64.append(expected_features(impl, model, pool, adam=moments))
        v64.append(expected_features(impl, model, val))
    stored, ids = impl.match(train_files, val_files, [0.7, 0.3], n_subtasks=2)
    memory = impl.less_scores(model, ckpts, pool, val, impl.Projection(64, 1), n_subtasks=2)
    assert ids == [e["id"] for e in pool] and memory.dtype == torch.float32
    assert_close(memory, scores64(t64, v64, [0.7, 0.3], 2), "less_scores")
    assert_close(stored, scores64(t64, v64, [0.7, 0.3], 2), "collect_features + match")


@pytest.mark.parametrize("eps_outside", [True, False])
def test_select_step_uses_the_live_optimizer_moments(impl, eps_outside):
    """DataFlex's step: Adam features from the live optimizer (eps outside the root by default), mean cosine
    with the validation gradients, the n_select best; the model's train/eval mode restored."""
    model, opt, named = _trainer_setup()
    pool, val = _examples(12), _examples(3, seed=7, prefix="val")
    model.train()
    chosen = impl.select_step(model, opt, pool, val, n_select=4, projection=impl.Projection(256),
                              eps_outside=eps_outside).tolist()
    assert model.training, "select_step must restore the model's train mode (dropout stays on in training)"
    m, v = (torch.cat([opt.state[p][k].reshape(-1) for _, p in named]) for k in ("exp_avg", "exp_avg_sq"))
    R = projection_matrix(impl, m.numel(), 256, 0)
    expected = scores64([adam64(loop_gradients(model, pool), m, v, eps_outside) @ R], [loop_gradients(model, val).double() @ R], [1.0], 1)
    best = expected.argsort(descending=True).tolist()
    assert len(chosen) == 4 and len(set(chosen)) == 4
    # the 4 best up to float32 rounding of the scores: every chosen one within 1e-5 of the 4th best or above it
    assert all(expected[i] >= expected[best[3]] - 1e-5 for i in chosen), (chosen, best[:4])
    assert all(expected[a] >= expected[b] - 1e-5 for a, b in zip(chosen, chosen[1:])), "not in descending order"
    model.eval()
    impl.select_step(model, opt, pool[:3], val, n_select=1, projection=impl.Projection(64))
    assert not model.training


# --- sharded collection under torch.distributed (gloo, on CPU), through impl


def _dist_worker(rank, world, init_file, module_name, job, out_dir, n, result_file):
    import importlib
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mod = importlib.import_module(module_name)
    try:
        model, ex = _lm(), _examples(n)
        if job == "collect-crash" and rank == 1:
            real, calls = mod.example_gradients, []

            def dying(*a, **k):
                calls.append(1)
                if len(calls) == 3:  # chunk 0 (positions 1 3 5 7) took 2 batches: die in chunk 1
                    os._exit(3)  # the process dies: no cleanup, no exception handling
                return real(*a, **k)

            mod.example_gradients = dying
        if job == "collect-raise":  # ex5 (rank 1's shard in a world of 2) alone meets a NaN weight
            for e in ex:
                e["input_ids"] = [t % 63 for t in e["input_ids"]]
            ex[5]["input_ids"][0] = 63
            with torch.no_grad():
                model.model.embed_tokens.weight[63] = float("nan")
        if job.startswith("collect"):
            try:
                mod.collect_features(model, ex, out_dir, grad_type="sgd", projection=mod.Projection(64, 1),
                                     checkpoint="ck1", chunk_size=4, batch_size=3)
            except ValueError as e:
                with open(f"{result_file}.{rank}", "w") as f:
                    f.write(str(e))
        elif job == "select":
            opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2)
            model(input_ids=torch.tensor([ex[0]["input_ids"]]), labels=torch.tensor([ex[0]["labels"]])).loss.backward()
            opt.step()
            chosen = mod.select_step(model, opt, ex, _examples(3, seed=7, prefix="val"), n_select=4,
                                     projection=mod.Projection(64))
            with open(f"{result_file}.{rank}", "w") as f:
                json.dump(chosen.tolist(), f)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")


def _module_name(impl):
    return impl.name if hasattr(impl, "_module") else impl.__name__


def _spawn(impl, tmp_path, world, job, out_dir=None, n=9, tag=""):
    import torch.multiprocessing as mp

    init = tmp_path / f"init-{job}-{world}-{tag}"
    result = tmp_path / f"result-{job}-{world}"
    mp.spawn(_dist_worker, args=(world, str(init), _module_name(impl), job, str(out_dir), n, str(result)), nprocs=world, join=True)
    return result


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_style_collection_equals_single_process(impl, tmp_path, world):
    """Each rank takes DistributedSampler's shard (padded by repeats); the merged file has every id once, in
    dataset order, with the rows computed here in one process."""
    impl.collect_features  # skip early when not provided
    ex = _examples(9)
    _spawn(impl, tmp_path, world, "collect", tmp_path / "multi")
    feats, ids, _ = impl.load_features(tmp_path / "multi" / "features.safetensors")
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, _lm(), ex), rtol=1e-4, atol=1e-6)


def test_an_error_on_one_rank_stops_every_rank_with_its_cause(impl, tmp_path):
    """Rank 1 meets a non-finite gradient while rank 0 has finished: both ranks end with an error that names
    the example, and no merged file is written. (A rank left waiting would end at the gloo timeout with a
    timeout error instead, without the example's id: promptness is checked by the message, not by a clock.)"""
    impl.collect_features
    result = _spawn(impl, tmp_path, 2, "collect-raise", tmp_path / "multi")
    assert not (tmp_path / "multi" / "features.safetensors").exists()
    msgs = [open(f"{result}.{r}").read() if os.path.exists(f"{result}.{r}") else "" for r in range(2)]
    assert "ex5" in msgs[1] and "ex5" in msgs[0], msgs


# ============================================================================
# Part B: reference-only machinery (less_ref itself; deselected when --less-impl names a candidate)

import less_ref as ref  # noqa: E402
from cli import less as less_cli  # noqa: E402


def test_projection_matrix_ignores_block_size_and_is_never_whole():
    x = torch.randn(3, 1000)
    for kind in KINDS:
        a = ref.project(x, 128, seed=5, block_rows=1000, kind=kind)
        for block in (1, 7, 333):
            assert_projections_close(ref.project(x, 128, seed=5, block_rows=block, kind=kind), a, x, 128)
    assert torch.equal(ref.rademacher_block(5, 100, 50, 128), ref.rademacher_block(5, 0, 1000, 128)[100:150])


def test_hash_multiplication_is_exact():
    """_mul32 splits the product so int64 never overflows: compare with Python's big integers."""
    h = torch.tensor([0, 1, 2 ** 32 - 1, 123456789, 2 ** 31], dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF):
        assert ref._mul32(h, c).tolist() == [(int(v) * c) % 2 ** 32 for v in h.tolist()]


def test_projection_row_limit_is_exact():
    W = 8192 // 32
    limit = 2 ** 63 // W
    ref.project(torch.eye(1), 8192, row_offset=limit - 1)
    with pytest.raises(ValueError, match=str(limit)):
        ref.project(torch.eye(2), 8192, row_offset=limit - 1)


def test_loop_and_vmap_gradients_agree():
    model = _train_only(_lm(), "q_proj,v_proj")
    ex = _examples(5)
    torch.testing.assert_close(ref.example_gradients(model, ex, "vmap"), ref.example_gradients(model, ex, "loop"),
                               rtol=1e-4, atol=1e-6)


def test_trainer_optimizer_matches_trainer_grouping(tmp_path):
    model, opt, named = _trainer_setup()
    order, sizes = ref.trainer_param_order(model)
    ours = less_cli.trainer_optimizer(model, lr=1e-2)
    assert [len(g["params"]) for g in ours.param_groups] == sizes == [len(g["params"]) for g in opt.param_groups]
    sd = opt.state_dict()
    sd["param_groups"] = [sd["param_groups"][0]]  # a file from another grouping
    torch.save(sd, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="param_groups"):
        ref.adam_state(model, str(tmp_path / "optimizer.pt"))


def _ref_collect(model, ex, out, **kw):
    return _collect(ref, model, ex, out, **kw)


def test_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    model = _lm()
    ex = _examples(13)
    _ref_collect(model, ex, tmp_path / "clean")
    clean = ref.merge_features(str(tmp_path / "clean"))
    real, calls = ref.example_gradients, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # the 5th batch: mid-way through the 3rd chunk
            raise KeyboardInterrupt("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(ref, "example_gradients", failing)
    with pytest.raises(KeyboardInterrupt):
        _ref_collect(model, ex, tmp_path / "run")
    shard = tmp_path / "run" / "shard-000-of-001"
    assert sorted(os.listdir(shard)) == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    (shard / "chunk_000002.safetensors.tmp999").write_bytes(b"half a file")  # a torn write
    (shard / "chunk_000001.safetensors").write_bytes(b"\x00" * 10)  # and a truncated chunk
    calls.clear()
    monkeypatch.setattr(ref, "example_gradients", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with pytest.warns(UserWarning, match="chunk_000001"):
        _ref_collect(model, ex, tmp_path / "run")
    assert len(calls) == 5, "finished chunks must not be recomputed (chunk 1: 2 batches, 2: 2, 3: 1)"
    assert not any(".tmp" in f for f in os.listdir(shard)), "temp files of killed writes must be cleaned"
    feats, ids, _ = ref.merge_features(str(tmp_path / "run"))
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0])


def test_refusals_name_the_field_that_changed(tmp_path):
    model = _lm()
    ex = _examples(5)
    _ref_collect(model, ex, tmp_path / "a")
    for change in ({"proj_dim": 32}, {"seed": 2}, {"checkpoint": "ck2"}, {"grad_type": "sign"}, {"kind": "sjlt"}):
        with pytest.raises(ValueError, match=list(change)[0] if "kind" not in change else "projection"):
            _ref_collect(model, ex, tmp_path / "a", **change)
    with pytest.raises(ValueError, match="data"):
        _ref_collect(model, ex[:4] + _examples(1, seed=5, prefix="other"), tmp_path / "a")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(ValueError, match="model"):
        _ref_collect(model, ex, tmp_path / "a")


def test_storage_errors_name_the_file(tmp_path, monkeypatch):
    """A param_order naming an unknown parameter names it; a truncated identity.json, a full disk or a read-only
    directory name the file; a finished run is not written again (a read-only output works); two configurations
    racing for one new directory: the second is told another configuration is there."""
    model, opt, named = _trainer_setup()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="'lm_head.nope'"):
        ref.adam_state(model, str(tmp_path / "optimizer.pt"), param_order=[n for n, _ in named][:-1] + ["lm_head.nope"])
    ex = _examples(4)
    _ref_collect(model, ex, tmp_path / "a")
    monkeypatch.setattr(ref, "_write_atomic", lambda *a: pytest.fail("a finished run wrote a file"))
    monkeypatch.setattr(ref, "_check_identity", lambda *a: None)
    assert _ref_collect(model, ex, tmp_path / "a").endswith("features.safetensors")
    monkeypatch.undo()
    (tmp_path / "a" / "identity.json").write_text('{"grad_')
    with pytest.raises(ValueError, match="identity.json"):
        _ref_collect(model, ex, tmp_path / "a")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="chunk_000000.safetensors.*No space left"):
        _ref_collect(model, ex, tmp_path / "b")
    monkeypatch.undo()
    real_exists = os.path.exists
    monkeypatch.setattr(ref.os.path, "exists", lambda p: False if str(p).endswith("identity.json") else real_exists(p))
    ref._check_identity(str(tmp_path / "c"), {"seed": 1})  # both runs see no identity.json; the first one wins
    with pytest.raises(ValueError, match="another configuration.*seed"):
        ref._check_identity(str(tmp_path / "c"), {"seed": 2})
    monkeypatch.undo()
    monkeypatch.setattr(ref.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links here")))
    ref._check_identity(str(tmp_path / "d"), {"seed": 1})  # a filesystem without hard links still works
    assert json.loads((tmp_path / "d" / "identity.json").read_text()) == {"seed": 1} and os.listdir(tmp_path / "d") == ["identity.json"]


def test_model_fingerprint_sees_content_not_sums():
    a = _lm()
    fa = ref.model_fingerprint(a)
    b = _lm()
    assert ref.model_fingerprint(b) == fa
    with torch.no_grad():
        b.model.embed_tokens.weight[[0, 1]] = b.model.embed_tokens.weight[[1, 0]].clone()  # rows swapped
    assert ref.model_fingerprint(b) != fa
    c = _lm()
    c.model.embed_tokens.weight.requires_grad_(False)  # another trainable set: another gradient layout
    assert ref.model_fingerprint(c) != fa


def test_match_refusal_names_files_and_first_differing_id(tmp_path):
    model = _lm()
    ex, val = _examples(4), _examples(2, seed=3, prefix="val")
    f = {n: _files(ref, tmp_path, model, n, d, checkpoint=c) for n, d, c in
         (("t1", ex, "a"), ("v1", val, "a"), ("t2", ex, "b"), ("v2", val[::-1], "b"))}
    with pytest.raises(ValueError, match=r"v2.*v1.*val1"):
        ref.match([f["t1"], f["t2"]], [f["v1"], f["v2"]])


def test_trainer_state_and_bad_files(tmp_path):
    log = [{"epoch": 0.5, "learning_rate": 2.0}, {"epoch": 1.0, "learning_rate": 1.0}, {"epoch": 1.0, "loss": 3.0},
           {"epoch": 1.5, "learning_rate": 0.5}, {"epoch": 2.0, "learning_rate": 0.25}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    assert less_cli.checkpoint_weights_from_trainer_state(tmp_path / "trainer_state.json") == [1.5, 0.375]
    (tmp_path / "bad.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(ValueError, match="log_history"):
        less_cli.checkpoint_weights_from_trainer_state(tmp_path / "bad.json")
    (tmp_path / "gap.json").write_text(json.dumps({"log_history": log[:2] + [{"epoch": 3.0, "learning_rate": 0.1}]}))
    with pytest.raises(ValueError, match="epoch 2"):  # epoch 2 missing: not silently 2 weights for 3 epochs
        less_cli.checkpoint_weights_from_trainer_state(tmp_path / "gap.json")
    (tmp_path / "cut.json").write_text('{"log_history": [')
    with pytest.raises(ValueError, match="cut.json"):
        less_cli.checkpoint_weights_from_trainer_state(tmp_path / "cut.json")


def test_demo_selects_the_validation_task(tmp_path):
    """The pool is 10% 'copy' (the validation task); the top 5% (20 examples) must hold >= 10 copy examples.
    Seeds 0-3 gave 20, 14, 17, 15; random selection gives 2 on average and >= 10 with probability < 1e-5."""
    hit, n = less_cli.demo(str(tmp_path))
    assert n == 20 and hit >= 10, hit


# --- sharded collection internals, dead ranks, dynamic selection (gloo on CPU)


def _fake_rank(monkeypatch, rank, world):
    """Run one rank's share in this process: the shard files are exactly what that rank would write."""
    sync = ref._sync
    monkeypatch.setattr(ref, "_world", lambda: (rank, world))
    monkeypatch.setattr(ref, "_sync", lambda r, w, fn: sync(0, 1, fn))
    monkeypatch.setattr(ref, "merge_features", lambda out_dir: None)  # merged once every rank has run


def _sharded(tmp_path, monkeypatch, ex, world, name="s"):
    model = _lm()
    for rank in range(world):
        _fake_rank(monkeypatch, rank, world)
        _ref_collect(model, ex, tmp_path / name, chunk_size=2)
    monkeypatch.undo()
    return tmp_path / name


def test_shard_positions_pad_like_distributed_sampler():
    assert [ref.shard_positions(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    from torch.utils.data import DistributedSampler

    for n, world in ((7, 3), (10, 4), (5, 5), (3, 4)):
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)
            assert ref.shard_positions(n, r, world) == list(sampler)


def test_merge_refuses_missing_rank_conflicts_and_foreign_chunks(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    ex = _examples(7)
    out = _sharded(tmp_path, monkeypatch, ex, 2)
    feats, ids, _ = ref.merge_features(str(out))
    torch.testing.assert_close(feats.double(), expected_features(ref, _lm(), ex), rtol=1e-4, atol=1e-6)
    last = out / "shard-001-of-002" / "chunk_000001.safetensors"  # positions [5, 0]: 0 is the padding repeat
    original = last.read_bytes()
    feats, ids, identity = ref.load_features(last)
    pos = load_file(str(last))["positions"]
    assert pos.tolist() == [5, 0]
    ref._write_atomic({"features": feats * torch.tensor([[1.0], [-1.0]]), "positions": pos},
                      {"ids": ids, "identity": identity}, str(last))
    with pytest.raises(ValueError, match="two different rows for sample id 'ex0'"):
        ref.merge_features(str(out))
    ref._write_atomic({"features": feats, "positions": pos}, {"ids": ids, "identity": dict(identity, seed=99)}, str(last))
    with pytest.raises(ValueError, match="another configuration"):
        ref.merge_features(str(out))
    last.write_bytes(original)
    ref.merge_features(str(out))
    last.unlink()
    with pytest.raises(ValueError, match="rank 1 has not finished"):
        ref.merge_features(str(out))
    shutil.rmtree(out / "shard-001-of-002")
    with pytest.raises(ValueError, match="rank 1 of 2 wrote nothing"):
        ref.merge_features(str(out))


def test_dead_rank_then_resume_equals_clean_run(tmp_path):
    import torch.multiprocessing as mp

    ex = _examples(9)
    _ref_collect(_lm(), ex, tmp_path / "single")
    single = ref.load_features(tmp_path / "single" / "features.safetensors")
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(ref, tmp_path, 2, "collect-crash", tmp_path / "multi", tag="crash")
    assert not (tmp_path / "multi" / "features.safetensors").exists()
    assert len(os.listdir(tmp_path / "multi" / "shard-001-of-002")) == 1, "rank 1 died in its 2nd chunk"
    _spawn(ref, tmp_path, 2, "collect", tmp_path / "multi", tag="resume")
    feats, ids, _ = ref.load_features(tmp_path / "multi" / "features.safetensors")
    assert ids == single[1]
    torch.testing.assert_close(feats, single[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="world_size"):  # another world size is another configuration
        _ref_collect(_lm(), ex, tmp_path / "multi")


def test_select_step_is_broadcast_so_ranks_agree(tmp_path):
    result = _spawn(ref, tmp_path, 2, "select", n=9)
    picks = [json.load(open(f"{result}.{r}")) for r in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 4
    model, ex = _lm(), _examples(9)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2)
    model(input_ids=torch.tensor([ex[0]["input_ids"]]), labels=torch.tensor([ex[0]["labels"]])).loss.backward()
    opt.step()
    single = ref.select_step(model, opt, ex, _examples(3, seed=7, prefix="val"), n_select=4, projection=ref.Projection(64))
    assert picks[0] == single.tolist()


# --- JSONL reading (the command-line tools)


def test_read_jsonl_ids_and_bad_lines(tmp_path):
    """Default ids come from the record's content, so they follow it through a reordering or an insertion (a
    repeated record gets -2); bad lines are errors naming file and line."""
    from cli.common import read_jsonl
    lines = ['{"id": "q1", "prompt": "1", "response": "2"}', '{"prompt": "3", "response": "4"}',
             '{"prompt": "5", "response": "6"}', '{"prompt": "3", "response": "4"}']
    (tmp_path / "d.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    ids = [r["id"] for r in read_jsonl(tmp_path / "d.jsonl")]
    assert ids[0] == "q1" and len(set(ids)) == 4 and ids[3] == ids[1] + "-2" and ids[1].startswith("rec-")
    (tmp_path / "e.jsonl").write_text("\n".join(['{"prompt": "0", "response": "0"}', lines[2], lines[1]]) + "\n")
    moved = {r["prompt"]: r["id"] for r in read_jsonl(tmp_path / "e.jsonl")}
    assert moved["5"] == ids[2] and moved["3"] == ids[1]
    for name, text, where in (("bad.jsonl", '{"id": 1}\n[1, 2]\n', "bad.jsonl:2"), ("enc.jsonl", b'{"a": 1}\n{"b": "\xff"}\n', "enc.jsonl:2.*UTF-8"),
                              ("empty.jsonl", "\n", "empty.jsonl: no records"), ("none.jsonl", None, "none.jsonl: no such file")):
        if text is not None:
            (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=where):
            read_jsonl(tmp_path / name)


def _tiny_model_dir(path):
    """A one-layer Llama and the word tokenizer saved as a model directory (what --model reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)


def test_command_line_collect_match_select(tmp_path):
    """The three LESS scripts as commands, on a model directory and JSONL files: selected records in score order."""
    import subprocess
    import sys

    _tiny_model_dir(tmp_path / "m")
    rows = [{"id": f"add{i}", "prompt": f"what is {i} + {i} ?", "response": f"{2 * i} #### {2 * i}"} for i in range(8)] + \
        [{"messages": [{"role": "user", "content": f"{i} ?"}, {"role": "assistant", "content": f"the answer is {i}"}]} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    common = ["--model", str(tmp_path / "m"), "--grad-type", "sgd", "--proj-dim", "64", "--checkpoint", "ck"]
    less_cli.main(["collect", *common, "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "t")])
    less_cli.main(["collect", *common, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "v"), "--method", "loop"])
    less_cli.main(["match", "--train", str(tmp_path / "t" / "features.safetensors"), "--val", str(tmp_path / "v" / "features.safetensors"),
              "--out", str(tmp_path / "scores.jsonl")])
    scores = [json.loads(x) for x in open(tmp_path / "scores.jsonl")]
    assert [s["id"] for s in scores][:8] == [f"add{i}" for i in range(8)] and len({s["id"] for s in scores}) == 14
    less_cli.main(["select", "--scores", str(tmp_path / "scores.jsonl"), "--data", str(tmp_path / "train.jsonl"), "--k", "3",
              "--out", str(tmp_path / "sel.jsonl")])
    chosen = [json.loads(x)["id"] for x in open(tmp_path / "sel.jsonl")]
    assert chosen == [s["id"] for s in sorted(scores, key=lambda s: -s["score"])[:3]]
    assert chosen[0] in ("add0", "add1"), "a validation example scores highest against itself"
    # the data reordered after collection (and a record inserted): select still writes the scored records
    (tmp_path / "moved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "new", "response": "x"}] + rows[::-1]))
    less_cli.main(["select", "--scores", str(tmp_path / "scores.jsonl"), "--data", str(tmp_path / "moved.jsonl"), "--k", "14",
                   "--out", str(tmp_path / "sel2.jsonl")])
    from cli.common import read_jsonl
    collected = {r["id"]: r for r in read_jsonl(tmp_path / "train.jsonl")}  # the records as collect saw them
    picked = [json.loads(x) for x in open(tmp_path / "sel2.jsonl")]
    assert [r["id"] for r in picked] == [s["id"] for s in sorted(scores, key=lambda s: -s["score"])]
    assert all(collected[r["id"]] == r for r in picked), "a reordered file gave another record for an id"
    # a user's mistake: one line, non-zero exit, no traceback
    sel = ["select", "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "x.jsonl")]
    for argv, says in ((sel + ["--scores", str(tmp_path / "scores.jsonl"), str(tmp_path / "scores.jsonl"), "--k", "2"], "scored twice"),
                       (sel + ["--scores", str(tmp_path / "scores.jsonl"), "--fraction", "0.05"], "selects 0 of 14"),
                       (["match", "--train", str(tmp_path / "nothing.safetensors"), "--val", str(tmp_path / "v" / "features.safetensors"),
                         "--out", str(tmp_path / "s.jsonl")], "no such feature file")):
        proc = subprocess.run([sys.executable, "cli/less.py", *argv], capture_output=True, text=True)
        assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp_path / "bad_scores.jsonl").write_text('{"id": "add0", "score": "high"}\n')
    with pytest.raises(ValueError, match="bad_scores.jsonl.*not a number"):
        less_cli.main(sel + ["--scores", str(tmp_path / "bad_scores.jsonl"), "--k", "1"])
    with pytest.raises(SystemExit):  # argparse: --max-length must be >= 2
        less_cli.main(["collect", *common, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "w"), "--max-length", "-3"])
    for args in (["--help"], ["collect", "--help"]):
        proc = subprocess.run([sys.executable, "cli/less.py", *args], capture_output=True, text=True)
        assert proc.returncode == 0 and (args == ["--help"] or re.search(r"\(default:\s+8192\)", proc.stdout)), proc.stdout
    bad = subprocess.run([sys.executable, "cli/less.py", "selekt"], capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_command_line_warmup_collect_match_select(tmp_path):
    """LESS from the command line on a user's data, as the README's real-model section runs it: warmup (a peft LoRA
    trained by transformers' Trainer, a checkpoint per epoch) -> collect (adam on train, sgd on val, per checkpoint)
    -> match (weights from the Trainer's logged learning rates) -> select."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from cli.common import read_jsonl

    _tiny_model_dir(tmp_path / "m")
    rows = [{"id": f"add{i}", "prompt": f"what is {i} + {i} ?", "response": f"{2 * i} #### {2 * i}"} for i in range(10)] + \
        [{"id": f"say{i}", "messages": [{"role": "user", "content": f"{i} ?"}, {"role": "assistant", "content": f"the answer is {i}"}]}
         for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    ckpts = less_cli.main(["warmup", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "train.jsonl"),
                           "--out", str(tmp_path / "warm"), "--fraction", "0.5", "--epochs", "2", "--grad-accum", "2",
                           "--lr", "1e-2", "--lora-r", "4", "--lora-targets", "q_proj,v_proj"])
    warm = [r["id"] for r in read_jsonl(tmp_path / "warm" / "warmup.jsonl")]
    assert len(warm) == 10 == len(set(warm)) and set(warm) <= {r["id"] for r in rows}
    assert [os.path.basename(c) for c in ckpts] == ["checkpoint-5", "checkpoint-10"], "10 records, 2 per step, 2 epochs"
    for c in ckpts:
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(c))
    log = json.load(open(os.path.join(ckpts[-1], "trainer_state.json")))["log_history"]
    lrs = [e["learning_rate"] for e in log if "learning_rate" in e]
    assert len(lrs) == 10 and lrs[1:] == sorted(lrs[1:], reverse=True) and max(lrs) <= 1e-2, "warm-up, linear decay"
    common = ["--model", str(tmp_path / "m"), "--proj-dim", "64", "--kind", "sjlt", "--method", "loop"]
    for e, c in enumerate(ckpts, 1):
        name = os.path.basename(c)
        less_cli.main(["collect", *common, "--lora-adapter", c, "--data", str(tmp_path / "train.jsonl"), "--grad-type", "adam",
                       "--optimizer-state", os.path.join(c, "optimizer.pt"), "--checkpoint", name, "--out", str(tmp_path / f"t{e}")])
        less_cli.main(["collect", *common, "--lora-adapter", c, "--data", str(tmp_path / "val.jsonl"), "--grad-type", "sgd",
                       "--checkpoint", name, "--out", str(tmp_path / f"v{e}")])
    less_cli.main(["match", "--train", *(str(tmp_path / f"t{e}" / "features.safetensors") for e in (1, 2)),
                   "--val", *(str(tmp_path / f"v{e}" / "features.safetensors") for e in (1, 2)),
                   "--trainer-state", os.path.join(ckpts[-1], "trainer_state.json"), "--out", str(tmp_path / "scores.jsonl")])
    scores = [json.loads(x) for x in open(tmp_path / "scores.jsonl")]
    # independent: the weighted mean over checkpoints of the mean cosine with the validation rows, in float64
    eta = [sum(v) / len(v) for v in ([e["learning_rate"] for e in log if "learning_rate" in e and math.ceil(e["epoch"] - 1e-9) == k]
                                     for k in (1, 2))]
    want = 0
    for e, w in zip((1, 2), eta):
        tr, tr_ids = _read_feature_file(tmp_path / f"t{e}")
        va, _ = _read_feature_file(tmp_path / f"v{e}")
        tr, va = (x.double() / x.double().norm(dim=1, keepdim=True) for x in (tr, va))
        want = want + w * (tr @ va.T).mean(1)
    want = want / sum(eta)
    assert [s["id"] for s in scores] == tr_ids == [r["id"] for r in rows]
    torch.testing.assert_close(torch.tensor([s["score"] for s in scores], dtype=torch.float64), want, rtol=1e-5, atol=1e-6)
    less_cli.main(["select", "--scores", str(tmp_path / "scores.jsonl"), "--data", str(tmp_path / "train.jsonl"),
                   "--fraction", "0.1", "--out", str(tmp_path / "sel.jsonl")])
    chosen = [r["id"] for r in read_jsonl(tmp_path / "sel.jsonl")]
    assert chosen == [rows[i]["id"] for i in want.argsort(descending=True)[:2].tolist()]
    # a fresh LoRA (--lora-r) is the same in every process, so a re-run is the same model; it has no Adam moments
    for out in ("f1", "f2"):
        less_cli.main(["collect", *common, "--lora-r", "2", "--data", str(tmp_path / "val.jsonl"), "--grad-type", "sgd",
                       "--checkpoint", "fresh", "--out", str(tmp_path / out)])
    torch.testing.assert_close(_read_feature_file(tmp_path / "f1")[0], _read_feature_file(tmp_path / "f2")[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no Adam moments"):
        less_cli.main(["collect", *common, "--lora-r", "2", "--data", str(tmp_path / "val.jsonl"), "--grad-type", "adam",
                       "--optimizer-state", os.path.join(ckpts[0], "optimizer.pt"), "--out", str(tmp_path / "f3")])


def _read_feature_file(out_dir):
    """(features, ids) of a finished collect directory, read with safetensors alone (not through the code under test)."""
    from safetensors import safe_open
    with safe_open(str(out_dir / "features.safetensors"), "pt") as f:
        meta = f.metadata()
        return f.get_tensor("features"), json.loads(meta["ids"])
