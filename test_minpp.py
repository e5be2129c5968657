"""Conformance suite for MinP+ and the classic samplers (SPEC Part 2).

Part A reaches the implementation only through the `impl` fixture (minpp_ref, or --minpp-impl NAME) and
compares it with float64 computations written here, independently of the code under test. Tokens whose
ratio r = p / max p lies within a few float32 ulps of a threshold may be bucketed either way by a correct
implementation: random draws drop such thresholds, and exact boundaries have their own tests on dyadic
values that every implementation computes exactly. Part B tests reference-only machinery (training,
save/load, generation, transformers integration) on minpp_ref itself.
"""
import math
import warnings

import pytest
import torch
from hypothesis import assume, given, strategies as st

from conftest import REFUSED, TOL, call, word_tokenizer

IMPL_KIND = "minpp"
spec = pytest.mark.spec
LOG_SLACK = 1e-5  # |log r - log tau| below this is "on the boundary": either side is correct
def mass_slack(V):
    """SPEC M3.2: top-p's kept-mass slack, 8 sqrt(V) eps32 (the typical float32 error of a sum of V probabilities,
    eight-fold): 7.6e-6 at V = 64, 3.4e-4 at V = 128256."""
    return 8 * math.sqrt(V) * torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ----------------------------------------------------------------------------
# independent float64 ground truth


def c64(r, tau, w):
    """c_v = sum_i w_i [tau_i <= r_v], by broadcasting (not bucketize)."""
    return ((tau[None, None, :] <= r[..., None]).double() * w).sum(-1)


def minpp64(p, tau, w):
    p = p.double() / p.double().sum(-1, keepdim=True)
    q = p * c64(p / p.amax(-1, keepdim=True), tau.double(), w.double())
    return q / q.sum(-1, keepdim=True)


def sampling_probs64(z, T, top_k=None, top_p=None, min_p=None, minpp=None):
    """softmax(z / T), then top-k, top-p (the smallest prefix by descending p with mass >= top_p), min-p and
    MinP+, each renormalised, in float64 (for inputs without ties or boundary values)."""
    p = torch.softmax(z.double() / T, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None:
        keep &= p >= p.topk(top_k, -1).values[..., -1:]
    if top_p is not None:
        s = torch.sort(p * keep, -1, descending=True).values
        n_kept = ((s.cumsum(-1) - s) / (p * keep).sum(-1, keepdim=True) < top_p).sum(-1, keepdim=True)
        keep &= p >= s.gather(-1, n_kept - 1)
    if min_p is not None:
        keep &= p >= min_p * (p * keep).amax(-1, keepdim=True)
    p = p * keep / (p * keep).sum(-1, keepdim=True)
    return minpp64(p, *minpp) if minpp is not None else p


def near_boundary(r, tau):
    """(K,) bool: thresholds that some token's r sits on within LOG_SLACK (r == tau == 1 is exact everywhere)."""
    lr, lt = r.double().log().reshape(-1, 1), tau.double().log()[None]
    return (((lr - lt).abs() < LOG_SLACK) & ~((lr == 0) & (lt == 0))).any(0)


def valid_weights(tau, w):
    """(tau, w) with at least one positive weight: a threshold set a correct implementation must accept."""
    if not len(tau):
        return torch.zeros(1), torch.ones(1)
    if w.sum() == 0:
        w = w.clone()
        w[-1] = 1.0
    return tau.contiguous(), w.contiguous()


def off_boundary(r, tau, w):
    """Drop the thresholds that some token's r sits on (either side is correct there); the weights that
    remain are never all zero."""
    keep = ~near_boundary(r, tau)
    return valid_weights(tau[keep], w[keep])


def assert_close(actual, expected, msg=""):
    tol = TOL.get(actual.dtype, TOL[torch.float32])  # float64 here is an upcast float32 result
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------
# strategies (every draw labelled, so a failure prints a reproducible example)


@st.composite
def logits(draw, max_rows=4, max_vocab=48):
    n = draw(st.integers(1, max_rows), label="rows")
    v = draw(st.integers(2, max_vocab), label="vocab")
    seed = draw(st.integers(0, 2 ** 31 - 1), label="seed")
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 8.0]), label="logit scale")
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if draw(st.booleans(), label="round logits (ties)"):
        z = z.round()
    return z


@st.composite
def thresholds(draw, max_k=8, zero=None):
    k = draw(st.integers(1, max_k), label="K")
    raw = draw(st.lists(st.floats(0, 1), min_size=k, max_size=k), label="tau")
    if zero if zero is not None else draw(st.booleans(), label="include tau=0"):
        raw = raw + [0.0]
    tau = torch.tensor(sorted(set(raw)), dtype=torch.float32).unique()
    weight = st.one_of(st.just(0.0), st.floats(1e-6, 10))  # no float32 subnormals: they are not weights
    w = torch.tensor(draw(st.lists(weight, min_size=len(tau), max_size=len(tau)), label="w"))
    if w.sum() == 0:
        w[-1] = 1.0
    return tau, w.float()


def probs_of(z, dtype):
    return torch.softmax(z, -1).to(dtype)


# ============================================================================
# Part A: properties, through impl


# --- M1: the MinP+ transform


@spec("M1.1")
@pytest.mark.parametrize("dtype", DTYPES)
@given(z=logits(), tw=thresholds())
def test_probs_form_matches_float64(impl, dtype, z, tw):
    """q = p c / sum p c, with tau_i <= r counted, bf16/fp16 inputs computed in fp32."""
    p = probs_of(z, dtype)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    tau, w = off_boundary(p64 / p64.amax(-1, keepdim=True), *tw)
    q = impl.minpp_probs(p, tau, w)
    assert q.shape == p.shape
    assert_close(q, minpp64(p64, tau, w), f"minpp_probs, input {dtype}")


@spec("M1.1")
def test_boundary_r_equal_tau_counts_as_passed(impl):
    """r == tau passes the threshold (dyadic values: every implementation computes r exactly)."""
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    tau, w = torch.tensor([0.25, 0.5]), torch.tensor([1.0, 2.0])
    # r = [1, .5, .25, .125, .125] -> c = [3, 3, 1, 0, 0]
    c = torch.tensor([[3.0, 3.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert_close(impl.minpp_probs(p, tau, w), p.double() * c / (p.double() * c).sum())


def assert_logits_close(out, expected, msg=""):
    """Judge logits in logit space, at the rounding of the dtype they are returned in, up to a per-row shift
    (z + log c and log_softmax(z + log c) are both correct): -inf exactly where expected is -inf, and
    |(out - expected) - (same at the row's max)| <= 4 eps(dtype) (|expected| + |row max|) + 4 eps(dtype)."""
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected)), f"{msg}: -inf must mark exactly the tokens with c = 0"
    assert torch.isfinite(out[~torch.isneginf(out)]).all(), f"{msg}: NaN or +inf"
    eps = torch.finfo(out.dtype).eps if out.dtype != torch.float64 else torch.finfo(torch.float32).eps
    o, e = out.double(), expected.double()
    top = e.argmax(-1, keepdim=True)
    shift = (o - e).gather(-1, top)
    fin = torch.isfinite(e)
    err = (o - e - shift).abs()[fin]
    bound = (4 * eps * (e.abs() + e.gather(-1, top).abs().expand_as(e) + 1))[fin]
    assert (err <= bound).all(), f"{msg}: logit error {(err - bound).max().item():.3g} above the dtype's rounding"


@spec("M1.2")
@pytest.mark.parametrize("dtype", DTYPES)
@given(z=logits(), tw=thresholds())
def test_logits_form_matches_probs_form(impl, dtype, z, tw):
    """minpp_logits(z) == z + log c (or any per-row shift of it, e.g. log q), c from r = exp(z - max z);
    judged in logit space at the rounding of the returned dtype. bf16/fp16 inputs: the reference returns
    float32, so the tolerance is float32's."""
    zd = z.to(dtype)
    z64 = zd.double()
    tau, w = off_boundary(torch.exp(z64 - z64.amax(-1, keepdim=True)), *tw)
    out = impl.minpp_logits(zd, tau, w)
    assert out.shape == zd.shape
    c = c64(torch.exp(z64 - z64.amax(-1, keepdim=True)), tau.double(), w.double())
    assert_logits_close(out, z64 + c.log(), f"minpp_logits, input {dtype}")


@spec("M1.3")
@given(z=logits(), tw=thresholds(), alpha=st.floats(1e-3, 1e3))
def test_weight_scale_invariance(impl, z, tw, alpha):
    """Both forms: w and alpha * w give one distribution (the logits form up to a per-row shift)."""
    p = probs_of(z, torch.float32)
    tau, w = off_boundary(p.double() / p.double().amax(-1, keepdim=True), *tw)
    assert_close(impl.minpp_probs(p, tau, w * alpha), minpp64(p, tau, w), f"w -> {alpha} * w")
    z = z.float()
    r = torch.exp(z.double() - z.double().amax(-1, keepdim=True))
    tau, w = off_boundary(r, *tw)
    assert_logits_close(impl.minpp_logits(z, tau, w * alpha), z.double() + c64(r, tau.double(), w.double()).log(),
                        f"minpp_logits, w -> {alpha} * w")


@spec("M1.3")
@given(z=logits(), p_base=st.floats(0.0, 1.0))
def test_single_threshold_is_min_p(impl, z, p_base):
    p = probs_of(z, torch.float32)
    tau, w = off_boundary(p.double() / p.double().amax(-1, keepdim=True), torch.tensor([p_base]), torch.ones(1))
    q = impl.minpp_probs(p, tau, w)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    keep = p64 / p64.amax(-1, keepdim=True) >= tau.double()
    assert_close(q, p64 * keep / (p64 * keep).sum(-1, keepdim=True), f"one threshold {tau.item()} == min-p")
    if tau.item() == p_base and hasattr(impl._module, "apply_min_p"):
        assert_close(q, impl.apply_min_p(p, p_base).double(), "minpp_probs vs apply_min_p")


@spec("M1.3")
@given(z=logits(), w0=st.floats(1e-3, 1e3))
def test_tau_zero_alone_is_identity(impl, z, w0):
    p = probs_of(z, torch.float32)
    assert_close(impl.minpp_probs(p, torch.zeros(1), torch.tensor([w0])), p.double() / p.double().sum(-1, keepdim=True))
    lz = impl.minpp_logits(z.float(), torch.zeros(1), torch.tensor([w0]))
    assert_close(torch.log_softmax(lz.double(), -1), torch.log_softmax(z.float().double(), -1))


@spec("M1.3")
@given(z=logits(), tw=thresholds())
def test_reweighting_is_monotone_in_r(impl, z, tw):
    """q_v / p_v is non-decreasing in r_v (tokens with p_v = 0 excluded)."""
    p = probs_of(z, torch.float32)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    tau, w = off_boundary(p64 / p64.amax(-1, keepdim=True), *tw)
    q = impl.minpp_probs(p, tau, w).double()
    for row_p, row_q in zip(p64, q):
        keep = row_p > 0
        order = torch.argsort(row_p[keep])
        ratio = (row_q[keep] / row_p[keep])[order]
        assert (ratio[1:] >= ratio[:-1] * (1 - 1e-5) - 1e-12).all(), f"q/p not monotone: {ratio.tolist()}"


@spec("M1.3")
def test_tau_one_keeps_only_max_and_its_ties(impl):
    z = torch.tensor([[2.0, 2.0, 1.0, -3.0], [0.0, 5.0, 4.999, 1.0]])
    for out in (impl.minpp_probs(torch.softmax(z, -1), torch.tensor([1.0]), torch.ones(1)),
                torch.softmax(impl.minpp_logits(z, torch.tensor([1.0]), torch.ones(1)).double(), -1)):
        assert_close(out, torch.tensor([[0.5, 0.5, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64))
    # with more thresholds, r = 1 gets all the weight: c(max) = sum w
    out = impl.minpp_probs(torch.tensor([[0.5, 0.5]]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert_close(out, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


@spec("M1.3")
@given(v=st.integers(1, 64), value=st.floats(-50, 50), tw=thresholds())
def test_all_equal_logits_all_survive(impl, v, value, tw):
    z = torch.full((2, v), value)
    uniform = torch.full((2, v), 1.0 / v, dtype=torch.float64)
    assert_close(impl.minpp_probs(torch.softmax(z, -1), *tw), uniform)
    assert_close(torch.softmax(impl.minpp_logits(z, *tw).double(), -1), uniform)


@spec("M1.3")
def test_masked_tokens_stay_masked(impl):
    z = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")]])
    tau, w = torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0])
    out = impl.minpp_logits(z, tau, w)
    assert torch.isneginf(out[0, [1, 3]]).all() and torch.isfinite(out[0, [0, 2]]).all()
    q = impl.minpp_probs(torch.softmax(z, -1), tau, w)
    assert (q[0, [1, 3]] == 0).all()


@spec("M1.3")
@given(z=logits(), tw=thresholds(), T=st.floats(0.2, 5.0))
def test_temperature_equals_tau_to_the_T(impl, z, tw, T):
    """MinP+ on softmax(z / T) with tau == reweighting softmax(z / T) by c computed on z with tau ** T."""
    z = z.float()
    tau, w = tw
    r = torch.exp(z.double() - z.double().amax(-1, keepdim=True))
    tau_T = (tau.double() ** T).float()
    keep = ~near_boundary(r ** (1 / T), tau) & ~near_boundary(r, tau_T)  # the same thresholds on both sides
    tau, tau_T, w = tau[keep], tau_T[keep], w[keep]
    assume(len(tau) and (tau_T.diff() > 0).all())  # tau ** T must stay strictly increasing in float32
    tau, w = valid_weights(tau, w)
    tau_T, _ = valid_weights(tau_T, w)
    lhs = impl.minpp_logits(z / T, tau, w)
    logc = impl.minpp_logits(z, tau_T, w) - z
    assert_close(torch.log_softmax(lhs.double(), -1).exp(), torch.softmax(z.double() / T + logc.double(), -1))


@spec("M1.3")
@given(z=logits(), tw=thresholds(), k=st.integers(1, 8))
def test_minpp_commutes_with_top_k(impl, z, tw, k):
    """minpp(top_k(p)) == top_k(minpp(p)) where the k-th largest p is not tied with the next one; with a tie
    at the boundary each side may keep another subset of the tied tokens, so each is checked on its own:
    a valid top-k set, and MinP+ of p restricted to that set (r is unchanged: the argmax is kept)."""
    p = probs_of(z, torch.float32)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    tau, w = off_boundary(p64 / p64.amax(-1, keepdim=True), *tw)
    a = impl.minpp_probs(impl.apply_top_k(p, k), tau, w).double()
    b = impl.apply_top_k(impl.minpp_probs(p, tau, w), k).double()
    s = torch.sort(p64, -1, descending=True).values
    kk = min(k, p.shape[1])
    kth = s[:, kk - 1:kk]
    nxt = s[:, kk:kk + 1] if kk < p.shape[1] else torch.zeros_like(kth)
    tied = (kth - nxt <= 1e-6 * kth)[:, 0]  # the boundary is ambiguous in float32
    q64 = minpp64(p64, tau, w)
    for out in (a, b):
        kept = out > 0
        assert not (kept & (p64 < kth * (1 - 1e-6))).any(), "a token below the k-th largest survived"
        assert (kept | (q64 == 0) | (p64 <= kth * (1 + 1e-6))).all(), "a token above the k-th largest was dropped"
        assert_close(out, q64 * kept / (q64 * kept).sum(-1, keepdim=True), "MinP+ of p restricted to the kept set")
    assert_close(a[~tied], b[~tied], "minpp(top_k(p)) vs top_k(minpp(p))")


BAD_PARAMS = {
    "unsorted tau": ([0.5, 0.1], [1.0, 1.0]),
    "duplicate tau": ([0.1, 0.1], [1.0, 1.0]),
    "tau > 1": ([0.1, 1.5], [1.0, 1.0]),
    "tau < 0": ([-0.1, 0.5], [1.0, 1.0]),
    "NaN tau": ([float("nan")], [1.0]),
    "negative w": ([0.0, 0.5], [1.0, -0.1]),
    "infinite w": ([0.0, 0.5], [1.0, float("inf")]),
    "NaN w": ([0.0, 0.5], [float("nan"), 1.0]),
    "all-zero w": ([0.0, 0.5], [0.0, 0.0]),
    "length mismatch": ([0.0, 0.5], [1.0]),
}


@spec("M1.4")
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
@pytest.mark.parametrize("fn", ["minpp_probs", "minpp_logits", "minpp_loss"])
def test_bad_thresholds_are_errors(impl, fn, case):
    tau, w = (torch.tensor(x) for x in BAD_PARAMS[case])
    z = torch.randn(3, 10)
    args = {"minpp_probs": (torch.softmax(z, -1),), "minpp_logits": (z,), "minpp_loss": (z, torch.tensor([1, 2, 3]))}[fn]
    with pytest.raises(ValueError):
        getattr(impl, fn)(*args, tau, w)


@spec("M1.4")
@pytest.mark.parametrize("row", [[float("nan"), 0.0, 1.0], [float("-inf")] * 3, [float("inf"), 0.0, 1.0]])
def test_undefined_logit_rows_are_errors(impl, row):
    z = torch.tensor([[0.0, 1.0, 2.0], row])
    with pytest.raises(ValueError):
        impl.minpp_logits(z, torch.tensor([0.0]), torch.ones(1))
    with pytest.raises(ValueError):
        impl.minpp_loss(z, torch.tensor([0, 1]), torch.tensor([0.0]), torch.ones(1))


@spec("M1.4")
@pytest.mark.parametrize("case", ["probs (0, V)", "probs (N, 0)", "logits (0, V)", "logits (N, 0)"])
def test_empty_inputs_are_errors(impl, case):
    """No row or no token: a ValueError saying so, never an internal error from a max over nothing."""
    x = torch.zeros(0, 5) if "(0, V)" in case else torch.zeros(3, 0)
    fn = impl.minpp_probs if case.startswith("probs") else impl.minpp_logits
    with pytest.raises(ValueError):
        fn(x, torch.tensor([0.0, 0.5]), torch.ones(2))


@spec("M1.4")
@pytest.mark.parametrize("w", [[1e-44, 0.0, 0.0], [1e-45, 0.0, 0.0], [3e38, 3e38, 3e38], [1e-45, 3e38, 0.0]])
def test_extreme_but_valid_weights(impl, w):
    """q does not depend on the scale of w: subnormal or huge weights give the exact distribution (or a
    ValueError that says why), never a wrong one, NaN or +inf."""
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tau, w = torch.tensor([0.0, 0.3, 0.6]), torch.tensor(w)
    try:
        q = impl.minpp_probs(torch.softmax(z, -1), tau, w)
        lz = impl.minpp_logits(z, tau, w)
        loss = impl.minpp_loss(z, torch.tensor([1]), tau, w)
    except ValueError:
        return
    w64 = torch.tensor(w.tolist(), dtype=torch.float64)
    expected = minpp64(torch.softmax(z.double(), -1), tau, w64)
    assert_close(q, expected)
    assert not torch.isnan(lz).any() and not torch.isposinf(lz).any()
    assert_close(torch.softmax(lz.double(), -1), expected)
    assert_close(loss.reshape(()), -expected[0, 1].log())


# --- M2: the loss, its statistics and the head


def loss64(z, target, tau, w, ignore_index=-100):
    keep = target != ignore_index
    q = minpp64(torch.softmax(z.double()[keep], -1), tau, w)
    return -q.gather(1, target[keep, None]).log().mean()


@pytest.mark.filterwarnings("ignore:MinP\\+ loss is inf:UserWarning")  # intended: targets with c = 0
@spec("M2.1")
@pytest.mark.parametrize("dtype", DTYPES)
@given(z=logits(max_rows=6), tw=thresholds(zero=True), seed=st.integers(0, 2 ** 31 - 1), T=st.sampled_from([1.0, 0.7]))
def test_loss_is_minus_log_q_of_target(impl, dtype, z, tw, seed, T):
    zd = (z / T).to(dtype)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, z.shape[1], (z.shape[0],), generator=g)
    target[torch.rand(z.shape[0], generator=g) < 0.3] = -100
    target[0] = 0  # at least one scored row
    z64 = zd.double()
    tau, w = off_boundary(torch.exp(z64 - z64.amax(-1, keepdim=True)), *tw)
    loss = impl.minpp_loss(zd, target, tau, w)
    expected = loss64(z64, target, tau, w)
    assert not torch.isnan(loss)
    if torch.isinf(expected):
        assert loss.item() == math.inf
    else:
        assert_close(loss.reshape(()), expected, f"minpp_loss, logits {dtype}")  # at the dtype it returns


@spec("M2.1")
@pytest.mark.parametrize("grid", ["log", "linear", "irregular"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_loss_equals_the_plain_loss(impl, grid, dtype):
    """Relation: minpp_loss (chunked) and minpp_loss_plain (the definition) agree in value and in their gradients
    w.r.t. the logits and the weights, on every kind of grid, with ignored rows and chunks smaller than N (the values
    themselves are checked against float64 in the tests around this one)."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(37, 300, generator=g) * 3).to(dtype)
    target = torch.randint(0, 300, (37,), generator=g)
    target[::5] = -100
    tau = {"log": _grid("log"), "linear": _grid("linear"), "irregular": torch.tensor([0.0, 0.01, 0.02, 0.3, 0.31])}[grid]
    w0 = torch.rand(tau.numel(), generator=g) + 0.1
    out = []
    for loss_fn in (impl.minpp_loss_plain, impl.minpp_loss):
        zz, w = z.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = loss_fn(zz, target, tau, w) if loss_fn is impl.minpp_loss_plain else call(loss_fn, zz, target, tau, w, chunk_rows=8)
        loss.backward()
        out.append((loss.detach().double(), zz.grad.double(), w.grad.double()))
    (lp, gzp, gwp), (lf, gzf, gwf) = out
    torch.testing.assert_close(lf, lp, rtol=2e-5, atol=1e-6)
    # gradients w.r.t. low-precision logits come back in that dtype: one rounding step apart at most
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] / 37)
    torch.testing.assert_close(gzf, gzp, **tol)
    torch.testing.assert_close(gwf, gwp, rtol=1e-4, atol=1e-6)


@spec("M2.1")
def test_loss_is_inf_not_nan_where_target_has_c_zero(impl):
    z = torch.tensor([[3.0, 0.0, -4.0], [0.0, 1.0, 2.0]])
    tau, w = torch.tensor([0.5]), torch.ones(1)  # token 2 of row 0 has r = e^-7 < 0.5: c = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = impl.minpp_loss(z, torch.tensor([2, 2]), tau, w)
    assert loss.item() == math.inf
    finite = impl.minpp_loss(z, torch.tensor([0, 2]), tau, w)
    assert math.isfinite(finite.item())


@spec("M2.1")
@pytest.mark.parametrize("pad", [0, 7, -1])
def test_any_ignore_index_leaves_its_rows_out(impl, pad):
    """ignore_index is a token id of the vocabulary (a pad id >= 0) or any other value: the rows whose target equals
    it are left out of the mean, the others scored -- minpp_loss and minpp_loss_plain against float64."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 12, generator=g) * 2
    target = torch.randint(0, 12, (9,), generator=g)
    target[[1, 4, 6]] = pad
    target[target == pad] = pad  # some rows may draw the pad id themselves: they are ignored too
    target[0] = 3 if pad != 3 else 2
    tau, w = torch.tensor([0.0, 0.2, 0.6]), torch.tensor([0.3, 1.0, 2.0])
    z64 = z.double()
    tau, w = off_boundary(torch.exp(z64 - z64.amax(-1, keepdim=True)), tau, w)
    expected = loss64(z64, target, tau, w, ignore_index=pad)
    for fn in ("minpp_loss", "minpp_loss_plain"):
        assert_close(getattr(impl, fn)(z, target, tau, w, ignore_index=pad).reshape(()), expected, f"{fn}, ignore_index={pad}")


@spec("M2.1")
def test_loss_of_logits_far_apart_is_inf_like_cross_entropy(impl):
    """exp(-6e38) underflows: the target's probability is 0 in float32 and F.cross_entropy says inf; so must
    the loss (a warning is fine, a crash or NaN is not)."""
    import warnings

    z = torch.tensor([[3e38, -3e38, 0.0]])
    assert torch.nn.functional.cross_entropy(z, torch.tensor([1])).item() == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = impl.minpp_loss(z, torch.tensor([1]), torch.tensor([0.0, 0.5]), torch.ones(2))
    assert loss.item() == math.inf


def loss_grads64(z64, target, tau, w):
    """The mean loss's gradients in float64 (z64 at the temperature, -inf allowed): dL/dz_n = (q_n - onehot(t_n)) / N
    and dL/dw_k = mean_n [ -1[tau_k <= r_t] / c_t + sum_j p_j 1[tau_k <= r_j] / sum_j p_j c_j ]; and the size of
    the two terms of dL/dw that cancel (w is scale invariant), mean 1 / c_t, for an absolute tolerance."""
    N = z64.shape[0]
    p, r = torch.softmax(z64, -1), torch.exp(z64 - z64.amax(-1, keepdim=True))
    passed = (tau.double()[None, None, :] <= r[..., None]).double()  # (N, V, K)
    c = (passed * w.detach().double()).sum(-1)  # (N, V)
    rows = torch.arange(N)
    gw = (-passed[rows, target] / c[rows, target, None] + (p[..., None] * passed).sum(1) / (p * c).sum(1, keepdim=True)).mean(0)
    q = p * c / (p * c).sum(-1, keepdim=True)
    gz = (q - torch.nn.functional.one_hot(target, z64.shape[1]).double()) / N
    return gz, gw, (1 / c[rows, target]).mean().item()


@spec("M2.2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(z=logits(max_rows=5), tw=thresholds(zero=True), seed=st.integers(0, 2 ** 31 - 1))
def test_loss_gradients_wrt_logits_and_weights(impl, dtype, z, tw, seed):
    """Against float64 math on the same (rounded) inputs, at the tolerance of the dtype each gradient comes in:
    dL/dz_n = (q_n - onehot(t_n)) / N and
    dL/dw_k = mean_n [ -1[tau_k <= r_t] / c_t + sum_j p_j 1[tau_k <= r_j] / sum_j p_j c_j ]."""
    zd = z.to(dtype).requires_grad_(True)
    z64 = zd.detach().double()
    r = torch.exp(z64 - z64.amax(-1, keepdim=True))
    tau, w = off_boundary(r, *tw)
    w = (w + 0.1).requires_grad_(True)  # all weights > 0 so every target is reachable
    target = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(seed))
    impl.minpp_loss(zd, target, tau, w).backward()
    N = z.shape[0]
    gz, gw, scale = loss_grads64(z64, target, tau, w)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-5 * scale)  # w is float32
    assert zd.grad.dtype == dtype, "the gradient w.r.t. the logits comes in the logits' dtype"
    torch.testing.assert_close(zd.grad.double(), gz, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] / N)


def _grid(name):
    """The evenly spaced grids a head is trained on, built here: [0, 64 log-spaced from 1e-5 to 1] and 17 linear."""
    if name == "log":
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-5, 0, 64, dtype=torch.float64)]).float()
    return torch.linspace(0, 1, 17, dtype=torch.float64).float()


@spec("M2.2")
@pytest.mark.parametrize("grid", ["log", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_on_evenly_spaced_grids(impl, grid, dtype):
    """The loss and its gradients w.r.t. the logits and the weights on the grids heads use (where a fast path may
    bucket tokens arithmetically), V = 4000, flat and peaked rows, against float64; tokens within LOG_SLACK of a
    threshold are masked to -inf so either side is never asked."""
    tau = _grid(grid)
    g = torch.Generator().manual_seed(7)
    z64 = torch.randn(48, 4000, generator=g, dtype=torch.float64) * torch.tensor([0.5, 3.0, 8.0]).repeat(16)[:, None].double()
    zd = z64.to(dtype)
    r = torch.exp(zd.double() - zd.double().amax(-1, keepdim=True))
    near = ((r.log()[..., None] - tau.double().log()).abs() < LOG_SLACK).any(-1) & (r < 1)
    zd = zd.masked_fill(near, float("-inf")).requires_grad_(True)
    z64 = zd.detach().double()
    w = (torch.rand(tau.numel(), generator=g) + 0.05).requires_grad_(True)
    finite = torch.isfinite(z64)
    target = torch.multinomial(finite.double(), 1, generator=g)[:, 0]
    loss = impl.minpp_loss(zd, target, tau, w)
    loss.backward()
    assert_close(loss.reshape(()), loss64(z64, target, tau, w.detach()), f"loss, {grid} grid, {dtype}")
    gz, gw, scale = loss_grads64(z64, target, tau, w)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(zd.grad.double(), gz, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] / 48)
    # the same rows through band statistics (where a fast path may bucket arithmetically as well)
    stats = call(impl.band_statistics, zd.detach(), target, tau, chunk_rows=20)
    log_p, band, mass = band64(z64, target, tau)
    assert torch.equal(stats.band.long().cpu(), band)
    torch.testing.assert_close(stats.mass.double(), mass, rtol=1e-5, atol=1e-6)
    w2 = w.detach().clone().requires_grad_(True)
    band_loss = impl.band_loss(stats, w2)
    band_loss.backward()
    assert_close(band_loss.reshape(()), loss64(z64, target, tau, w.detach()), f"band_loss, {grid} grid, {dtype}")
    torch.testing.assert_close(w2.grad.double(), gw, rtol=1e-4, atol=1e-5 * scale)


def _rows_at(log_r, V, n_rows, seed):
    """Logits (n_rows, V): token 0 is the max (log r = 0), tokens 1..len(log_r) sit at the given log r values,
    the rest are spread over log r in [-12, -0.05]."""
    g = torch.Generator().manual_seed(seed)
    z = -0.05 - 11.95 * torch.rand(n_rows, V, generator=g, dtype=torch.float64)
    z[:, 0] = 0.0
    z[:, 1:1 + len(log_r)] = torch.as_tensor(log_r, dtype=torch.float64)
    return z


@spec("M2.2")
@pytest.mark.parametrize("case", ["nearly even grid", "just past the smallest threshold, few above it",
                                  "just past thresholds, most tokens above the smallest"])
def test_loss_near_the_fast_paths_decisions(impl, case):
    """Where a fast path decides how to bucket tokens: a log grid with one threshold moved by 0.4% (not evenly
    spaced: arithmetic bucketing would misplace the tokens between its old and new place); tokens 0.05% above
    or below a threshold, among few (sparse) or many (dense) tokens above the smallest positive threshold.
    Loss and gradients against float64; tokens within LOG_SLACK of a threshold are masked to -inf."""
    if case == "nearly even grid":
        tau = _grid("log").double()
        between = math.log(tau[30].item() * 1.002)
        tau[30] *= 1.004
        log_r = [between] * 150
        z64 = _rows_at(log_r, 400, 12, 0)
    else:
        dense = case.startswith("just past thresholds")
        tau = _grid("log").double() if dense else torch.tensor([0.0, 0.01, 0.1, 0.5], dtype=torch.float64)
        picks = tau[1:][:: 8 if dense else 1]
        log_r = [math.log(t) + sign * 5e-4 for t in picks.tolist() for sign in (1, -1)] * (4 if dense else 1)
        z64 = _rows_at(log_r, 400, 12, 1)
        if not dense:  # few tokens above tau = 0.01: the rest far below it
            z64[:, 1 + len(log_r):] -= 30
    tau = tau.float()
    z = z64.float()
    r = torch.exp(z.double() - z.double().amax(-1, keepdim=True))
    near = ((r.log()[..., None] - tau.double().log()).abs() < LOG_SLACK).any(-1) & (r < 1)
    z = z.masked_fill(near, float("-inf")).requires_grad_(True)
    z64 = z.detach().double()
    w = (torch.rand(tau.numel(), generator=torch.Generator().manual_seed(2)) + 0.05).requires_grad_(True)
    target = torch.tensor([1 + (i % len(log_r)) for i in range(z.shape[0])])
    assert torch.isfinite(z64.gather(1, target[:, None])).all()
    loss = impl.minpp_loss(z, target, tau, w)
    loss.backward()
    assert_close(loss.reshape(()), loss64(z64, target, tau, w.detach()), case)
    gz, gw, scale = loss_grads64(z64, target, tau, w)
    # float32 sums: dL/dw_k sums N V terms of size ~ 1 / c_t, dL/dz a row's V terms (SPEC: worst case n eps32)
    N, V, eps = z.shape[0], z.shape[1], torch.finfo(torch.float32).eps
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=N * V * eps * scale)
    torch.testing.assert_close(z.grad.double(), gz, rtol=TOL[torch.float32]["rtol"], atol=V * eps / N)


def band64(z64, target, tau, ignore_index=-100):
    """Band statistics in float64 by broadcasting: log p_t, b = #{i: tau_i <= r_t}, M_i = sum_v p_v [r_v >= tau_i]."""
    keep = target != ignore_index
    p = torch.softmax(z64[keep], -1)
    r, t = p / p.amax(-1, keepdim=True), target[keep]
    passed = (tau.double()[None, None, :] <= r[..., None]).double()  # (N, V, K)
    rows = torch.arange(t.numel())
    return p[rows, t].log(), passed[rows, t].sum(-1).long(), (p[..., None] * passed).sum(1)


@spec("M2.3")
@pytest.mark.parametrize("dtype", DTYPES)
@given(z=logits(max_rows=6), tw=thresholds(zero=True), seed=st.integers(0, 2 ** 31 - 1),
       T=st.sampled_from([1.0, 1.5, 0.7]), chunk=st.sampled_from([None, 1, 2]), ignore=st.sampled_from([-100, 0]))
def test_band_statistics_and_band_loss(impl, dtype, z, tw, seed, T, chunk, ignore):
    """band_statistics at temperature T against float64 (log p_t, the target's band, the band masses M, rows whose
    target is ignore_index left out -- -100 or a pad id 0 --, any chunking); band_loss from them equals the float64
    loss, its gradient w.r.t. w equals dL/dw of the loss, and row weights give the weighted mean of the row losses."""
    zd = z.to(dtype)
    z64 = zd.double() / T
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, z.shape[1], (z.shape[0],), generator=g)
    target[torch.rand(z.shape[0], generator=g) < 0.3] = ignore
    target[0] = 1
    tau, w = off_boundary(torch.exp(z64 - z64.amax(-1, keepdim=True)), *tw)
    w = (w + 0.1).requires_grad_(True)  # every target reachable: a finite loss
    stats = call(impl.band_statistics, zd, target, tau, temperature=T, chunk_rows=chunk,
                 ignore_index=None if ignore == -100 else ignore)
    log_p, band, mass = band64(z64, target, tau, ignore_index=ignore)
    assert torch.equal(stats.band.long().cpu(), band), (stats.band, band)
    torch.testing.assert_close(stats.log_p.double(), log_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mass.double(), mass, rtol=1e-5, atol=1e-6)
    loss = impl.band_loss(stats, w)
    loss.backward()
    assert_close(loss.reshape(()), loss64(z64, target, tau, w.detach(), ignore), f"band_loss, logits {dtype}, T={T}")
    _, gw, scale = loss_grads64(z64[target != ignore], target[target != ignore], tau, w)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-5 * scale)
    rho = torch.rand(z.shape[0], generator=g, dtype=torch.float64) + 0.1
    weighted = impl.band_loss(call(impl.band_statistics, zd, target, tau, temperature=T, weight=rho,
                                   ignore_index=None if ignore == -100 else ignore), w.detach())
    keep = target != ignore
    rows = torch.stack([loss64(z64[i:i + 1], target[i:i + 1], tau, w.detach()) for i in keep.nonzero()[:, 0]])
    assert_close(weighted.reshape(()), (rho[keep] * rows).sum() / rho[keep].sum(), "band_loss with row weights")


@spec("M2.4")
def test_head_file_round_trip(impl, tmp_path):
    """save / load keeps K, tau and theta bit for bit (tau is a persistent buffer), so the loaded head gives the
    same distribution; the state_dict holds tau too."""
    head = impl.MinPPlusHead(K=6, grid="log", tau_min=0.01)
    with torch.no_grad():
        head.theta.copy_(torch.tensor([-9.0, -1.5, 2.0, 0.5, 3.25, -0.75]))
    assert "tau" in head.state_dict()
    head.save(tmp_path / "head.safetensors")
    back = impl.MinPPlusHead.load(tmp_path / "head.safetensors")
    assert back.tau.numel() == 6 and torch.equal(back.tau, head.tau) and torch.equal(back.theta, head.theta)
    p = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    assert torch.equal(back(p), head(p))


def regulariser64(w, reg):
    """H(w / sum w) in nats ('entropy') or sum(w) ('l1'), float64."""
    pi = w / w.sum()
    return -(pi * pi.clamp_min(1e-300).log()).sum() if reg == "entropy" else w.sum()


@spec("M2.4")
@pytest.mark.parametrize("variant", ["plain", "entropy lam 0.3 (sharpens)", "entropy lam -0.3 (smooths)", "l1 lam 0.05",
                                     "from BandStats"])
def test_train_head_at_a_temperature_on_its_own_grid(impl, variant):
    """train_head at T = 1.7 on a 6-threshold linear grid (not the default log grid) ends where Adam on the float64
    loss of that grid and temperature ends (40 steps, lr 0.05, theta from 0): every weight within 0.02, the loss
    within 1e-4 -- with the regulariser (lam > 0 on the entropy sharpens: H(w / sum w) ends lower than without it;
    lam < 0 smooths), and from the BandStats of M2.3 in place of logits and target."""
    reg, lam = ("l1", 0.05) if variant.startswith("l1") else ("entropy", float(variant.split()[2]) if "lam" in variant else 0.0)
    g = torch.Generator().manual_seed(4)
    T, steps, lr = 1.7, 40, 0.05
    z = torch.randn(60, 30, generator=g) * 3
    head = impl.MinPPlusHead(K=6, grid="linear")
    tau = head.tau.detach().clone()
    r = torch.exp(z.double() / T - (z.double() / T).amax(-1, keepdim=True))
    assert not near_boundary(r, tau).any(), "the test's logits must keep off the thresholds"
    target = torch.multinomial(torch.softmax(z / T, -1), 1, generator=g)[:, 0]
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    softplus = torch.nn.functional.softplus
    objective = lambda th: loss64(z.double() / T, target, tau, softplus(th)) + lam * regulariser64(softplus(th), reg)  # noqa: E731
    for _ in range(steps):
        loss = objective(theta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if variant == "from BandStats":
        impl.train_head(head, impl.band_statistics(z, target, tau, temperature=T), steps=steps, lr=lr)
    else:
        kw = {"reg": reg, "lam": lam} if lam else {}
        impl.train_head(head, z, target, steps=steps, lr=lr, temperature=T, **kw)
    ours = head.theta.detach().double()
    torch.testing.assert_close(ours, theta.detach(), rtol=0, atol=0.02)
    assert objective(ours).item() <= objective(theta.detach()).item() + 1e-4
    assert objective(ours).item() < objective(torch.zeros(6, dtype=torch.float64)).item() - 1e-3, "no progress"
    if reg == "entropy" and lam:  # the direction the SPEC promises, against training without the regulariser
        plain = impl.MinPPlusHead(K=6, grid="linear")
        impl.train_head(plain, z, target, steps=steps, lr=lr, temperature=T)
        h, h0 = regulariser64(softplus(ours), reg), regulariser64(softplus(plain.theta.detach().double()), reg)
        assert (h < h0) if lam > 0 else (h > h0), f"lam = {lam}: H(w / sum w) {h:.4f} vs {h0:.4f} without it"


@spec("M2.1")
@pytest.mark.parametrize("fn", ["minpp_loss", "minpp_loss_plain", "band_statistics"])
@pytest.mark.parametrize("bad", [5, 6, -1], ids=["V", "V + 1", "-1 (not ignore_index)"])
def test_a_target_outside_the_vocabulary_is_refused(impl, fn, bad):
    """A target outside [0, V) that is not ignore_index has no probability: any error, never a loss computed for a
    clamped or wrapped target (a silently wrong loss; LESS's L2.2 refuses label V alike)."""
    z, target = torch.randn(2, 5), torch.tensor([0, bad])
    tau, w = torch.tensor([0.0, 0.3]), torch.ones(2)
    with pytest.raises(Exception):  # noqa: B017 -- the error's type is policy (M2.5)
        getattr(impl, fn)(z, target, tau, *(() if fn == "band_statistics" else (w,)))


@spec("M2.3")
@pytest.mark.parametrize("tau", [[0.01, 0.1, 0.5], [0.2], [0.05, 0.3, 0.9]], ids=lambda t: f"tau {t}")
@pytest.mark.parametrize("chunk", [None, 2])
def test_band_statistics_on_a_grid_without_tau_zero(impl, tau, chunk):
    """On a grid without tau = 0 the tokens below tau_1 are in no band but still in the distribution: log p_t and
    the masses M are those of softmax(z), never of the distribution renormalised over the tokens above tau_1
    (band_loss hides that, its normaliser cancels)."""
    g = torch.Generator().manual_seed(5)
    z64 = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2.5
    tau = torch.tensor(tau)
    r = torch.exp(z64 - z64.amax(-1, keepdim=True))
    near = ((r.log()[..., None] - tau.double().log()).abs() < LOG_SLACK).any(-1) & (r < 1)
    z64 = z64.masked_fill(near, float("-inf"))  # tokens on a threshold may go either way: none there
    target = torch.randint(0, 30, (6,), generator=g)  # some below tau_1: in no band
    target = torch.where(z64.gather(1, target[:, None])[:, 0].isfinite(), target, z64.argmax(-1))
    stats = call(impl.band_statistics, z64.float(), target, tau, chunk_rows=chunk)
    log_p, band, mass = band64(z64, target, tau)
    assert torch.equal(stats.band.long().cpu(), band), (stats.band, band)
    torch.testing.assert_close(stats.log_p.double(), log_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mass.double(), mass, rtol=1e-5, atol=1e-6)


@spec("M2.5")
@pytest.mark.parametrize("bad", [5, -1, -7])
def test_loss_target_out_of_range_is_error(impl, bad):
    z = torch.randn(2, 5)
    with pytest.raises(ValueError):
        impl.minpp_loss(z, torch.tensor([0, bad]), torch.tensor([0.0]), torch.ones(1))


@spec("M2.5")
@pytest.mark.parametrize("case", ["tau as a list", "N = 0", "V = 0", "float target", "chunk_rows = -1"])
def test_bad_loss_arguments_are_errors(impl, case):
    """Python lists for tau, an empty batch or vocabulary, float targets, a negative chunk size: a TypeError or
    ValueError that says what, not an AttributeError, a NaN or a silent empty loop."""
    z, t, tau, w, kw = torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.5]), torch.ones(2), {}
    if case == "tau as a list":
        tau = [0.0, 0.5]
    elif case == "N = 0":
        z, t = torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)
    elif case == "V = 0":
        z = torch.zeros(3, 0)
    elif case == "float target":
        t = t.float()
    else:
        kw = {"chunk_rows": -1}
    with pytest.raises(REFUSED):
        impl.minpp_loss(z, t, tau, w, **kw)


@spec("M2.5")
def test_a_mean_whose_sum_overflows_float32_is_finite(impl):
    """Two rows whose losses are ~2e38 each (logits 2e38 apart): the mean is ~2e38, finite, though their float32
    sum overflows (a crash in the warning path before)."""
    z, tau = torch.tensor([[0.0, -2e38], [0.0, -2e38]]), torch.tensor([0.0, 0.05, 0.3])
    loss = impl.minpp_loss(z, torch.tensor([1, 1]), tau, torch.ones(3))
    expected = 2e38 + math.log(3.0)  # -log q_1 = -(z_1 + log c_1 - log(e^{z_0} 3 + e^{z_1}))
    assert torch.isfinite(loss) and abs(loss.item() - expected) <= 1e-6 * expected, loss


@spec("M2.5")
def test_loss_with_no_scored_target_is_error_not_nan(impl):
    with pytest.raises(ValueError):
        impl.minpp_loss(torch.randn(2, 5), torch.tensor([-100, -100]), torch.tensor([0.0]), torch.ones(1))


@spec("M2.5")
def test_band_statistics_refuses_bad_input_and_names_infinite_rows(impl):
    """A bad weight, temperature, logit or target is a ValueError naming it (a NaN logit: its caller's row, with
    chunking and ignored rows); a target below every weighted threshold gives loss +inf with a warning, not NaN."""
    g = torch.Generator().manual_seed(0)
    z, t, tau = torch.randn(5, 10, generator=g), torch.randint(0, 10, (5,), generator=g), torch.tensor([0.0, 0.1, 0.5])
    for kw, says in (({"weight": -torch.ones(5)}, "weight"), ({"weight": torch.ones(3)}, "weight"),
                     ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=says):
            impl.band_statistics(z, t, tau, **kw)
    bad = z.clone()
    bad[3, 2] = float("nan")
    t_ign = t.clone()
    t_ign[0] = -100
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        impl.band_statistics(bad, t_ign, tau, chunk_rows=2)
    with pytest.raises(ValueError, match="outside"):
        impl.band_statistics(z, torch.full((5,), 10), tau)
    low = z.argmin(1)  # r far below 0.5
    stats = impl.band_statistics(z * 5, low, torch.tensor([0.5]))
    with pytest.warns(UserWarning, match="inf"):
        assert impl.band_loss(stats, torch.ones(1)).item() == math.inf


@spec("M2.5")
def test_an_infinite_loss_warns_how_many_rows_and_why(impl):
    z = torch.tensor([[3.0, 0.0, -4.0], [0.0, 1.0, 2.0]])
    with pytest.warns(UserWarning, match="inf at 1 .*row 0"):
        impl.minpp_loss(z, torch.tensor([2, 2]), torch.tensor([0.5]), torch.ones(1))


def _stats_case(impl, case):
    """A call that must be refused: statistics used with another grid or temperature, bad weights, bad training."""
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(20, 12, generator=g) * 2, torch.randint(0, 12, (20,), generator=g)
    head = impl.MinPPlusHead(K=4, grid="linear")
    stats = impl.band_statistics(z, t, head.tau, temperature=1.5)
    if case == "statistics of another grid of the same K":
        other = impl.band_statistics(z, t, torch.tensor([0.0, 0.1, 0.2, 0.3]), temperature=1.5)
        return lambda: impl.train_head(head, other, steps=2)
    if case == "statistics of another temperature":
        return lambda: impl.train_head(head, stats, steps=2, temperature=2.0)
    if case == "a target with the statistics":
        return lambda: impl.train_head(head, stats, t, steps=2)
    if case.startswith("band_loss"):
        w = {"band_loss: negative w": torch.tensor([1.0, -0.5, 1.0, 1.0]), "band_loss: all-zero w": torch.zeros(4),
             "band_loss: NaN w": torch.tensor([1.0, float("nan"), 1.0, 1.0]), "band_loss: w of length K + 1": torch.ones(5),
             "band_loss: a list for the statistics": torch.ones(4), "band_loss: row weights of another length": torch.ones(4)}[case]
        if "row weights" in case:
            stats = stats._replace(weight=stats.weight[:-1])
        return lambda: impl.band_loss(list(stats) if "list" in case else stats, w)
    if case.startswith("row weights"):  # train_head and band_loss alike: a NaN would train theta to NaN
        bad = stats.weight.clone()
        bad[3] = {"row weights: NaN": float("nan"), "row weights: negative": -1.0, "row weights: inf": float("inf")}[case]
        return lambda: (impl.train_head(head, stats._replace(weight=bad), steps=2), impl.band_loss(
            stats._replace(weight=bad), torch.ones(4)))
    if case == "BandStats.cat of no statistics":
        return lambda: type(stats).cat([])
    kw = {"steps = -5": {"steps": -5}, "steps = 0": {"steps": 0}, "lam = NaN": {"lam": float("nan")},
          "lr = 0": {"lr": 0.0}}[case]
    return lambda: impl.train_head(head, z, t, **kw)


STATS_CASES = ["statistics of another grid of the same K", "statistics of another temperature", "a target with the statistics",
               "band_loss: negative w", "band_loss: all-zero w", "band_loss: NaN w", "band_loss: w of length K + 1",
               "band_loss: a list for the statistics", "band_loss: row weights of another length", "steps = -5", "steps = 0", "lam = NaN", "lr = 0",
               "row weights: NaN", "row weights: negative", "row weights: inf", "BandStats.cat of no statistics"]


@spec("M2.4")
@pytest.mark.parametrize("case", STATS_CASES[:2] + [c for c in STATS_CASES if c.startswith("row weights")])
def test_band_statistics_of_another_grid_or_temperature_never_train(impl, case):
    """train_head on BandStats made for another grid of the same K, or at another temperature than it is asked to
    train at, or whose row weights are NaN, inf or negative, would fit the wrong loss (or NaN) without any sign: any
    error, never a trained head."""
    with pytest.raises(Exception):  # noqa: B017 -- the error's type and message are policy (M2.5)
        _stats_case(impl, case)()


@spec("M2.5")
@pytest.mark.parametrize("case", STATS_CASES)
def test_band_statistics_are_tied_to_what_made_them(impl, case):
    """BandStats carry their thresholds and temperature: used with another grid or temperature (a wrong loss without
    any error), with a target, with weights minpp_loss would refuse, or training that could not train: refused."""
    with pytest.raises(REFUSED):
        _stats_case(impl, case)()


# --- M3: the classic samplers


def check_renormalised(q, p64, kept):
    assert torch.equal(q > 0, kept), "zero entries must be exactly the dropped tokens"
    assert_close(q, p64 * kept / (p64 * kept).sum(-1, keepdim=True), "kept tokens renormalised")


def check_top_p(q, p64, top_p):
    """Order-free nucleus properties: the argmax is kept, kept mass >= top_p, dropping the smallest kept
    value(s) goes below top_p, every kept token >= every dropped one (mass_slack(V) at the mass boundary)."""
    for row_p, row_q in zip(p64, q):
        kept = row_q > 0
        assert row_p[kept].max() == row_p.max(), "a most likely token must be kept"
        slack = mass_slack(row_p.numel())
        assert row_p[kept].sum() >= top_p - slack
        min_kept = row_p[kept].min()
        assert row_p[kept & (row_p > min_kept)].sum() < top_p + slack, "not minimal"
        if (~kept).any():
            assert min_kept >= row_p[~kept].max()
    check_renormalised(q, p64, q > 0)


@spec("M3.1")
@given(z=logits(max_vocab=64), top_p=st.floats(1e-3, 1.0))
def test_top_p_is_the_minimal_prefix(impl, z, top_p):
    p = probs_of(z, torch.float32)
    check_top_p(impl.apply_top_p(p, top_p), p.double() / p.double().sum(-1, keepdim=True), top_p)


@spec("M3.1")
def test_top_p_keeps_the_boundary_token(impl):
    q = impl.apply_top_p(torch.tensor([[0.4, 0.35, 0.25]]), 0.7)
    assert_close(q, torch.tensor([[0.4 / 0.75, 0.35 / 0.75, 0.0]], dtype=torch.float64))
    assert_close(impl.apply_top_p(torch.tensor([[0.4, 0.35, 0.25]]), 1.0), torch.tensor([[0.4, 0.35, 0.25]], dtype=torch.float64))


@spec("M3.1")
@given(z=logits(max_vocab=64), k=st.integers(1, 70))
def test_top_k_keeps_the_k_largest(impl, z, k):
    """Tokens above the k-th largest kept, below it dropped, at least k kept; ties with the k-th either way."""
    p = probs_of(z, torch.float32)
    q = impl.apply_top_k(p, k)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    kth = torch.sort(p64, -1, descending=True).values[:, min(k, p.shape[1]) - 1:min(k, p.shape[1])]
    kept = q > 0
    assert kept[p64 > kth].all() and not kept[p64 < kth].any()
    assert (kept.sum(-1) >= min(k, p.shape[1])).all()
    check_renormalised(q, p64, kept)


@spec("M3.1")
@given(z=logits(max_vocab=64), p_base=st.floats(0.0, 1.0))
def test_min_p_keeps_ratio_at_least_p_base(impl, z, p_base):
    p = probs_of(z, torch.float32)
    q = impl.apply_min_p(p, p_base)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    r = p64 / p64.amax(-1, keepdim=True)
    kept = q > 0
    sure = (r - p_base).abs() > 1e-6 * max(p_base, 1e-30)
    assert torch.equal(kept[sure], (r >= p_base)[sure]), "kept set differs from r >= p_base"
    check_renormalised(q, p64, kept)


@spec("M3.1")
def test_min_p_keeps_the_boundary_token(impl):
    q = impl.apply_min_p(torch.tensor([[0.5, 0.25, 0.125, 0.125]]), 0.5)
    assert_close(q, torch.tensor([[2 / 3, 1 / 3, 0, 0]], dtype=torch.float64))


@spec("M3.1")
def test_top_p_one_keeps_every_token_of_a_large_vocabulary(impl):
    """top_p = 1 keeps all 50k tokens: a float32 cumsum reaches 1.0 long before the tail, and
    (cumsum - p) < 1 then drops it (the bug zeroed tens of thousands of tokens)."""
    p = torch.softmax(torch.randn(2, 50000, generator=torch.Generator().manual_seed(0)) * 3, -1)
    assert (p > 0).all()
    q = impl.apply_top_p(p, 1.0)
    assert (q > 0).all(), f"{int((q == 0).sum())} tokens dropped"
    assert_close(q, p.double() / p.double().sum(-1, keepdim=True))


@spec("M3.1")
@pytest.mark.parametrize("top_p,n_kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.875, 3), (0.9, 4), (0.9375, 4),
                                          (0.95, 5)])
def test_top_p_boundary_on_exact_probabilities(impl, top_p, n_kept):
    """Dyadic probabilities, where the exclusive cumsum and cumsum - p are both exact: token i (descending) is
    kept iff the mass before it is < top_p, so a mass of exactly top_p reached by the kept tokens stops there
    (0.5 + 0.25 = 0.75 keeps 2 at top_p = 0.75) and the token that crosses top_p is kept (3 at 0.8)."""
    p = torch.tensor([[0.0625, 0.25, 0.5, 0.0625, 0.125]])  # sorted: .5 .25 .125 .0625 .0625
    q = impl.apply_top_p(p, top_p)
    kept = (q > 0)[0].tolist()
    if n_kept == 4:  # the two 0.0625 tie: keeping either (or both, order-free) is correct
        assert kept[1] and kept[2] and kept[4] and (kept[0] or kept[3]), kept
    else:
        assert sum(kept) == n_kept and all(kept[i] for i in [2, 1, 4][:n_kept]), kept
    check_renormalised(q, p.double(), q > 0)


def _big_probs(V, dtype, seed=0):
    z = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * 4
    return torch.softmax(z, -1).to(dtype)


@spec("M3.2")
@pytest.mark.parametrize("sampler", ["top_p", "min_p", "top_k", "minpp_probs", "minpp_logits", "next_token_probs"])
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_samplers_on_low_precision_large_vocabularies(impl, sampler, V, dtype):
    """fp16 / bf16 inputs at real vocabulary sizes: every sampler against float64 math on the same rounded
    input, at the tolerance of the dtype the result comes in."""
    p = _big_probs(V, dtype)
    p64 = p.double() / p.double().sum(-1, keepdim=True)
    r = p64 / p64.amax(-1, keepdim=True)
    tau, w = off_boundary(r, torch.tensor([0.0, 1e-4, 1e-2, 0.1, 0.5]), torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3]))
    if sampler == "top_p":
        check_top_p(impl.apply_top_p(p, 0.9), p64, 0.9)
    elif sampler == "min_p":
        q = impl.apply_min_p(p, 0.1)
        sure = (r - 0.1).abs() > 1e-6
        assert torch.equal((q > 0)[sure], (r >= 0.1)[sure])
        check_renormalised(q, p64, q > 0)
    elif sampler == "top_k":
        q = impl.apply_top_k(p, 50)
        kth = torch.sort(p64, -1, descending=True).values[:, 49:50]
        assert (q > 0)[p64 > kth].all() and not (q > 0)[p64 < kth].any()
        check_renormalised(q, p64, q > 0)
    elif sampler == "minpp_probs":
        assert_close(impl.minpp_probs(p, tau, w), minpp64(p64, tau, w), f"minpp_probs {dtype} V={V}")
    else:
        z = torch.log(p.float()).to(dtype)  # logits in the low-precision dtype
        z64 = z.double()
        if sampler == "minpp_logits":
            r = torch.exp(z64 - z64.amax(-1, keepdim=True))
            tau, w = off_boundary(r, tau, w)
            assert_logits_close(impl.minpp_logits(z, tau, w), z64 + c64(r, tau.double(), w.double()).log(),
                                f"minpp_logits {dtype} V={V}")
        else:
            check_top_p(impl.next_token_probs(z, temperature=0.7, top_p=0.95), torch.softmax(z64 / 0.7, -1), 0.95)


@spec("M3.3")
@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.8}, {"min_p": 0.2},
                                     {"minpp": (torch.tensor([0.0, 0.1, 0.5]), torch.tensor([0.2, 1.0, 2.0]))}])
def test_draws_follow_the_distribution(impl, filters):
    """20k draws: every draw inside the mask of q (computed here in float64); total-variation distance to q
    below 0.03 (3x its expected value ~ sqrt(V / (2 pi n)) for V = 12)."""
    z = torch.randn(1, 12, generator=torch.Generator().manual_seed(1)) * 2
    q = sampling_probs64(z, 0.8, **filters)[0]
    assert_close(impl.next_token_probs(z, temperature=0.8, **filters)[0], q, "the sampling distribution")
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([impl.next_token(z, do_sample=True, generator=g, temperature=0.8, **filters) for _ in range(2000)])
    draws = torch.cat([draws.reshape(-1)] + [impl.next_token(z.expand(100, -1), generator=g, temperature=0.8, **filters)
                                              for _ in range(180)])
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert (q[draws] > 0).all(), "a draw fell outside the mask"
    assert 0.5 * (freq - q).abs().sum() < 0.03


@spec("M3.3")
def test_order_of_combined_filters_is_transformers(impl):
    """p = [.5, .3, .15, .05], min_p = .2, top_p = .83: top-p first keeps 3 tokens then min-p keeps 3;
    (vLLM's min-p first would keep 2). Temperature 1 on log p."""
    z = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    q = impl.next_token_probs(z, top_p=0.83, min_p=0.2)
    assert_close(q, torch.tensor([[0.5, 0.3, 0.15, 0]], dtype=torch.float64) / 0.95)


FILTER_ORDER = ("temperature", "top_k", "top_p", "min_p", "minpp")
# pairs whose order cannot show: top-k keeps the same tokens before or after temperature, min-p or MinP+ (each keeps
# a top set of the same ranking and none changes the ranking), so its renormalised result is the same either way
COMMUTING = {("temperature", "top_k"), ("top_k", "min_p"), ("top_k", "minpp")}
ORDER_PAIRS = [(a, b) for i, a in enumerate(FILTER_ORDER) for b in FILTER_ORDER[i + 1:] if (a, b) not in COMMUTING]


def filters64(z, order, f):
    """softmax(z), then the filters named in f applied in `order`, each renormalised, in float64 (temperature as
    p ** (1 / T) renormalised, which is softmax(z / T) when it comes first)."""
    p = torch.softmax(z.double(), -1)
    for name in (n for n in order if f.get(n) is not None):
        v = f[name]
        if name == "temperature":
            p = torch.softmax(p.log() / v, -1)
            continue
        if name == "minpp":
            p = minpp64(p, *v)
            continue
        if name == "top_k":
            keep = p >= p.topk(v, -1).values[..., -1:]
        elif name == "top_p":
            s = p.sort(-1, descending=True).values
            keep = p >= s.gather(-1, ((s.cumsum(-1) - s) < v).sum(-1, keepdim=True) - 1)
        else:
            keep = p >= v * p.amax(-1, keepdim=True)
        p = p * keep / (p * keep).sum(-1, keepdim=True)
    return p


def _nudged(f, scale):
    """The filter values moved by a relative `scale` (top-k and MinP+'s weights stay): for the clearance check."""
    out = dict(f)
    for name in ("temperature", "top_p", "min_p"):
        if name in out:
            out[name] = min(1.0, out[name] * scale) if name != "temperature" else out[name] * scale
    if "minpp" in out:
        out["minpp"] = ((out["minpp"][0].double() * scale).clamp(max=1.0), out["minpp"][1])
    return out


def order_case(a, b, V=12, min_tv=0.15):
    """(z (1, V), filters) for the ordered pair (a, b): a then b (the documented order) and b then a give
    distributions at least min_tv apart in total variation, and every token is clear of every cut (the kept
    set of the documented order is the same with each value moved by 1%). Found by a seeded search."""
    order = [n for n in FILTER_ORDER if n in (a, b)]
    for seed in range(500):
        g = torch.Generator().manual_seed(seed)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
        values = {"temperature": u(0.3, 0.8), "top_k": int(torch.randint(2, 7, (), generator=g)),
                  "top_p": u(0.4, 0.9), "min_p": u(0.1, 0.5),
                  "minpp": (torch.tensor([0.0, u(0.05, 0.3), u(0.35, 0.8)]), torch.tensor([u(0.01, 0.3), u(0.3, 1), 1.0]))}
        f = {n: values[n] for n in order}
        z = torch.randn(1, V, generator=g) * 2.5
        right, swapped = filters64(z, order, f), filters64(z, order[::-1], f)
        clear = all(torch.equal(filters64(z, order, _nudged(f, s)) > 0, right > 0) for s in (0.99, 1.01))
        if clear and 0.5 * (right - swapped).abs().sum() >= min_tv:
            return z, f
    raise AssertionError(f"no case found for {a} before {b}")


@spec("M3.3")
@pytest.mark.parametrize("pair", ORDER_PAIRS, ids=lambda p: " then ".join(p))
def test_every_pair_of_filters_in_the_documented_order(impl, pair):
    """Each pair of filters whose order can show, on a row where the two orders differ by a total variation of
    0.15 or more: next_token_probs applies them in the documented order (temperature, top-k, top-p, min-p,
    MinP+), and next_token's draws follow that distribution (every draw inside its mask; 4000 draws within a
    total variation of 0.06, while the swapped order is 0.15 away). Top-k commutes with temperature, min-p and
    MinP+ (same kept tokens), so those pairs cannot show an order."""
    z, f = order_case(*pair)
    q = filters64(z, FILTER_ORDER, f)[0]
    if hasattr(impl._module, "next_token_probs"):
        assert_close(impl.next_token_probs(z, **f)[0], q, f"{' then '.join(pair)}: {f}")
    g = torch.Generator().manual_seed(7)
    draws = torch.cat([impl.next_token(z.expand(400, -1), do_sample=True, generator=g, **f) for _ in range(10)])
    assert (q[draws] > 0).all(), f"a draw outside the mask of {' then '.join(pair)}"
    freq = torch.bincount(draws, minlength=z.shape[1]).double() / draws.numel()
    assert 0.5 * (freq - q).abs().sum() < 0.06, f"draws do not follow {' then '.join(pair)}: {freq} vs {q}"


@pytest.fixture(scope="module")
def constant_lm():
    """A 12-token Llama whose every position's logits are set by `constant_lm.z` (a hook on the LM head): sampled
    generation then draws from one known row at every step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()  # no eos to stop at
    model.lm_head.register_forward_hook(lambda m, i, out: torch.zeros_like(out) + model.z.to(out.dtype))
    return model


@spec("M4.1")
@pytest.mark.parametrize("pair", ORDER_PAIRS, ids=lambda p: " then ".join(p))
def test_sampled_generation_applies_the_filters_in_order(impl, constant_lm, pair):
    """generate(do_sample=True, **filters) draws each token from the filters in the documented order (M3.3): on a
    model whose logits are one row at every step, 100 rows x 20 steps of draws, every one inside the mask and
    within a total variation of 0.06 of it (the swapped order is 0.15 away)."""
    z, f = order_case(*pair)
    constant_lm.z = z[0]
    q = filters64(z, FILTER_ORDER, f)[0]
    out = impl.generate(constant_lm, torch.zeros(100, 3, dtype=torch.long), 20, generator=torch.Generator().manual_seed(3),
                        **f)
    draws = torch.tensor([t for row in out for t in row])
    assert draws.numel() == 2000 and (q[draws] > 0).all(), f"a draw outside the mask of {' then '.join(pair)}"
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert 0.5 * (freq - q).abs().sum() < 0.06, f"draws do not follow {' then '.join(pair)}: {freq} vs {q}"


def check_tiny_temperature(impl, T):
    z = torch.tensor([[10.0, 30.0, -20.0, 30.0], [5.0, 2.5, -10.0, 0.0]])
    try:
        q = impl.next_token_probs(z, temperature=T)
    except ValueError as e:
        assert "temperature" in str(e).lower() or repr(T) in str(e) or str(T) in str(e), e
        return
    assert_close(q, torch.tensor([[0, 0.5, 0, 0.5], [1.0, 0, 0, 0]], dtype=torch.float64))


@spec("M3.3")
@pytest.mark.parametrize("T", [1e-30, 1e-12])
def test_tiny_temperature_is_argmax(impl, T):
    """A tiny temperature gives the argmax, ties shared (or a refusal that names the temperature)."""
    check_tiny_temperature(impl, T)


@spec("M3.3")
@pytest.mark.parametrize("filters", [{}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.3}, {"min_p": 0.9},
                                     {"minpp": (torch.tensor([0.0, 0.5]), torch.tensor([0.0, 1.0]))},
                                     {"temperature": 2.0, "top_k": 1, "top_p": 0.5, "min_p": 0.5}])
@given(z=logits(max_rows=6, max_vocab=64))
def test_no_sampling_is_argmax_whatever_the_filters(impl, filters, z):
    """do_sample=False: the argmax of the logits for every filter (each keeps the argmax; MinP+ never lowers
    it); with tied maxima any of them."""
    z = z.float()
    tok = impl.next_token(z, do_sample=False, **filters)
    assert tok.shape == (z.shape[0],)
    assert (z[torch.arange(z.shape[0]), tok.long()] == z.amax(-1)).all(), (tok, z.argmax(-1))


@spec("M3.4")
@pytest.mark.parametrize("fn,value", [("apply_top_p", 0.0), ("apply_top_p", 1.5), ("apply_top_p", -0.1),
                                      ("apply_top_k", 0), ("apply_top_k", -3), ("apply_min_p", -0.1),
                                      ("apply_min_p", 1.5)])
def test_bad_sampler_parameters_are_errors(impl, fn, value):
    with pytest.raises(ValueError):
        getattr(impl, fn)(torch.softmax(torch.randn(2, 6), -1), value)


@spec("M3.4")
@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_error(impl, T):
    with pytest.raises(ValueError):
        impl.next_token_probs(torch.randn(2, 6), temperature=T)


@spec("M3.4")
def test_top_p_exclusive_cumsum_does_not_round(impl):
    """transformers' own test vector: softmax(log[.3, .1, .1, .5]), top_p = 0.8 keeps 2 tokens (0.5 + 0.3
    reaches 0.8: in float64 of the float32 inputs the mass before the third token is >= 0.8). A rounding
    promise of the reference (its shifted cumsum); cumsum - p keeps 3 here by rounding, also correct."""
    p = torch.softmax(torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log(), -1)
    q = impl.apply_top_p(p, 0.8)
    assert (q > 0).tolist() == [[True, False, False, True]], q


@spec("M3.4")
def test_temperature_so_small_that_z_over_t_overflows(impl):
    """T = 1e-38: z / T overflows float32 (a plain softmax(z / T) gives NaN). The reference shifts by the row max
    first, so the limit stays the argmax; or refuse the temperature naming it -- never NaN."""
    check_tiny_temperature(impl, 1e-38)


@spec("M3.4")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "5", 2.5, None, True])
def test_bad_top_k_types_are_errors(impl, bad):
    """A wrong type ("5", None, True) may be a TypeError, a wrong value (2.5, NaN, inf) a ValueError."""
    with pytest.raises(REFUSED):
        impl.apply_top_k(torch.softmax(torch.randn(2, 6), -1), bad)


# --- M4: generation and the transformers integration


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.as_tensor(p), 1
    return ids, mask


def _greedy_alone(model, prompt, n):
    """Plain greedy decoding of one prompt, no cache: the independent ground truth."""
    ids = torch.as_tensor(prompt)[None]
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Absolute position embeddings: unlike RoPE, a position shift from padding changes the output."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@spec("M4.1")
@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_gpt2"])
def test_padded_batch_generates_what_each_prompt_alone_does(impl, model_name, request):
    """Left padding + attention_mask: every row equals greedy decoding of its prompt alone (position ids count
    real tokens only: a Llama's RoPE hides a shift, GPT-2's absolute positions do not)."""
    model = request.getfixturevalue(model_name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 40, (L,), generator=g).tolist() for L in (3, 7, 5, 1, 6)]
    ids, mask = _left_pad(prompts)
    out = impl.generate(model, ids, 10, do_sample=False, attention_mask=mask)
    assert out == [_greedy_alone(model, p, 10) for p in prompts]


@spec("M4.1")
def test_greedy_is_argmax_for_every_method(impl, tiny_lm):
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    base = impl.generate(tiny_lm, prompt, 8, do_sample=False)
    manual = prompt.clone()
    for _ in range(8):
        manual = torch.cat([manual, tiny_lm(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert base == manual[:, 5:].tolist()
    for kw in [{"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.3}, {"minpp": (torch.tensor([0.0, 0.3]), torch.tensor([0.1, 1.0]))},
               {"temperature": 0.3, "top_k": 2, "min_p": 0.5}]:
        assert impl.generate(tiny_lm, prompt, 8, do_sample=False, **kw) == base, kw


def _letters(ids):
    return "".join(chr(97 + i % 26) for i in ids)


@spec("M4.1")
def test_max_new_tokens_zero_and_stop_strings(impl, tiny_lm):
    """max_new_tokens = 0 generates nothing; a row ends with the first token after which its text contains a stop
    string, or with eos (kept); decoding may look at the whole row or a window of it."""
    prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    assert impl.generate(tiny_lm, prompt, 0) == [[]]
    full = impl.generate(tiny_lm, prompt, 10, do_sample=False)[0]
    stop = _letters(full[3:5])
    out = impl.generate(tiny_lm, prompt, 10, do_sample=False, stop_strings=[stop], decode=_letters)[0]
    first = next(i for i in range(2, 11) if _letters(full[:i]).endswith(stop))
    assert out == full[:first]
    eos = full[2]
    assert impl.generate(tiny_lm, prompt, 10, do_sample=False, eos_token_id=eos)[0] == full[:full.index(eos) + 1]


@spec("M4.1")
@pytest.mark.parametrize("stop", ["é", "答案"])
def test_stop_strings_that_span_byte_tokens(impl, tiny_lm, stop):
    """With a byte-level decode (each token one byte, as byte-level BPE does for rare characters), a stop string of
    several UTF-8 bytes spans several tokens: the row ends with the token that completes it, never later."""
    code = stop.encode()
    for seed in range(50):  # a greedy row holding len(code) distinct tokens in a row: they become the stop's bytes
        prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(seed))
        full = impl.generate(tiny_lm, prompt, 16, do_sample=False)[0]
        at = next((i for i in range(len(full) - len(code)) if len(set(full[i:i + len(code)])) == len(code)), None)
        if at is not None:
            break
    assert at is not None, "no greedy row with enough distinct tokens"
    byte = {t: b for t, b in zip(full[at:at + len(code)], code)}

    def decode(ids):
        return bytes(byte.get(i, 97 + i % 26) for i in ids).decode("utf-8", errors="replace")

    first = next(i for i in range(1, len(full) + 1) if decode(full[:i]).endswith(stop))
    out = impl.generate(tiny_lm, prompt, 16, do_sample=False, stop_strings=[stop], decode=decode)[0]
    assert out == full[:first], f"stopped after {len(out)} tokens, the stop string {stop!r} ends at {first}"


@spec("M4.1")
def test_sampled_generation_draws_from_the_filtered_distribution(impl, tiny_lm):
    """Sampling over 10 steps, left-padded prompts of different lengths, temperature 0.6 then min-p 0.3: every
    token drawn lies in the filtered distribution of its own prefix (recomputed here without a cache, in
    float64; tokens within 1e-4 of the cut may go either way); a row that draws eos ends with it while the
    other rows go on; no row exceeds max_new_tokens."""
    g = torch.Generator().manual_seed(11)
    T, min_p = 0.6, 0.3
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (3, 7, 5, 6, 4, 8)]
    first = [sampling_probs64(tiny_lm(input_ids=torch.tensor([p])).logits[:, -1], T, min_p=min_p)[0] for p in prompts]
    sure = next((i for i, q in enumerate(first) if int((q > 0).sum()) == 1), None)
    assert sure is not None, "the test needs a prompt whose first step has one possible token"
    eos = int(first[sure].argmax())  # that row must draw eos at once and stop; the others go on sampling
    ids, mask = _left_pad(prompts)
    out = impl.generate(tiny_lm, ids, 10, min_p=min_p, temperature=T, eos_token_id=eos, attention_mask=mask, generator=g)
    assert out[sure] == [eos], out[sure]
    drawn = 0
    for prompt, row in zip(prompts, out):
        assert 1 <= len(row) <= 10 and (row[-1] == eos or len(row) == 10) and eos not in row[:-1], row
        for j, tok in enumerate(row):
            logits = tiny_lm(input_ids=torch.tensor([prompt + row[:j]])).logits[:, -1]
            q = sampling_probs64(logits, T, min_p=min_p)[0]
            p = torch.softmax(logits.double()[0] / T, -1)
            near_cut = ((p / p.max() - min_p).abs() < 1e-4 * min_p)[tok]
            assert q[tok] > 0 or near_cut, f"token {tok} at step {j} is outside the min-p mask"
            drawn += 1
    assert drawn >= 30, "too few draws to test the mask"


@spec("M4.1")
@pytest.mark.parametrize("mask", [[[0, 2, 1]], [[1, 0, 1]], [[1, 1, 0]], [[1, 1]], [[1, 1, 1], [0, 1, 1]],
                                  [[True, False, True]], [[True, True, False]]],
                         ids=["a 2", "a hole", "right padding", "short", "more rows", "bool hole", "bool right padding"])
def test_a_malformed_attention_mask_is_refused(impl, tiny_lm, mask):
    """A mask that is not 0s then 1s of the prompt's shape -- integer or bool, as tokenizers and users give it --
    would silently shift positions or attend to padding: any error, never generations."""
    with pytest.raises(Exception):  # noqa: B017 -- the error's type is policy (M4.3)
        impl.generate(tiny_lm, torch.tensor([[1, 2, 3]]), 3, do_sample=False, attention_mask=torch.tensor(mask))


@spec("M4.1")
def test_a_bool_attention_mask_means_what_an_integer_one_does(impl, tiny_lm):
    """Left padding given as a bool mask generates what the same mask of 0s and 1s does: each prompt alone."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 40, (L,), generator=g).tolist() for L in (2, 6, 4)]
    ids, mask = _left_pad(prompts)
    out = impl.generate(tiny_lm, ids, 6, do_sample=False, attention_mask=mask.bool())
    assert out == [_greedy_alone(tiny_lm, p, 6) for p in prompts]


def _greedy_row_with(model, impl, want, n=12):
    """(prompt, greedy row) of the first seed whose greedy row satisfies want(row)."""
    for seed in range(300):
        prompt = torch.randint(1, 40, (1, 5), generator=torch.Generator().manual_seed(seed))
        full = impl.generate(model, prompt, n, do_sample=False)[0]
        if want(full):
            return prompt, full
    pytest.fail("no greedy row of the tiny model has what the test needs")


@spec("M4.1")
def test_eos_in_every_form_stops_the_row(impl, tiny_lm):
    """eos_token_id as transformers takes it -- an int (0 included: GPT-2-style configs), a list or tuple (Llama-3's
    configs hold two), a 0-d or 1-d tensor --: a row ends with the first token that is any of them, kept."""
    prompt, full = _greedy_row_with(tiny_lm, impl, lambda row: 0 in row[1:] and len(set(row)) < 40)
    unused, early = next(t for t in range(40) if t not in full), full[full.index(0) // 2]
    for eos in (0, [unused, 0], (0,), torch.tensor(0), torch.tensor([unused, 0]), [0, early], torch.tensor([early, 0])):
        ids = {int(e) for e in torch.as_tensor(eos).reshape(-1)}
        stop = next(i for i, t in enumerate(full) if t in ids)
        out = impl.generate(tiny_lm, prompt, 12, do_sample=False, eos_token_id=eos)[0]
        assert out == full[:stop + 1], f"eos_token_id={eos!r}: {out} (expected to stop after token {stop})"


@spec("M4.1")
def test_a_stop_string_completed_inside_a_token_stops_there(impl, tiny_lm):
    """vLLM's and transformers' stop strings: the row ends with the first token after which its text contains a stop
    string, also when that token runs past the string's end ('Answer:' from the tokens 'Answer' and ':\\n'). The
    stop strings may come as a tuple or a generator (read once)."""
    prompt, full = _greedy_row_with(tiny_lm, impl, lambda row: any(a != b for a, b in zip(row[2:], row[3:])))
    i = next(i for i in range(2, len(full) - 1) if full[i] != full[i + 1])
    pieces = {full[i]: "Answer", full[i + 1]: ":\n"}

    def decode(ids):
        return "".join(pieces.get(t, chr(97 + t % 26)) for t in ids)

    first = next(n for n in range(1, len(full) + 1) if "Answer:" in decode(full[:n]))
    for stops in (["Answer:"], ("Answer:",), (s for s in ["Answer:"])):
        out = impl.generate(tiny_lm, prompt, 12, do_sample=False, stop_strings=stops, decode=decode)[0]
        assert out == full[:first], f"{type(stops).__name__}: stopped after {len(out)} tokens, not {first}"


@spec("M4.1")
def test_stop_strings_with_a_leading_space_and_of_several_lengths(impl, tiny_lm):
    """A SentencePiece-style decode drops the leading space of the first token it is given: a stop string that starts
    with a space (' x' from the tokens ' ' and 'x') is in the row's text only with the token before it. With several
    stop strings the longest is found as surely as the shortest."""
    prompt, full = _greedy_row_with(tiny_lm, impl, lambda row: any(a != b for a, b in zip(row[2:], row[3:])), 16)
    i = next(i for i in range(2, len(full) - 1) if full[i] != full[i + 1])
    pieces = {full[i]: " ", full[i + 1]: "x"}

    def decode(ids):  # other tokens are ' A' .. ' Z', so only the two tokens above make ' x'
        text = "".join(pieces.get(t, " " + chr(65 + t % 26)) for t in ids)
        return text[1:] if text.startswith(" ") else text

    first = next(n for n in range(1, len(full) + 1) if " x" in decode(full[:n]))
    out = impl.generate(tiny_lm, prompt, 16, do_sample=False, stop_strings=[" x"], decode=decode)[0]
    assert out == full[:first], f"stopped after {len(out)} tokens; ' x' is in the text after {first}"
    long = _letters(full[4:9])
    first = next(n for n in range(1, len(full) + 1) if long in _letters(full[:n]))
    out = impl.generate(tiny_lm, prompt, 16, do_sample=False, stop_strings=["QQ", long], decode=_letters)[0]
    assert out == full[:first], f"the 5-byte stop string {long!r} was missed beside a 2-byte one"


@spec("M4.1")
@pytest.mark.parametrize("tau, w", [([0.0, 0.9, 0.05], [1.0, 1.0, 10.0]), ([0.0, 0.05, 0.05], [1.0, 4.0, 6.0]),
                                    ([0.0, 0.05, 0.5], [1.0, -0.5, 1.0]), ([0.0, 0.05, 0.5], [1.0, float("nan"), 1.0])],
                         ids=["unsorted", "repeated", "negative weight", "NaN weight"])
def test_generate_never_samples_from_thresholds_it_did_not_check(impl, constant_lm, tau, w):
    """MinP+ thresholds and weights outside M1's contract (unsorted or repeated tau, a negative or NaN weight) are
    refused by generate (any error) -- also where it passes check=False down to its per-token steps -- or, where the
    definition c_v = sum_i w_i [tau_i <= r_v] still gives a distribution, drawn from exactly that: 2000 draws within
    a total variation of 0.06 of it (a bucketize on unsorted thresholds is 0.4 away)."""
    constant_lm.z = torch.tensor([4.0, 3.5, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0])
    tau, w = torch.tensor(tau), torch.tensor(w)
    try:
        out = impl.generate(constant_lm, torch.zeros(100, 3, dtype=torch.long), 20, minpp=(tau, w),
                            generator=torch.Generator().manual_seed(3))
    except Exception:  # noqa: BLE001 -- refused: the error's type is policy
        return
    p = torch.softmax(constant_lm.z.double(), -1)
    q = p * ((tau.double() <= (p / p.max())[:, None]) * w.double()).sum(-1)
    assert (q >= 0).all() and q.sum() > 0, f"weights {w.tolist()} give no distribution, yet generate sampled from them"
    q = q / q.sum()
    draws = torch.tensor([t for row in out for t in row])
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert 0.5 * (freq - q).abs().sum() < 0.06, f"tau {tau.tolist()}, w {w.tolist()}: draws {freq} vs the definition {q}"


@spec("M4.2")
def test_processor_keeps_masked_scores_masked(impl):
    """Scores already at -inf (an earlier processor's mask) stay -inf and the others are MinP+ of the unmasked
    tokens alone, after temperature: softmax(out / T) == MinP+(softmax(z / T) over the finite tokens)."""
    T = 0.8
    z = torch.randn(4, 60, generator=torch.Generator().manual_seed(5)) * 2
    z[:, ::3] = float("-inf")
    z[1, :40] = float("-inf")
    z64 = z.double() / T
    tau, w = off_boundary(torch.exp(z64 - z64.amax(-1, keepdim=True)), torch.tensor([0.0, 0.05, 0.3]),
                          torch.tensor([0.3, 1.0, 2.0]))
    out = impl.minpp_logits_processor(tau, w, temperature=T)(None, z.clone())
    assert torch.isneginf(out[torch.isneginf(z)]).all(), "a masked score came back"
    assert_close(torch.softmax(out.double() / T, -1), minpp64(torch.softmax(z64, -1), tau, w))


@spec("M4.2")
@pytest.mark.parametrize("T", [0.5, 0.7, 1.0, 1.5])
def test_processor_is_temperature_then_minpp(impl, T):
    """transformers runs user processors before its temperature warper. With temperature=T the processor's
    mask equals TemperatureLogitsWarper(T) + MinPLogitsWarper(p) on one threshold, and for several
    thresholds softmax(processor(z) / T) == softmax(z / T + log c(r after temperature))."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper

    z = torch.randn(16, 500, generator=torch.Generator().manual_seed(3)) * 3
    for pb in (0.05, 0.2):
        ours = impl.minpp_logits_processor(torch.tensor([pb]), torch.ones(1), temperature=T)(None, z.clone())
        theirs = MinPLogitsWarper(pb)(None, TemperatureLogitsWarper(T)(None, z.clone()))
        assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), f"min_p={pb}, T={T}"
    z64 = z.double() / T
    r = torch.exp(z64 - z64.amax(-1, keepdim=True))
    tau, w = off_boundary(r, torch.tensor([0.0, 0.01, 0.1, 0.4]), torch.tensor([0.2, 0.5, 1.0, 2.0]))
    out = impl.minpp_logits_processor(tau, w, temperature=T)(None, z.clone())
    expected = minpp64(torch.softmax(z64, -1), tau, w)
    assert_close(torch.softmax(out.double() / T, -1), expected, f"T={T}")


@spec("M4.3")
def test_stop_strings_are_checked_on_a_window(impl, tiny_lm):
    """Checking the stop strings decodes the last 1 + (the longest stop string's UTF-8 bytes) tokens, not the whole row
    every step."""
    prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    full = impl.generate(tiny_lm, prompt, 10, do_sample=False)[0]
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return _letters(ids)

    stop = _letters(full[3:5])
    impl.generate(tiny_lm, prompt, 10, do_sample=False, stop_strings=[stop], decode=decode)
    assert calls and max(calls) <= len(stop.encode()) + 1, f"decoded {max(calls)} tokens for a {len(stop)}-byte stop string"


@spec("M4.3")
@pytest.mark.parametrize("kw", [{"stop_strings": [""]}, {"stop_strings": "ab"}, {"max_new_tokens": 2.5},
                                {"max_new_tokens": None}, {"max_new_tokens": -1}, {"input_ids": torch.tensor([1, 2])},
                                {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, {"input_ids": torch.tensor([[1, 2, 40]])},
                                {"attention_mask": torch.tensor([[0, 2, 1]])}, {"attention_mask": torch.tensor([[True, False, True]])},
                                {"attention_mask": [[1, 1, 1]]}, {"method": "greedy"}, {"nucleus": 0.9},
                                {"stop_strings": ["x"], "decode": None}], ids=lambda kw: repr(kw)[:40])
def test_bad_generate_arguments_are_errors(impl, tiny_lm, kw):
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, decode=lambda ids: "x" * len(ids))
    args.update(kw)
    with pytest.raises(REFUSED):
        impl.generate(tiny_lm, args.pop("input_ids"), args.pop("max_new_tokens"), do_sample=False, **args)


@spec("M4.3")
def test_eos_and_stop_string_forms_a_user_carries_over(impl, tiny_lm):
    """stop_strings=None (transformers' default) means none; an eos_token_id that is not a token id, a list of them
    or an integer tensor (2.5, '2', [1.5], a float tensor) is refused with a ValueError or TypeError."""
    prompt = torch.tensor([[1, 2, 3]])
    full = impl.generate(tiny_lm, prompt, 6, do_sample=False)[0]
    assert impl.generate(tiny_lm, prompt, 6, do_sample=False, stop_strings=None, decode=_letters)[0] == full
    for eos in (2.5, "2", [1.5], torch.tensor([1.0, 2.0]), [True]):
        with pytest.raises(REFUSED):
            impl.generate(tiny_lm, prompt, 6, do_sample=False, eos_token_id=eos)


# ============================================================================
# Part B: reference-only machinery (minpp_ref itself)

import minpp_ref as ref  # noqa: E402
from cli import minpp as minpp_cli  # noqa: E402


def _minp_data(n=4000, V=50, p_base=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 2.5
    return z, minp_targets(z, p_base, g)


def minp_targets(logits, p_base, generator):
    """Targets drawn from min-p(p_base)-truncated softmax(logits): the data MinP+ should learn to imitate."""
    return torch.multinomial(ref.apply_min_p(torch.softmax(logits.float(), -1), p_base), 1, generator=generator)[:, 0]


def test_head_learns_min_p_threshold():
    """Targets from min-p(0.1): the trained head puts most weight on thresholds in [0.05, 0.1] (the grid
    points just below p_base) and beats the base CE."""
    z, t = _minp_data()
    head = ref.MinPPlusHead(K=16, grid="log", tau_min=1e-3)
    ref.train_head(head, z, t, steps=300, lr=0.2)
    share = (head.w / head.w.sum()).detach()
    near = (head.tau >= 0.05) & (head.tau <= 0.1)
    d = minpp_cli.head_diagnostics(head, z, t)
    assert share[near].sum() > 0.6, dict(zip(head.tau.tolist(), share.tolist()))
    assert d["minpp_ce"] < d["base_ce"] - 0.1, d


@pytest.mark.parametrize("kind", ["entropy", "l1"])
def test_regulariser_direction(kind):
    """entropy: lam > 0 sharpens (lower H(pi)) and lam < 0 smooths; l1: lam > 0 shrinks sum(w)."""
    z, t = _minp_data(n=1000)
    stat = ref.weight_entropy if kind == "entropy" else (lambda w: w.sum())
    out = {}
    for lam in (-0.5, 0.0, 0.5):
        head = ref.MinPPlusHead(K=8)
        ref.train_head(head, z, t, steps=300, lr=0.1, reg=kind, lam=lam)
        out[lam] = stat(head.w).item()
    assert out[0.5] < out[0.0] < out[-0.5], out


def test_grid_contains_zero_and_tau_is_saved(tmp_path):
    for grid in ("log", "linear"):
        head = ref.MinPPlusHead(K=8, grid=grid)
        assert head.tau[0] == 0 and head.tau[-1] == 1 and (head.tau.diff() > 0).all()
        assert "tau" in head.state_dict()
    head = ref.MinPPlusHead(K=6, grid="log", tau_min=0.01)
    with torch.no_grad():
        head.theta.copy_(torch.tensor([-9.0, -9.0, 2.0, 0.5, -9.0, -9.0]))
    head.save(tmp_path / "head.safetensors")
    back = ref.MinPPlusHead.load(tmp_path / "head.safetensors")
    assert torch.equal(back.tau, head.tau) and torch.equal(back.theta, head.theta)
    head.export_jsonl(tmp_path / "head.jsonl")
    import json
    rows = [json.loads(x) for x in open(tmp_path / "head.jsonl")]
    assert [r["tau"] for r in rows] == head.tau[2:4].tolist()


def test_minpp_loss_chunking_does_not_change_it():
    z, t = _minp_data(n=300)
    tau, w = ref.threshold_grid(8), torch.rand(8) + 0.1
    a = ref.minpp_loss(z, t, tau, w, chunk_rows=7)
    b = ref.minpp_loss(z, t, tau, w, chunk_rows=4096)
    torch.testing.assert_close(a, b)


def test_bad_input_messages_say_where():
    with pytest.raises(ValueError, match=r"tau\[0\] = 0.5 >= tau\[1\]"):
        ref.minpp_probs(torch.ones(1, 3), torch.tensor([0.5, 0.1]), torch.ones(2))
    with pytest.raises(ValueError, match=r"w\[1\]"):
        ref.minpp_probs(torch.ones(1, 3), torch.tensor([0.0, 0.5]), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"target\[1\] = 9"):
        ref.minpp_loss(torch.randn(2, 5), torch.tensor([0, 9]), torch.tensor([0.0]), torch.ones(1))
    with pytest.raises(ValueError, match=r"row \[1\]"):
        ref.minpp_logits(torch.tensor([[0.0, 1.0], [float("-inf")] * 2]), torch.tensor([0.0]), torch.ones(1))


def test_logits_processor_matches_min_p_warper_inside_generate(tiny_lm):
    from transformers import MinPLogitsWarper

    scores = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 3
    ours = ref.minpp_logits_processor(torch.tensor([0.1]), torch.ones(1))(None, scores)
    theirs = MinPLogitsWarper(0.1)(None, scores)
    assert torch.equal(ours, theirs)
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0)
    torch.manual_seed(5)
    a = tiny_lm.generate(prompt, logits_processor=[ref.minpp_logits_processor(torch.tensor([0.1]), torch.ones(1))], **common)
    torch.manual_seed(5)
    b = tiny_lm.generate(prompt, min_p=0.1, **common)
    assert torch.equal(a, b)


@pytest.mark.parametrize("pred,gold,same", [
    ("so #### 8", "#### 8.0", True), ("#### 1,000", "#### 1000", True), ("#### 007", "#### 7", True),
    ("#### $12", "#### 12", True), ("#### -3.50", "#### -3.5", True), ("#### 8", "#### 9", False),
    ("no answer", "#### 9", False), ("#### 1 then #### 2", "#### 2", True)])
def test_gsm8k_numeric_comparison(pred, gold, same):
    assert minpp_cli.answers_match(pred, gold) is same


def test_chunked_loss_errors_name_the_global_row():
    z = torch.randn(64, 20)
    z[37, 11] = float("nan")
    with pytest.raises(ValueError, match=r"entry \[37, 11\]"):
        ref.minpp_loss(z, torch.zeros(64, dtype=torch.long), torch.tensor([0.0]), torch.ones(1), chunk_rows=8)
    z[37, 11] = 0.0
    z[45] = float("-inf")
    with pytest.raises(ValueError, match=r"row \[45\]"):
        ref.minpp_loss(z, torch.zeros(64, dtype=torch.long), torch.tensor([0.0]), torch.ones(1), chunk_rows=8)


def test_thresholds_are_checked_once_per_call_not_per_token(tiny_lm, monkeypatch):
    """generate and train_head check (tau, w) once per call (a per-token check copies them to the host: a
    device sync every token on a GPU); the processor checks at construction only."""
    calls, real = [], ref.check_thresholds
    monkeypatch.setattr(ref, "check_thresholds", lambda *a: (calls.append(1), real(*a))[1])
    tau, w = torch.tensor([0.0, 0.1, 0.5]), torch.tensor([0.2, 1.0, 2.0])
    out = ref.generate(tiny_lm, torch.tensor([[1, 2, 3]]), 6, minpp=(tau, w))
    assert len(out[0]) == 6 and len(calls) == 1, len(calls)
    calls.clear()
    z, t = _minp_data(n=64, V=20)
    ref.train_head(ref.MinPPlusHead(K=4), z, t, steps=5)
    assert len(calls) == 1, len(calls)  # the head's weights once (not per step); the statistics check the grid alone
    proc = ref.minpp_logits_processor(tau, w)
    calls.clear()
    for _ in range(3):
        proc(None, torch.randn(2, 40))
    assert not calls, len(calls)


def test_head_file_with_mismatched_shapes_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"tau": torch.tensor([0.0, 0.1, 0.5]), "theta": torch.zeros(1)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(ValueError, match="theta"):
        ref.MinPPlusHead.load(tmp_path / "h.safetensors")
    save_file({"tau": torch.tensor([0.5, 0.1]), "theta": torch.zeros(2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(ValueError, match="increasing"):
        ref.MinPPlusHead.load(tmp_path / "u.safetensors")
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "u.safetensors").read_bytes()[:20])
    for name in ("t.safetensors", "missing.safetensors"):  # truncated, missing: a ValueError naming the file
        with pytest.raises(ValueError, match=name):
            ref.MinPPlusHead.load(tmp_path / name)


def test_processor_inside_generate_with_temperature(tiny_lm):
    """model.generate(temperature=T, logits_processor=[minpp_logits_processor([p], [1], T)]) draws exactly
    what generate(temperature=T, min_p=p) draws."""
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0, temperature=1.7)
    torch.manual_seed(5)
    proc = ref.minpp_logits_processor(torch.tensor([0.1]), torch.ones(1), temperature=1.7)
    a = tiny_lm.generate(prompt, logits_processor=[proc], **common)
    torch.manual_seed(5)
    b = tiny_lm.generate(prompt, min_p=0.1, **common)
    assert torch.equal(a, b)


@pytest.mark.parametrize("grid", ["log", "linear"])
def test_loss_fast_path_buckets_like_bucketize(grid):
    """The O(1) bucketing of evenly spaced grids gives exactly bucketize's buckets, also for tokens exactly on
    every threshold (d == log tau in float32) and far below the smallest one; and the loss equals the plain form."""
    tau = ref.threshold_grid(65, tau_min=1e-5) if grid == "log" else ref.threshold_grid(17, grid="linear")
    log_tau = tau.log()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3000, generator=g) * torch.tensor([0.5, 3.0, 12.0, 1.0]).repeat(10)[:, None]
    z[:, 0] = z.amax(-1) + 1.0
    z[:, 1:tau.numel()] = z[:, :1] + log_tau[1:]  # d exactly log tau (z[:, 0] is the max)
    z[:, -1] = -1e30
    m = z.amax(-1, keepdim=True)
    grid_ = ref._uniform_grid(log_tau)
    assert grid_ is not None and grid_[0] == grid
    e = torch.empty_like(z)
    j, fix = ref._dense_buckets(z, m, log_tau, grid_, e, ref._bucket_workspace(z))
    assert torch.equal(j, torch.bucketize(z - m, log_tau, right=True))
    assert torch.equal(e, (z - m).exp())
    t = torch.randint(0, 2999, (40,), generator=g)
    w = torch.rand(tau.numel(), generator=torch.Generator().manual_seed(1)) + 0.1
    plain = torch.nn.functional.cross_entropy(ref.minpp_logits(z, tau, w), t)
    torch.testing.assert_close(ref.minpp_loss(z, t, tau, w, chunk_rows=8), plain)


def test_command_line_train_eval_generate(tmp_path, monkeypatch, capsys):
    """train writes a head (and its export) from a model directory and a JSONL file; eval counts GSM8K answers per
    sampler and temperature over batches and samples (generation stubbed to known answers here); generate runs."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    words = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + [str(i) for i in range(10)] + \
        ["what", "is", "+", "?", "####"]
    tok = word_tokenizer(words)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"prompt": f"what is {i} + {i % 3} ?", "answer": f"{i + i % 3} #### {i + i % 3}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = str(tmp_path / "m")
    minpp_cli.main(["train", "--model", m, "--data", str(tmp_path / "d.jsonl"), "--K", "8", "--steps", "20",
              "--out", str(tmp_path / "head.safetensors")])
    head = ref.MinPPlusHead.load(tmp_path / "head.safetensors")
    assert head.tau.numel() == 8 and (tmp_path / "head.jsonl").exists()
    assert "answer tokens: cross-entropy" in capsys.readouterr().out

    def stub(model, input_ids, n, **kw):  # answers "what is a + b ?" right when a is even, with 9 otherwise
        outs = []
        for row in input_ids:
            words = tok.decode(row, skip_special_tokens=True).split()
            a, b = int(words[words.index("+") - 1]), int(words[words.index("+") + 1])
            outs.append(tok(f"#### {a + b if a % 2 == 0 else 9}", add_special_tokens=False)["input_ids"])
        return outs

    monkeypatch.setattr(minpp_cli, "generate", stub)
    table = minpp_cli.main(["eval", "--model", m, "--data", str(tmp_path / "d.jsonl"), "--head", str(tmp_path / "head.safetensors"),
                      "--samplers", "greedy,top_p=0.9,minpp", "--temperatures", "0.7,1.5", "--batch-size", "2", "--n-samples", "3"])
    expected = 3 / 5  # rows 0, 2, 4 (golds 0, 4, 5; none of them 9)
    assert table == {("greedy", None): expected, ("top_p=0.9", 0.7): expected, ("top_p=0.9", 1.5): expected,
                     ("minpp", 0.7): expected, ("minpp", 1.5): expected}
    out = capsys.readouterr().out
    assert [x for x in out.splitlines() if x.startswith("greedy")][0].split()[1] == "accuracy", "greedy has no temperature"
    assert out.count("'#### ") == 2 * 5, "two generations shown per sampler and temperature"
    monkeypatch.undo()
    minpp_cli.main(["generate", "--model", m, "--prompt", "what is 1 + 1 ?", "--max-new-tokens", "4"])
    model = LlamaForCausalLM.from_pretrained(m).eval()  # greedy by hand: argmax, no cache, stop after eos
    ids = tok(minpp_cli.prompt_text(tok, "what is 1 + 1 ?"), add_special_tokens=False, return_tensors="pt").input_ids
    new = []
    for _ in range(4):
        new.append(int(model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax()))
        if new[-1] == tok.eos_token_id:
            break
    assert capsys.readouterr().out.strip() == tok.decode(new, skip_special_tokens=True).strip()
    for args in (["--help"], ["eval", "--help"]):
        assert subprocess.run([sys.executable, "cli/minpp.py", *args], capture_output=True).returncode == 0
    bad = subprocess.run([sys.executable, "cli/minpp.py", "trian"], capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    # a user's mistake is one line on stderr and a non-zero exit, found before the model loads
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "long.jsonl").write_text(json.dumps(rows[0]) + "\n")
    ev = ["eval", "--model", m, "--samplers", "greedy", "--data", str(tmp_path / "d.jsonl")]
    for argv, says in ((ev + ["--n-samples", "0"], "--n-samples"), (ev + ["--temperatures", "0.7,,1.0"], "--temperatures"),
                       (ev + ["--batch-size", "0"], "--batch-size"), (ev[:3] + ev[5:] + ["--samplers", "top_k=abc"], "'top_k=abc'"),
                       (ev[:-1] + [str(tmp_path / "empty.jsonl")], "no records"), (ev[:3] + ev[5:] + ["--samplers", "minpp"], "needs --head"),
                       (ev + ["--samplers", "minpp"], "--samplers is given 2 times"),
                       (["train", "--model", m, "--data", str(tmp_path / "d.jsonl"), "--out", f"{m}/model.safetensors"],
                        "lies inside --model"),
                       (["train", "--model", m, "--data", str(tmp_path / "long.jsonl"), "--max-length", "2", "--out",
                         str(tmp_path / "h2.safetensors")], "--max-length 2"),
                       (["eval", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "d.jsonl")], "not a directory"),
                       (["train", "--model", m, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "head.jsonl")],
                        "overwrite the head"),
                       (["train", "--model", m, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "d.safetensors")],
                        "never writes over"),
                       (ev + ["--out", str(tmp_path / "d.jsonl")], "never writes over"),
                       (ev[:-1] + [str(tmp_path / "nowhere.jsonl")], "nowhere.jsonl: no such file")):
        proc = subprocess.run([sys.executable, "cli/minpp.py", *argv], capture_output=True, text=True)
        lines = proc.stderr.splitlines()  # one error line, last; before it at most the command's first line
        assert proc.returncode != 0 and says in lines[-1] and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert lines[-1].startswith("error: ") and all(x.startswith("cli/minpp.py ") or x.startswith("loading the")
                                                      for x in lines[:-1]), proc.stderr
    assert (tmp_path / "d.jsonl").read_text().count("\n") == 5, "the data was written over"


def test_generate_from_a_model_whose_weights_do_not_fit_is_refused(tmp_path):
    """cli/minpp.py generate on a model directory whose weight names carry another prefix: a ValueError (exit 1)
    naming the keys, never text generated from random weights, whatever the log verbosity (the subprocess form, with
    stderr to a pipe: test_less.py's test_a_model_whose_weights_do_not_fit_never_runs)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    lm.save_pretrained(tmp_path / "m")
    word_tokenizer(["<pad>", "<eos>", "a", "b"]).save_pretrained(tmp_path / "m")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in lm.state_dict().items()},
              tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="base_model.model.*random weights"):
        minpp_cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "a b", "--max-new-tokens", "3"])


def test_verdict_of_a_module_that_fails_on_import(tmp_path):
    """--verdict on a candidate that raises while it is imported (any exception): one line 'import failed: <the
    exception>', exit status 1, no traceback from the suite's hooks."""
    import os
    import subprocess
    import sys
    (tmp_path / "broken_impl.py").write_text("raise RuntimeError('broken at import\\nsecond line')\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_minpp.py",
                           "--minpp-impl", "broken_impl", "--verdict"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "broken_impl: import failed: RuntimeError: broken at import second line" in out and "Traceback" not in out, out


def test_verdict_fits_100_columns_and_says_what_failed(tmp_path):
    """--verdict on two candidates with a planted bug each (top-p one token too many; match without the model's
    fingerprint), some clauses selected: every line <= 100 columns; each FAILED line says what was expected and what
    came (the test's line where the error alone says little), the command that reproduces it carries the user's
    PYTHONPATH and implementation option; clauses not selected are 'not run', and a tier none of whose clauses ran
    is 'not run', never a red NOTHING TESTED."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.abspath(__file__))
    for module, name, bug in (("minpp_ref", "planted_m", ("kept = (before < top_p)", "kept = (before <= top_p)")),
                              ("less_ref", "planted_l", ('"world_size", "optimizer"}', '"world_size", "optimizer", "model"}'))):
        src = open(os.path.join(root, f"{module}.py")).read()
        assert src.count(bug[0]) == 1
        (tmp_path / f"{name}.py").write_text(src.replace(*bug))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_minpp.py",
                           "test_less.py", "-m", "M3.1 or M3.4 or L7.1", "--minpp-impl", "planted_m", "--less-impl",
                           "planted_l", "--verdict"], capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and all(len(line) <= 100 for line in lines), [x for x in lines if len(x) > 100]
    assert sum(line.startswith("not run (no selected test): ") for line in lines) == 2, proc.stdout
    assert "planted_l policy tier: not run" in proc.stdout and "NOTHING TESTED" not in proc.stdout, proc.stdout
    for clause, kind in (("M3.1", "minpp"), ("L7.1", "less")):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  FAILED {clause} core"))
        said = lines[at].split(": ", 1)[1]
        assert len(said) > 30 and not said.rstrip().endswith(":") and "tensor(" not in said[:20], lines[at]
        command = " ".join(" ".join(x.strip().rstrip("\\") for x in lines[at + 1:at + 4]).split())
        assert f"PYTHONPATH={tmp_path} python -m pytest --{kind}-impl planted_{kind[0]} 'test_{kind}.py::" in command


def test_data_writes_a_problem_set_a_small_model_can_answer(tmp_path, capsys):
    """cli/minpp.py data: train/dev/test {prompt, answer} records whose '#### N' is the worked sum (a + b or a - b
    of the prompt's operands), splits that share no template, the shots and the system line; a second run into the
    same --out is refused (nothing written over). prompt_text puts the system line and the shots before the prompt
    as chat turns (and as plain text without a chat template)."""
    import json
    import re
    out = tmp_path / "gsm"
    minpp_cli.main(["data", "--out", str(out), "--n-train", "12", "--n-dev", "5", "--n-test", "6", "--max-operand", "9"])
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "dev", "test")}
    assert [len(rows[s]) for s in rows] == [12, 5, 6]
    for r in sum(rows.values(), []):
        a, op, b, res = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", r["answer"]).groups()
        assert int(res) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 1 and r["answer"].endswith(f"#### {res}")
        assert a in r["prompt"] and b in r["prompt"], r
    skeleton = lambda p: re.sub(r"\d+|\b[A-Z][a-z]+\b", "_", p)  # noqa: E731 -- numbers and names out
    assert not {skeleton(r["prompt"]) for r in rows["train"]} & {skeleton(r["prompt"]) for r in rows["test"]}
    shots = [json.loads(x) for x in (out / "shots.jsonl").read_text().splitlines()]
    system = (out / "system.txt").read_text().strip()
    assert len(shots) == 3 and all("####" in s["answer"] for s in shots) and "####" in system
    with pytest.raises(ValueError, match="holds train.jsonl already"):
        minpp_cli.main(["data", "--out", str(out)])
    tok = word_tokenizer(["<pad>", "<eos>", "hi"])
    text = minpp_cli.prompt_text(tok, "Q?", system, [(s["prompt"], s["answer"]) for s in shots])
    at = [text.index(x) for x in (system, shots[0]["prompt"], shots[0]["answer"], shots[2]["answer"], "Q?")]
    assert at == sorted(at) and text.count("assistant") == 4, text
    tok.chat_template = None
    assert minpp_cli.prompt_text(tok, "Q?", system, [("q1", "a1")]) == f"{system}\n\nq1\n\na1\n\nQ?"
