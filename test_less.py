"""Conformance suite for LESS (SPEC.md part L): gradient features, per-example gradients, optimizer state,
projection, scores and selection, storage, matching, the method in memory, data preparation, dynamic selection.

Part A reaches the implementation only through the `impl` fixture (less_ref, or --less-impl NAME), in the order of
SPEC.md's clauses; each test names its clause (@pytest.mark.spec) and compares the implementation with computations
written here: float64 formulas, a per-example autograd loop over a tiny Llama, optimizer moments read straight from
torch.optim, the projection matrix from its documented formula, the storage contract under 1, 2 and 3 gloo ranks.
A "relation" test checks two calls of the implementation against each other (an invariance), not a value.
Part B tests reference-only internals (hash arithmetic, chunk files, fake ranks, the command line) on less_ref
itself; it is deselected when a candidate is named.
"""
import contextlib
import json
import math
import os
import re

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import REFUSED, TOL, call, needs_feature, word_tokenizer

IMPL_KIND = "less"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
spec = pytest.mark.spec


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
# Part A: the contract, through impl, in SPEC.md's order


# --- L1: gradient features


@spec("L1.1")
@pytest.mark.parametrize("dtype", DTYPES)
@given(g=matrix(), mseed=st.integers(0, 2 ** 31 - 1), vscale=st.sampled_from([0.0, 1e-12, 1e-8, 1.0]))
def test_adam_features_formula(impl, dtype, g, mseed, vscale):
    """m_hat / sqrt(v_hat + eps), eps inside, no bias correction; low-precision grads computed in fp32."""
    gen = torch.Generator().manual_seed(mseed)
    m = torch.randn(g.shape[1], generator=gen).float() * 1e-3
    v = torch.rand(g.shape[1], generator=gen).float() * vscale
    gd = g.to(dtype)
    out = impl.adam_features(gd, m, v)
    assert out.dtype == torch.float32
    assert_close(out, adam64(gd, m, v), f"adam_features, grad {dtype}")


@spec("L1.1")
def test_adam_eps_inside_the_root_and_no_bias_correction(impl):
    g, m, v = torch.zeros(1, 3), torch.tensor([1.0, 0.0, -2.0]), torch.zeros(3)
    # m_hat = 0.9 m, v_hat = 0: eps inside gives 0.9 m / 1e-4 (outside would be 0.9 m / 1e-8)
    assert_close(impl.adam_features(g, m, v), torch.tensor([[9000.0, 0.0, -18000.0]]))
    out = impl.adam_features(torch.tensor([[2.0]]), torch.tensor([1.0]), torch.tensor([4.0]))
    assert_close(out, torch.tensor([[(0.9 + 0.2) / math.sqrt(0.999 * 4 + 0.004 + 1e-8)]]))
    outside = call(impl.adam_features, g, m, v, eps_outside=True)
    assert_close(outside, adam64(g, m, v, eps_outside=True), "eps_outside=True: DataFlex's form")


@spec("L1.1")
def test_adam_zero_state_and_zero_grad_are_finite(impl):
    out = impl.adam_features(torch.zeros(2, 5), torch.zeros(5), torch.zeros(5))
    assert torch.equal(out, torch.zeros(2, 5))


@spec("L1.2")
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


@spec("L1.2")
@pytest.mark.parametrize("grad_type", ["sgd", "sign"])
def test_a_state_at_hand_changes_no_sgd_or_sign_feature(impl, grad_type):
    """gradient_features(g, 'sgd' or 'sign', adam_state): the state is not used (g or sign(g)), or refused."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 40, generator=gen)
    state = (torch.randn(40, generator=gen) * 1e-3, torch.rand(40, generator=gen) * 1e-6)
    try:
        out = impl.gradient_features(g, grad_type, state)
    except REFUSED:
        return
    assert_close(out, g.double() if grad_type == "sgd" else g.double().sign(), f"{grad_type} with a state at hand")


@spec("L1.2")
def test_adam_gradient_type_without_optimizer_state_is_refused(impl):
    with pytest.raises(Exception):
        impl.gradient_features(torch.randn(2, 4), "adam", None)


@spec("L1.3")
def test_adam_gradient_type_without_optimizer_state_is_error(impl):
    with pytest.raises(ValueError, match="optimizer state|exp_avg"):
        impl.gradient_features(torch.randn(2, 4), "adam", None)
    with pytest.raises(ValueError, match="adagrad"):
        impl.gradient_features(torch.randn(2, 4), "adagrad")


# --- L2: per-example gradients


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


@spec("L2.1")
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


@spec("L2.1")
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


@spec("L2.1")
def test_a_label_at_the_first_position_is_never_scored(impl):
    """Position 0 predicts nothing (the causal shift): a label there changes no gradient."""
    model = _train_only(_lm(), "q_proj,v_proj")
    ex = _examples(3)
    with_first = [dict(e, id=e["id"] + "-first", labels=[e["input_ids"][0]] + e["labels"][1:]) for e in ex]
    torch.testing.assert_close(impl.example_gradients(model, with_first), loop_gradients(model, ex), rtol=1e-4, atol=1e-6)


@spec("L2.2")
@pytest.mark.parametrize("field", ["labels", "input_ids"])
def test_a_token_equal_to_the_vocabulary_size_is_refused(impl, field):
    """Label or token id V (one past the last logit): any error, never a gradient read from outside the logits."""
    ex = _examples(3)
    ex[1][field] = list(ex[1][field])
    ex[1][field][-1] = 64
    with pytest.raises(Exception):  # noqa: B017 -- which error is policy (L2.3)
        impl.example_gradients(_lm(), ex)


@spec("L2.3")
@pytest.mark.parametrize("field,value,culprit", [
    ("input_ids", [1, 2, 84.7, 3, 4, 5, 6], "84.7"), ("input_ids", [1, 2, 64, 3, 4, 5, 6], "64"),
    ("input_ids", [1, 2, -1, 3, 4, 5, 6], "-1"), ("labels", [-100, -100, -100, 3, 64, 5, 6], "64"),
    ("labels", [-100, -100, -100, 3, -5, 5, 6], "-5"), ("input_ids", [[1, 2, 3, 4, 5, 6, 7]], "shape"),
    ("labels", [1, -100, -100, -100, -100, -100, -100], "response")])
def test_bad_token_ids_are_errors_naming_the_sample(impl, field, value, culprit):
    """Float, out-of-vocabulary or negative token ids, out-of-range labels, a label only at position 0: a ValueError
    naming the sample id (and the culprit), never a silent truncation or a raw IndexError."""
    ex = _examples(3)
    ex[1] = {"id": "bad-one", "input_ids": [1, 2, 3, 3, 4, 5, 6], "labels": [-100, -100, -100, 3, 4, 5, 6]}
    ex[1][field] = value
    with pytest.raises(ValueError, match=f"bad-one.*{re.escape(culprit)}|{re.escape(culprit)}.*bad-one"):
        impl.example_gradients(_lm(), ex)


# --- L3: optimizer state


def _trainer_setup(seed=0):
    """A model whose trainable set mixes decay and no-decay parameters, with AdamW grouped as transformers'
    Trainer does (decay group, then no-decay group), so optimizer index order != named_parameters() order;
    one step taken so the moments are non-zero."""
    from transformers import Trainer

    model = _train_only(_lm(seed), "layers.1,norm")
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


def _moments(opt, named):
    return tuple(torch.cat([opt.state[p][k].reshape(-1) for _, p in named]) for k in ("exp_avg", "exp_avg_sq"))


@spec("L3.1")
def test_optimizer_state_from_all_three_sources(impl, tmp_path):
    model, opt, named = _trainer_setup()
    expected_m, expected_v = _moments(opt, named)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save({"state": {"_fsdp_wrapped_module." + n: opt.state[p] for n, p in reversed(named)}, "param_groups": []},
               tmp_path / "optimizer.bin")
    for source in (opt, str(tmp_path / "optimizer.pt"), str(tmp_path / "optimizer.bin")):
        m, v = impl.adam_state(model, source)
        assert torch.equal(m.float(), expected_m) and torch.equal(v.float(), expected_v), source


def _evil_optimizer_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, tmp_path / "optimizer.pt")
    return str(tmp_path / "optimizer.pt")


@spec("L3.2")
def test_optimizer_file_with_pickled_code_does_not_run_it(impl, tmp_path):
    """A file whose pickle runs a command: the command never runs (whatever error the loader gives)."""
    path = _evil_optimizer_file(tmp_path)
    try:
        impl.adam_state(_lm(), path)
    except Exception:  # noqa: BLE001 -- which error is policy; that no code ran is the point
        pass
    assert not (tmp_path / "pwned").exists(), "loading optimizer state ran pickled code"


@spec("L3.3")
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


@spec("L3.3")
def test_optimizer_file_with_pickled_code_is_refused_naming_it(impl, tmp_path):
    with pytest.raises(ValueError, match="optimizer.pt"):
        impl.adam_state(_lm(), _evil_optimizer_file(tmp_path))


@spec("L3.3")
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


# --- L4: the projection


KINDS = ["rademacher", "sjlt"]


def proj(impl, x, k, seed=0, kind="rademacher", row_offset=0, **kw):
    """impl.project with the optional arguments only when needed (a candidate without them: a skip naming them)."""
    opt = dict(kw, kind=kind if kind != "rademacher" else None, row_offset=row_offset or None)
    return call(impl.project, x, k, seed, **opt)


def same_matrix_as_reference(impl, kind):
    import less_ref

    ours = less_ref.PROJECTION_KINDS[kind]
    mod = impl._module
    theirs = getattr(mod, "PROJECTION_KINDS", {}).get(kind, getattr(mod, "PROJECTION", ours) if kind == "rademacher" else ours)
    if theirs != ours:
        pytest.skip(f"{impl.name} declares projection {theirs!r}, not {ours!r}: matrix equality is not asked")


def _fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B % 2 ** 32
    h ^= h >> 13
    h = h * 0xC2B2AE35 % 2 ** 32
    return h ^ (h >> 16)


def _word(c, s1, s2):
    return _fmix32(_fmix32((c & 0xFFFFFFFF) ^ s1) ^ (c >> 32) ^ s2)


def documented_matrix(D, k, seed, row0=0):
    """Rows [row0, row0 + D) of the reference's dense R / sqrt(k) (float64), from SPEC L4.4's formula in Python
    integers: sign (i, j) = bit j % 32 of fmix32(fmix32(lo ^ s1) ^ hi ^ s2) (1 -> -1), where the counter
    i * W + j // 32 = hi * 2^32 + lo, W = ceil(k / 32), s1 = fmix32(seed ^ 0x9E3779B9), s2 = fmix32(seed ^ 0x7F4A7C15)."""
    s1, s2, W = _fmix32(seed ^ 0x9E3779B9), _fmix32(seed ^ 0x7F4A7C15), (k + 31) // 32
    words = torch.tensor([_word(c, s1, s2) for c in range(row0 * W, (row0 + D) * W)], dtype=torch.int64).reshape(D, W)
    bits = (words[..., None] >> torch.arange(32)) & 1
    return (1 - 2 * bits).double().reshape(D, W * 32)[:, :k] / math.sqrt(k)


def documented_sjlt(D, k, seed, s=4, row0=0):
    """Rows [row0, row0 + D) of the reference's sparse R (float64), SPEC L4.5 in Python integers: row i has in column
    block t (columns [t k / s, (t + 1) k / s)) the column start_t + (word >> 1) mod width_t and the sign of bit 0 of
    word = fmix32(fmix32(lo ^ s1) ^ hi ^ s2), counter i * s + t, seeds salted with 0x51A7; value sign / sqrt(s)."""
    s1, s2 = _fmix32(seed ^ 0x9E3779B9 ^ 0x51A7), _fmix32(seed ^ 0x7F4A7C15 ^ 0x51A7)
    R = torch.zeros(D, k, dtype=torch.float64)
    for i in range(D):
        for t in range(s):
            w, lo, hi = _word((row0 + i) * s + t, s1, s2), t * k // s, (t + 1) * k // s
            R[i, lo + (w >> 1) % (hi - lo)] += (1 - 2 * (w & 1)) / math.sqrt(s)
    return R


def projection_matrix(impl, D, k, seed):
    """R / sqrt(k) as the candidate defines it: the documented matrix for the reference's identity, else the
    candidate's own matrix read off its projection of basis vectors (its JL properties are tested in L4.1-L4.3)."""
    import less_ref

    mod = impl._module if hasattr(impl, "_module") else impl
    if getattr(mod, "PROJECTION", less_ref.PROJECTION) == less_ref.PROJECTION:
        return documented_matrix(D, k, seed)
    return torch.cat([proj(impl, torch.eye(min(4096, D - o)), k, seed, row_offset=o).double()
                      for o in range(0, D, 4096)])


@spec("L4.1")
@pytest.mark.parametrize("kind", KINDS)
@given(x=matrix(max_cols=200), k=st.sampled_from([1, 4, 8, 12, 64, 96]), a=st.floats(-3, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_is_linear(impl, kind, x, k, a, seed):
    """Relation: P(a x + y) = a P(x) + P(y)."""
    k = max(8, k - k % 8) if kind == "sjlt" else k  # sjlt: proj_dim a multiple of 8 (any s <= 8 divides it)
    x = x.float()
    y = torch.roll(x, 1, 0)
    lhs = proj(impl, a * x + y, k, seed, kind)
    rhs = a * proj(impl, x, k, seed, kind) + proj(impl, y, k, seed, kind)
    assert_projections_close(lhs, rhs, x.abs() * (abs(a) + 1) + y.abs(), k)


@spec("L4.1")
@pytest.mark.parametrize("kind", KINDS)
@given(x=matrix(max_cols=200), k=st.sampled_from([4, 8, 64, 96]), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_rows_do_not_depend_on_the_batch(impl, kind, x, k, seed):
    """Relation: a row projected alone equals the same row projected in a batch."""
    x = x.float()
    full = proj(impl, x, k, seed, kind)
    assert full.shape == (x.shape[0], k) and full.dtype == torch.float32
    for i in range(x.shape[0]):
        assert_projections_close(proj(impl, x[i:i + 1], k, seed, kind)[0], full[i], x[i], k)


@spec("L4.1")
@pytest.mark.parametrize("D,k", [(1, 1), (7, 33), (64, 512), (300, 100)])
def test_basis_vectors_map_to_signs(impl, D, k):
    """project(e_i) = row i of R / sqrt(k): every entry exactly +-1/sqrt(k), both signs present."""
    out = proj(impl, torch.eye(D), k, seed=3)
    assert out.shape == (D, k) and out.dtype == torch.float32
    assert torch.equal(out.abs(), torch.full((D, k), 1 / math.sqrt(k), dtype=torch.float32))
    if D * k >= 64:
        frac = (out > 0).double().mean().item()
        assert abs(frac - 0.5) < 6 * 0.5 / math.sqrt(D * k), f"fraction of +1 is {frac}"


@spec("L4.1")
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_deterministic_and_seeded(impl, kind):
    x = torch.randn(4, 500)
    a, b = proj(impl, x, 64, 1, kind), proj(impl, x, 64, 1, kind)
    assert torch.equal(a, b)
    c = proj(impl, torch.eye(500), 64, 2, kind)
    d = proj(impl, torch.eye(500), 64, 1, kind)
    changed = (c != d).any(1).double().mean() if kind == "sjlt" else (c != d).double().mean()
    assert changed > 0.4, "different seeds must give different matrices"


@spec("L4.1")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_of_low_precision_input_is_fp32_quality(impl, kind, dtype):
    x = (torch.randn(5, 1000) * 100).to(dtype)
    out = proj(impl, x, 256, 0, kind)
    assert out.dtype == torch.float32
    expected = proj(impl, torch.eye(1000), 256, 0, kind).double()  # R / scale, exactly
    assert_projections_close(out, x.double() @ expected, x, 256)


def check_slices(impl, kind, x, cut, k, seed, offset):
    x = x.float()
    D = x.shape[1]
    bounds = sorted({0, D} | {int(c * D) for c in cut})
    whole = proj(impl, x, k, seed, kind, row_offset=offset)
    parts = sum(proj(impl, x[:, a:b], k, seed, kind, row_offset=offset + a) for a, b in zip(bounds, bounds[1:]) if b > a)
    assert_projections_close(parts, whole, x, k)


SLICES = dict(x=matrix(max_rows=3, max_cols=300), cut=st.lists(st.floats(0, 1), min_size=1, max_size=3),
              k=st.sampled_from([8, 64]), seed=st.integers(0, 2 ** 32 - 1))


@spec("L4.2")
@pytest.mark.parametrize("kind", KINDS)
@given(offset=st.sampled_from([0, 1, 1000, 2 ** 12 - 3]), **SLICES)
def test_slices_project_to_the_whole(impl, kind, x, cut, k, seed, offset):
    """Relation: x holds rows [offset, offset + D) of a gradient: projecting its slices with their own row offsets
    and summing equals projecting it whole (the gradient split per layer, or an FSDP rank's flat shard)."""
    check_slices(impl, kind, x, cut, k, seed, offset)


@spec("L4.2")
@pytest.mark.parametrize("kind", KINDS)
@given(offset=st.sampled_from([2 ** 24 - 3, 2 ** 32 - 7, 2 ** 40 - 11, 2 ** 40]), **SLICES)
def test_slices_at_huge_row_indices(impl, kind, x, cut, k, seed, offset):
    """Relation: the same at row indices past 2^24, 2^32 and up to 2^40 (a 7B model with LoRA has D ~ 1.3e8)."""
    check_slices(impl, kind, x, cut, k, seed, offset)


@spec("L4.2")
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


@spec("L4.2")
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
    assert_projections_close(proj(impl, x, 96, 3, kind), x[:, idx].double() @ rows, x, 96)


@spec("L4.3")
def test_projection_rows_are_nearly_orthogonal(impl):
    """R R^T / k ~ I: off-diagonal entries within 6 standard deviations (1 / sqrt(k))."""
    k = 1024
    R = proj(impl, torch.eye(256), k, seed=11).double() * math.sqrt(k)
    gram = R @ R.T / k
    assert torch.allclose(gram.diagonal(), torch.ones(256, dtype=torch.float64))
    assert (gram - torch.eye(256, dtype=torch.float64)).abs().max() < 6 / math.sqrt(k)


@spec("L4.3")
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


@spec("L4.4")
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_the_documented_matrix(impl, kind):
    """An implementation that claims the reference's matrix (PROJECTION / PROJECTION_KINDS, or nothing declared)
    produces SPEC L4.4 / L4.5's signs, computed here in Python integers: on basis vectors at small and huge row
    indices, and on a long sparse input whatever block size the implementation uses inside."""
    same_matrix_as_reference(impl, kind)
    matrix_of = documented_matrix if kind == "rademacher" else documented_sjlt
    for row0, D, k in ((0, 40, 70), (2 ** 40 - 5, 6, 64), (2 ** 33 + 1, 3, 32), (2 ** 32 - 1, 3, 64)):
        out = proj(impl, torch.eye(D), k, 9, kind, row_offset=row0)
        assert torch.equal(out.double(), matrix_of(D, k, 9, row0=row0).float().double()), (row0, D, k)
    D = 2 ** 20 + 3
    idx = [0, 1, 2 ** 16 + 1, 2 ** 19 - 1, 2 ** 19, D - 1]
    x = torch.zeros(2, D)
    x[0, idx] = torch.arange(1.0, 7.0)
    x[1, idx[-1]] = 1.0
    rows = torch.cat([matrix_of(1, 16, 3, row0=i) for i in idx])
    assert_projections_close(proj(impl, x, 16, 3, kind), x[:, idx].double() @ rows, x, 16)


@spec("L4.4")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_the_same_on_cuda(impl, kind):
    x = torch.randn(3, 2000)
    assert_projections_close(proj(impl, x.to("cuda"), 1000, 7, kind).cpu(), proj(impl, x, 1000, 7, kind), x, 1000)
    basis = proj(impl, torch.eye(300, device="cuda"), 200, 7, kind).cpu()
    assert torch.equal(basis, proj(impl, torch.eye(300), 200, 7, kind)), "the matrix must be bit-identical across devices"


@spec("L4.5")
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


@spec("L4.5")
@pytest.mark.parametrize("k", [1023, 1030])
def test_sjlt_with_k_not_a_multiple_of_s_uses_every_column(impl, k):
    """k not divisible by s (4 here for the reference): every output column still receives rows (8000 rows,
    ~30 per column; a construction that drops the last k mod s columns leaves them empty), E |R_i|^2 = 1."""
    out = proj(impl, torch.eye(8000), k, seed=2, kind="sjlt").double()
    assert out.shape == (8000, k)
    empty = (out == 0).all(0).nonzero()[:, 0].tolist()
    assert not empty, f"columns {empty[:8]} receive no row"
    assert abs((out ** 2).sum(1).mean().item() - 1) < 0.05


@spec("L4.5")
@pytest.mark.parametrize("s", [1, 2, 8])
def test_a_projection_value_with_its_own_s(impl, s):
    """Projection(k, seed, "sjlt", s) projects as project(..., kind="sjlt", s=s) -- s nonzeros per row, not the
    default's -- and projected_features through that value uses the same matrix."""
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(s))
    direct = proj(impl, x, 64, 5, "sjlt", s=s)
    basis = proj(impl, torch.eye(700), 64, 5, "sjlt", s=s)
    assert int((basis != 0).sum(1).max()) <= s and abs((basis.double() ** 2).sum(1).mean().item() - 1) < 0.1
    value = impl.Projection(64, 5, "sjlt", s)
    assert_projections_close(value(x), direct, x, 64)
    assert_projections_close(value(x), x.double() @ basis.double(), x, 64)
    feats = call(impl.projected_features, x, "sgd", None, value, slice_cols=300)
    assert_projections_close(feats, x.double() @ basis.double(), x, 64)


@spec("L4.6")
@pytest.mark.parametrize("grad_type", ["adam", "sgd"])
def test_features_of_gradients_longer_than_one_slice(impl, grad_type):
    """projected_features with slices of 1000 coordinates over a 4500-long gradient (a 7B model's gradient is
    many slices long): the projection of the whole feature vector, Adam moments sliced with it."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 4500, generator=gen)
    m, v = torch.randn(4500, generator=gen) * 1e-3, torch.rand(4500, generator=gen) * 1e-6
    adam = (m, v) if grad_type == "adam" else None
    out = call(impl.projected_features, g, grad_type, adam, impl.Projection(64, 2), slice_cols=1000)
    feats = adam64(g, m, v) if adam else g.double()
    assert out.dtype == torch.float32
    assert_projections_close(out, feats @ projection_matrix(impl, 4500, 64, 2), feats, 64)


@spec("L4.6")
@pytest.mark.parametrize("kind", KINDS)
def test_a_projection_value_projects_as_project(impl, kind):
    """Projection(k, seed, kind)(x, row_offset) == project(x, k, seed, row_offset, kind)."""
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    value = impl.Projection(32, 7, kind)
    assert_projections_close(call(value, x, row_offset=2 ** 33), proj(impl, x, 32, 7, kind, row_offset=2 ** 33), x, 32)


@spec("L4.6")
@pytest.mark.parametrize("bad", [(64, 0, "gaussian"), (64, -1, "rademacher"), (0, 0, "rademacher")],
                         ids=["kind gaussian", "seed -1", "proj_dim 0"])
@pytest.mark.parametrize("path", ["projected_features", "select_step"])
def test_every_path_that_projects_refuses_a_bad_projection(impl, bad, path):
    """projected_features and select_step refuse a projection project refuses (an unknown kind, a negative seed,
    proj_dim 0): a path that skips the check projects silently with another R, or none."""
    projection = impl.Projection(*bad)
    with pytest.raises(Exception):  # noqa: B017 -- which error is policy (L4.7)
        if path == "projected_features":
            impl.projected_features(torch.randn(2, 30), "sgd", None, projection)
        else:
            model, opt, _ = _trainer_setup()
            impl.select_step(model, opt, _examples(4), _examples(2, seed=7, prefix="val"), 2, projection=projection)


@spec("L4.7")
@pytest.mark.parametrize("bad", [{"proj_dim": 0}, {"proj_dim": 2.5}, {"seed": -1}, {"kind": "gaussian"},
                                 {"row_offset": -3}, {"row_offset": 1.5}, {"block_rows": -5}])
def test_bad_projection_arguments_are_errors(impl, bad):
    """A bad argument is refused (TypeError for a wrong type, ValueError for a wrong value), never a silent
    result; an optional argument the candidate does not take is a skip."""
    args = dict(proj_dim=16, seed=0)
    args.update(bad)
    with pytest.raises(REFUSED):
        call(impl.project, torch.randn(2, 10), args.pop("proj_dim"), _refused=True, **args)


# --- L5: scores and selection


def scores64(train, val, eta, n_sub):
    s = 0
    for t, v, e in zip(train, val, eta):
        t, v = t.double(), v.double()
        s = s + e / sum(eta) * (t / t.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
    per = v.shape[0] // n_sub
    return torch.stack([s[:, i * per:(i + 1) * per].mean(1) for i in range(n_sub)], 1).max(1).values


@spec("L5.1")
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
    base = scores64(t, v, [1.0, 3.0], 2)
    row_scale = (torch.rand(6, 1, generator=gen) * 10 + 0.01) * big
    assert_close(impl.influence_scores([x * row_scale for x in t], [y * c for y in v], [c, 3 * c], 2), base)


@spec("L5.1")
@given(seed=st.integers(0, 2 ** 31 - 1), c=st.floats(1e-3, 1e3))
def test_influence_invariant_to_row_scale_and_weight_scale(impl, seed, c):
    """Rows scaled by any positive factor (0.01 to 10) and checkpoint weights by any factor score the float64
    scores of the unscaled inputs."""
    check_scale_invariance(impl, seed, c, 1.0)


@spec("L5.2")
@given(seed=st.integers(0, 2 ** 31 - 1), c=st.floats(1e-3, 1e3), big=st.sampled_from([1e20, 1e-30]))
def test_influence_of_rows_whose_norms_overflow_float32(impl, seed, c, big):
    """Rows of 1e20 or 1e-30 entries (their float32 norms over/underflow) score like the same rows at scale 1:
    beyond the original code, whose plain float32 F.normalize gives 0 there."""
    check_scale_invariance(impl, seed, c, big)


_T, _V = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
BAD_INFLUENCE = {
    "6 val rows in 4 subtasks": lambda f: f(_T, _V, n_subtasks=4),
    "a zero train row": lambda f: f(torch.cat([_T, torch.zeros(1, 8)]), _V),
    "2 train, 1 val checkpoint": lambda f: f([_T, _T], [_V], [0.5, 0.5]),
    "an empty val side": lambda f: f(_T, _V[:0]),
    "an empty train side": lambda f: f(_T[:0], _V),
    "n_subtasks 2.0": lambda f: f(_T, _V, n_subtasks=2.0),
    "3 weights for 2 checkpoints": lambda f: f([_T, _T], [_V, _V], [1.0, 1.0, 1.0]),
    "a NaN train row": lambda f: f(torch.cat([_T, torch.full((1, 8), float("nan"))]), _V),
}


@spec("L5.2")
@pytest.mark.parametrize("case", sorted(BAD_INFLUENCE))
def test_influence_bad_inputs_are_errors(impl, case):
    with pytest.raises(REFUSED):
        BAD_INFLUENCE[case](impl.influence_scores)


SCORES = dict(scores=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.25]), min_size=1, max_size=40), k=st.integers(0, 40))


@spec("L5.3")
@given(**SCORES)
def test_select_top_is_the_k_best_in_descending_order(impl, scores, k):
    """k distinct indices whose scores are the k largest, in non-increasing order (any order among ties)."""
    k = min(k, len(scores))
    idx = impl.select_top(torch.tensor(scores), k=k).tolist()
    assert len(idx) == len(set(idx)) == k
    assert [scores[i] for i in idx] == sorted(scores, reverse=True)[:k]


@spec("L5.3")
@pytest.mark.parametrize("N,fraction,k", [(10, 0.05, 0), (30, 0.1, 3), (7, 0.5, 3), (100, 0.05, 5), (3, 1.0, 3)])
def test_select_top_fraction_rounds_down(impl, N, fraction, k):
    """k = int(fraction * N) (LESS's rounding), the k best in descending order."""
    scores = torch.randperm(N, generator=torch.Generator().manual_seed(N)).float()
    assert impl.select_top(scores, fraction=fraction).tolist() == scores.argsort(descending=True)[:k].tolist()


@spec("L5.4")
@given(**SCORES)
def test_select_top_breaks_ties_by_position(impl, scores, k):
    """Ties go to the earlier position: a deterministic order the original's unstable sort does not promise."""
    k = min(k, len(scores))
    idx = impl.select_top(torch.tensor(scores), k=k).tolist()
    assert idx == sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


BAD_SELECTION = {"a NaN score": {"scores": torch.tensor([0.1, float("nan"), 0.3]), "k": 2},
                 "2-D scores": {"scores": torch.rand(3, 2), "k": 1}, "k = 2.0": {"scores": torch.rand(5), "k": 2.0},
                 "k > N": {"scores": torch.rand(5), "k": 6}, "neither k nor fraction": {"scores": torch.rand(5)},
                 "both k and fraction": {"scores": torch.rand(5), "k": 1, "fraction": 0.5},
                 "fraction 1.5": {"scores": torch.rand(5), "fraction": 1.5}}


@spec("L5.4")
@pytest.mark.parametrize("case", sorted(BAD_SELECTION))
def test_select_top_bad_inputs_are_errors(impl, case):
    with pytest.raises(REFUSED):
        impl.select_top(**BAD_SELECTION[case])


# --- L6: storage


def _collect(impl, model, ex, out, proj_dim=64, seed=1, kind="rademacher", s=4, **kw):
    args = dict(grad_type="sgd", checkpoint="ck1", chunk_size=4, batch_size=3)
    args.update(kw)
    return call(impl.collect_features, model, ex, str(out), projection=impl.Projection(proj_dim, seed, kind, s), **args)


def _chunks(out_dir):
    """The chunk files of a collection, by SPEC L6.1's layout: every *.safetensors under out_dir but the merged file."""
    return sorted(p for p in out_dir.rglob("*.safetensors") if p != out_dir / "features.safetensors")


def expected_features(impl, model, ex, k=64, seed=1, adam=None):
    """The single-process result computed here: per-example loop gradients, float64 features, the projection
    matrix, rows normalised."""
    g = loop_gradients(model, ex)
    y = (adam64(g, *adam) if adam is not None else g.double()) @ projection_matrix(impl, g.shape[1], k, seed)
    return y / y.norm(dim=1, keepdim=True)


@spec("L6.1")
def test_collected_rows_keep_their_ids(impl, tmp_path):
    model = _lm()
    ex = _examples(11)
    merged = _collect(impl, model, ex, tmp_path / "a")
    assert os.path.samefile(merged, tmp_path / "a" / "features.safetensors")
    feats, ids, identity = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == [e["id"] for e in ex] and feats.shape == (11, 64)
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex), rtol=1e-4, atol=1e-6)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0)).tolist()  # shuffled: each id its own row
    _collect(impl, model, [ex[i] for i in perm], tmp_path / "b")
    feats_b, ids_b, _ = impl.load_features(tmp_path / "b" / "features.safetensors")
    assert ids_b == [ex[i]["id"] for i in perm]
    torch.testing.assert_close(feats_b, feats[perm], rtol=1e-4, atol=1e-6)


@spec("L6.1")
def test_adam_collection_from_a_trainer_checkpoint(impl, tmp_path):
    model, opt, named = _trainer_setup()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ex = _examples(6)
    _collect(impl, model, ex, tmp_path / "a", grad_type="adam", optimizer_state=str(tmp_path / "optimizer.pt"))
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex, adam=_moments(opt, named)),
                               rtol=1e-4, atol=1e-6)


@spec("L6.1")
@pytest.mark.parametrize("grad_type", ["sgd", "sign"])
def test_an_optimizer_state_changes_nothing_without_adam(impl, tmp_path, grad_type):
    """An optimizer state passed with grad_type sgd or sign is not used: the rows are the plain (or sign) ones."""
    model, opt, named = _trainer_setup()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ex = _examples(5)
    try:
        _collect(impl, model, ex, tmp_path / "a", grad_type=grad_type, optimizer_state=str(tmp_path / "optimizer.pt"))
    except REFUSED:  # refusing the unused state is correct too
        return
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    g = loop_gradients(model, ex).double()
    y = (g if grad_type == "sgd" else g.sign()) @ projection_matrix(impl, g.shape[1], 64, 1)
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), y / y.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)


@spec("L6.2")
@pytest.mark.filterwarnings("ignore:.*recomputing it:UserWarning")  # intended: a torn chunk
def test_resume_after_a_removed_chunk_equals_the_clean_run(impl, tmp_path):
    model = _lm()
    ex = _examples(13)
    _collect(impl, model, ex, tmp_path / "a")
    clean = impl.load_features(tmp_path / "a" / "features.safetensors")
    chunks = _chunks(tmp_path / "a")
    assert len(chunks) >= 2, "collection must write chunks as it goes (SPEC L6.2)"
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


@spec("L6.2")
@pytest.mark.parametrize("removed", [(0, 2), (1, 3), (0, 3)], ids=lambda r: f"chunks {r[0]} and {r[1]} removed")
def test_resume_after_removed_chunks_that_are_not_contiguous(impl, tmp_path, removed):
    """Chunks removed with a kept one between them: the examples of each missing chunk are its own, never one
    contiguous run from the first missing chunk (which stores the kept chunk's examples under the next one's ids).
    The resumed rows equal the float64 features of their ids."""
    model, ex = _lm(), _examples(15)
    _collect(impl, model, ex, tmp_path / "a")
    chunks = _chunks(tmp_path / "a")
    assert len(chunks) >= 4, "collection must write a chunk per chunk_size examples (SPEC L6.2)"
    for c in removed:
        chunks[c].unlink()
    (tmp_path / "a" / "features.safetensors").unlink()
    _collect(impl, model, ex, tmp_path / "a")
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex), rtol=1e-4, atol=1e-6)


@spec("L6.2")
@pytest.mark.filterwarnings("ignore:.*recomputing it:UserWarning")  # intended: an edited chunk
def test_an_edited_chunk_is_recomputed_or_refused_before_any_work(impl, tmp_path):
    """A chunk whose bytes changed (one bit of its features) is found when the run resumes: recomputed -- the result
    equals the clean run's --, or refused naming it before any gradient is computed. Kept, it would either enter the
    result or stop the merge after all the missing work was done again."""
    needs_feature(impl, "STORAGE_CHECKSUM")  # without a checksum an edited chunk cannot be told from a real one
    model, ex = _lm(), _examples(13)
    _collect(impl, model, ex, tmp_path / "a")
    clean = impl.load_features(tmp_path / "a" / "features.safetensors")
    chunks = _chunks(tmp_path / "a")
    _flip_a_bit_of_the_features(chunks[1])
    chunks[2].unlink()
    (tmp_path / "a" / "features.safetensors").unlink()
    forwards = []
    hook = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        _collect(impl, model, ex, tmp_path / "a")
    except Exception as e:  # noqa: BLE001 -- refused: which error is policy
        assert not forwards, f"the edited chunk was refused only after {len(forwards)} forward passes: {e}"
        return
    finally:
        hook.remove()
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0], rtol=1e-5, atol=1e-7)


@spec("L6.1")
@pytest.mark.parametrize("buffer", ["one batch", "one chunk", "two chunks", "a time limit", "default"])
def test_collection_across_gradient_buffers_keeps_every_row_with_its_id(impl, tmp_path, monkeypatch, buffer):
    """The gradients a projection takes at once (the reference's LESS_GRAD_BUFFER_BYTES, LESS_BUFFER_SECONDS; other
    implementations may ignore them) never change a row or its id: a buffer of one batch (3 examples, chunks of 4),
    one chunk, two chunks, one projected after any time at all, or the whole pool, each against the float64
    features of every id."""
    model, ex = _lm(), _examples(14)
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = {"one batch": 3 * D * 4, "one chunk": 4 * D * 4, "two chunks": 8 * D * 4}
    if buffer in sizes:
        monkeypatch.setenv("LESS_GRAD_BUFFER_BYTES", str(sizes[buffer]))
    if buffer == "a time limit":
        monkeypatch.setenv("LESS_BUFFER_SECONDS", "1e-9")
    _collect(impl, model, ex, tmp_path / "a")
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, model, ex), rtol=1e-4, atol=1e-6)


def _permute_in_place(t):
    """Swap two distinct entries: same sum, same sum of squares, other content."""
    flat = t.data.view(-1)
    j = int((flat != flat[0]).nonzero()[0])
    flat[0], flat[j] = flat[j].clone(), flat[0].clone()


CHANGES = ["nothing", "proj_dim", "seed", "checkpoint", "grad_type", "kind", "sjlt s", "data", "labels only",
           "trainable weight", "frozen weight", "one entry deep inside a tensor", "trainable set",
           "permuted trainable values", "reordered moments"]


@spec("L6.3")
@pytest.mark.parametrize("change", CHANGES)
def test_changed_configuration_is_refused(impl, tmp_path, change):
    """Re-running into a directory of another configuration is refused (a ValueError), never resumed or mixed:
    also for a change in a FROZEN weight, one entry at the end of a large tensor, and permutations that keep sums
    and sums of squares. The control: a re-run with nothing changed resumes and gives the same rows."""
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
    elif change == "one entry deep inside a tensor":  # the last of the embedding's 2048 entries, not its first bytes
        with torch.no_grad():
            model.model.embed_tokens.weight.view(-1)[-1] += 1e-3
    elif change == "permuted trainable values":
        _permute_in_place(named[0][1])
    elif change == "reordered moments":
        sd = torch.load(tmp_path / "optimizer.pt", weights_only=True)
        _permute_in_place(sd["state"][0]["exp_avg"])
        _permute_in_place(sd["state"][0]["exp_avg_sq"])
        torch.save(sd, tmp_path / "optimizer.pt")
    if change == "nothing":
        before = impl.load_features(tmp_path / "a" / "features.safetensors")
        _collect(impl, model, ex, tmp_path / "a", **kw)
        after = impl.load_features(tmp_path / "a" / "features.safetensors")
        assert after[1] == before[1] and torch.equal(after[0], before[0])
        return
    with pytest.raises(ValueError):
        _collect(impl, model, ex, tmp_path / "a", **kw)


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
            except Exception as e:  # noqa: BLE001 -- the test reads which error each rank ended with
                with open(f"{result_file}.{rank}", "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
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


@spec("L6.4")
@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_style_collection_equals_single_process(impl, tmp_path, world):
    """Each rank takes DistributedSampler's shard (padded by repeats); the merged file has every id once, in
    dataset order, with the rows computed here in one process."""
    impl.collect_features  # skip early when not provided
    ex = _examples(9)
    result = _spawn(impl, tmp_path, world, "collect", tmp_path / "multi")
    errors = [open(f"{result}.{r}").read() for r in range(world) if os.path.exists(f"{result}.{r}")]
    assert not errors, errors
    feats, ids, _ = impl.load_features(tmp_path / "multi" / "features.safetensors")
    assert ids == [e["id"] for e in ex]
    torch.testing.assert_close(feats.double(), expected_features(impl, _lm(), ex), rtol=1e-4, atol=1e-6)


@spec("L6.4")
def test_an_error_on_one_rank_stops_every_rank_with_its_cause(impl, tmp_path):
    """Rank 1 meets a non-finite gradient while rank 0 has finished: both ranks end with an error that names
    the example, and no merged file is written. (A rank left waiting would end at the gloo timeout with a
    timeout error instead, without the example's id: promptness is checked by the message, not by a clock.)"""
    impl.collect_features
    result = _spawn(impl, tmp_path, 2, "collect-raise", tmp_path / "multi")
    assert not (tmp_path / "multi" / "features.safetensors").exists()
    msgs = [open(f"{result}.{r}").read() if os.path.exists(f"{result}.{r}") else "" for r in range(2)]
    assert "ex5" in msgs[1] and "ex5" in msgs[0], msgs


def _bad_examples(case):
    """(model, examples, what the error must name) for one kind of bad example."""
    model, ex = _lm(), _examples(4)
    if case in ("no response token", "label at position 0 only"):
        ex[2]["labels"] = [-100] * len(ex[2]["labels"])
        if case == "label at position 0 only":  # nothing predicts position 0: still no scored token
            ex[2]["labels"][0] = ex[2]["input_ids"][0]
        return model, ex, "ex2"
    if case == "label equal to the vocabulary size":
        ex[2]["labels"][-1] = 64
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


BAD_EXAMPLES = ["no response token", "label at position 0 only", "label equal to the vocabulary size", "duplicate id",
                "missing id", "tensor id", "non-finite gradient"]


@spec("L6.5")
@pytest.mark.parametrize("case", BAD_EXAMPLES)
def test_bad_examples_are_refused(impl, tmp_path, case):
    """An example with no scored token (its loss is NaN), a label past the vocabulary, two rows for one id, an id
    that cannot be stored, a non-finite gradient: collection refuses, never stores NaN or zero rows or rows that
    ids cannot find."""
    model, ex, _ = _bad_examples(case)
    with pytest.raises(Exception):  # noqa: B017 -- the error's type and message are policy (L2.3)
        _collect(impl, model, ex, tmp_path / "a")
    assert not (tmp_path / "a" / "features.safetensors").exists()


def _flip_a_bit_of_the_features(path):
    """Flip one bit of the last value of the file's largest floating-point tensor (the features, whatever their name
    and wherever other tensors -- ids, positions -- sit in the data)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    floats = [v for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("F64", "F32", "F16", "BF16")]
    start, end = max(floats, key=lambda v: v["data_offsets"][1] - v["data_offsets"][0])["data_offsets"]
    assert end > start, "no floating-point data to flip"
    data[8 + n + end - 2] ^= 0x40  # a high bit of the last value (little-endian)
    path.write_bytes(bytes(data))


def _edit_header(path, edit):
    """Rewrite a safetensors file's JSON header with edit(metadata dict of str -> str) applied, the data unchanged
    (offsets are relative to the data, so the header may change length)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = edit(dict(header.get("__metadata__", {})))
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _swap_ids(path, ids, replace=False):
    """Edit the stored ids of a safetensors file, data unchanged: the first two swapped, or the second replaced by the
    first (another record's id). Where the ids are: a metadata field holding them as a JSON list, or their JSON
    strings in the file's bytes (a tensor of text); a skip if neither (ids[0] and ids[1] have one length here)."""
    header = {}

    def edit(meta):
        for key, value in meta.items():
            with contextlib.suppress(ValueError):
                if json.loads(value) == ids:
                    stored = list(ids)
                    stored[0], stored[1] = (stored[0], stored[0]) if replace else (stored[1], stored[0])
                    header["edited"] = True
                    return dict(meta, **{key: json.dumps(stored)})
        return meta

    _edit_header(path, edit)
    if header:
        return
    raw = bytearray(path.read_bytes())
    a, b = json.dumps(ids[0]).encode(), json.dumps(ids[1]).encode()
    i, j = raw.find(a), raw.find(b)
    if len(a) != len(b) or i < 0 or j < 0:
        pytest.skip("the ids are neither a JSON list in the metadata nor JSON text in the data: this edit does not apply")
    raw[j:j + len(b)] = a
    if not replace:
        raw[i:i + len(a)] = b
    path.write_bytes(bytes(raw))


def _verified_collection(impl, tmp_path, n=9):
    needs_feature(impl, "STORAGE_CHECKSUM")
    model, ex = _lm(), _examples(n)
    _collect(impl, model, ex, tmp_path / "a")
    return model, ex, impl.load_features(tmp_path / "a" / "features.safetensors")


@spec("L6.6")
@pytest.mark.parametrize("edit", ["one bit of a feature", "two ids swapped", "an id replaced by another record's",
                                  "the checksum removed and a feature changed"])
@pytest.mark.filterwarnings("ignore:.*recomputing it:UserWarning")  # intended: an edited chunk
def test_an_edited_chunk_is_never_used(impl, tmp_path, edit):
    """A stored chunk changed after it was written: a re-run recomputes it (or refuses naming it) and the merged
    result is the clean run's -- never the edited row, never a row under another record's id."""
    model, ex, clean = _verified_collection(impl, tmp_path)
    chunk = _chunks(tmp_path / "a")[0]
    ids_in_chunk = [e["id"] for e in ex][:4]
    if edit == "one bit of a feature":
        _flip_a_bit_of_the_features(chunk)
    elif edit == "the checksum removed and a feature changed":
        _flip_a_bit_of_the_features(chunk)
        _edit_header(chunk, lambda m: {k: v for k, v in m.items() if "sha" not in k.lower() and "checksum" not in k.lower()})
    else:
        _swap_ids(chunk, ids_in_chunk, replace=edit.startswith("an id replaced"))
    (tmp_path / "a" / "features.safetensors").unlink()
    try:
        _collect(impl, model, ex, tmp_path / "a")
    except ValueError as e:
        assert chunk.name in str(e), e
        return
    feats, ids, _ = impl.load_features(tmp_path / "a" / "features.safetensors")
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0], rtol=1e-5, atol=1e-7)


@spec("L6.6")
@pytest.mark.parametrize("edit", ["one bit of a feature", "two ids swapped", "an id replaced by another record's",
                                  "the checksum removed and a feature changed"])
def test_an_edited_features_file_is_refused(impl, tmp_path, edit):
    """The merged file changed after it was written: load_features and match refuse it."""
    model, ex, clean = _verified_collection(impl, tmp_path)
    val = _files(impl, tmp_path, model, "v", _examples(2, seed=3, prefix="val"))
    merged = tmp_path / "a" / "features.safetensors"
    if edit in ("one bit of a feature", "the checksum removed and a feature changed"):
        _flip_a_bit_of_the_features(merged)
    if edit == "the checksum removed and a feature changed":
        _edit_header(merged, lambda m: {k: v for k, v in m.items() if "sha" not in k.lower() and "checksum" not in k.lower()})
    elif edit != "one bit of a feature":
        _swap_ids(merged, clean[1], replace=edit.startswith("an id replaced"))
    with pytest.raises(Exception):  # noqa: B017 -- which error is policy (L6.7)
        impl.load_features(merged)
    with pytest.raises(Exception):  # noqa: B017
        impl.match([str(merged)], [val])


def _edited(value):
    """Another value of the same kind: what an edit of one identity field would leave."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [0]
    if isinstance(value, dict):
        return dict(value, edited=1)
    return "x"


@spec("L6.6")
def test_every_identity_field_edited_is_refused(impl, tmp_path):
    """The identity (projection, checkpoint name, model and data hashes, ...) decides which files may be matched:
    each of its fields edited in the merged file's metadata, one at a time, makes load_features and match refuse
    the file -- an edited checkpoint name or model hash would pair features of two models."""
    model, ex, clean = _verified_collection(impl, tmp_path)
    val = _files(impl, tmp_path, model, "v", _examples(2, seed=3, prefix="val"))
    merged = tmp_path / "a" / "features.safetensors"
    original = merged.read_bytes()
    identity = clean[2]
    field = [{}]

    def find(meta):
        field[0] = {k: v for k, v in meta.items() if _json_or_none(v) == identity}
        return meta
    _edit_header(merged, find)
    if not field[0] or not isinstance(identity, dict):
        pytest.skip("the identity is not stored as one JSON field of the file's metadata: this edit does not apply")
    key = next(iter(field[0]))
    for name, value in identity.items():
        merged.write_bytes(original)
        _edit_header(merged, lambda m: dict(m, **{key: json.dumps(dict(identity, **{name: _edited(value)}))}))
        with pytest.raises(Exception):  # noqa: B017 -- which error is policy (L6.7)
            impl.load_features(merged)
        with pytest.raises(Exception):  # noqa: B017
            impl.match([str(merged)], [val])


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


@spec("L6.7")
@pytest.mark.parametrize("case", BAD_EXAMPLES)
def test_bad_examples_are_errors_naming_the_id(impl, tmp_path, case):
    model, ex, culprit = _bad_examples(case)
    with pytest.raises(ValueError, match=culprit):
        _collect(impl, model, ex, tmp_path / "a")


@spec("L6.7")
def test_a_corrupt_chunk_is_recomputed_with_a_warning(impl, tmp_path):
    """The reference's promise: a corrupt chunk found on resume is named in a UserWarning and recomputed."""
    model, ex, clean = _verified_collection(impl, tmp_path)
    chunk = _chunks(tmp_path / "a")[1]
    _flip_a_bit_of_the_features(chunk)
    (tmp_path / "a" / "features.safetensors").unlink()
    with pytest.warns(UserWarning, match=re.escape(chunk.name)):
        _collect(impl, model, ex, tmp_path / "a")
    assert impl.load_features(tmp_path / "a" / "features.safetensors")[1] == clean[1]


@spec("L6.7")
def test_a_chunk_given_to_match_is_refused(impl, tmp_path):
    """One chunk in place of the merged file would score only that chunk's rows."""
    model = _lm()
    _files(impl, tmp_path, model, "t", _examples(9))
    v = _files(impl, tmp_path, model, "v", _examples(2, seed=3, prefix="val"))
    with pytest.raises(ValueError, match="chunk"):
        impl.match([str(_chunks(tmp_path / "t")[0])], [v])


@spec("L6.7")
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


@spec("L6.7")
def test_collection_files_follow_the_umask(impl, tmp_path):
    old = os.umask(0o022)
    try:
        _collect(impl, _lm(), _examples(3), tmp_path / "a")
    finally:
        os.umask(old)
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o044 == 0o044, f"{p} is not readable by others: {oct(p.stat().st_mode)}"


@spec("L6.7")
def test_an_edited_file_is_named(impl, tmp_path):
    """A changed merged file or one without a checksum: a ValueError naming the file, and no advice to delete it."""
    model, ex, clean = _verified_collection(impl, tmp_path)
    merged = tmp_path / "a" / "features.safetensors"
    _swap_ids(merged, clean[1])
    with pytest.raises(ValueError, match="features.safetensors") as e:
        impl.load_features(merged)
    assert "delete" not in str(e.value)
    _edit_header(merged, lambda m: {k: v for k, v in m.items() if "sha" not in k.lower() and "checksum" not in k.lower()})
    with pytest.raises(ValueError, match="features.safetensors.*checksum"):
        impl.load_features(merged)


# --- L7: matching stored files


def _files(impl, tmp_path, model, name, ex, **kw):
    _collect(impl, model, ex, tmp_path / name, **kw)
    return str(tmp_path / name / "features.safetensors")


def _checkpoints(impl, tmp_path, n=2, pool=None, val=None, steps=None):
    """n checkpoints of one warm-up (a step of training between them), named checkpoint-<step> (steps 1, 2, ... by
    default): their weights, moments, optimizer files and the stored train (adam) and val (sgd) files, with the
    float64 features expected of each."""
    steps = steps or range(1, n + 1)
    model, opt, named = _trainer_setup()
    pool, val = pool or _examples(7), val or _examples(4, seed=3, prefix="val")
    out = []
    for c in range(n):
        if c:  # a second checkpoint: one more step moves weights and moments
            model(input_ids=torch.tensor([pool[c]["input_ids"]]), labels=torch.tensor([pool[c]["labels"]])).loss.backward()
            opt.step()
        torch.save(opt.state_dict(), tmp_path / f"opt{c}.pt")
        moments = _moments(opt, named)
        out.append({"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "moments": moments,
                    "train": _files(impl, tmp_path, model, f"t{c}", pool, grad_type="adam", checkpoint=f"checkpoint-{steps[c]}",
                                    optimizer_state=str(tmp_path / f"opt{c}.pt")),
                    "val": _files(impl, tmp_path, model, f"v{c}", val, checkpoint=f"checkpoint-{steps[c]}"),
                    "t64": expected_features(impl, model, pool, adam=moments), "v64": expected_features(impl, model, val)})
    return model, pool, val, out


@spec("L7.1")
def test_match_scores_stored_files(impl, tmp_path):
    """Two checkpoints stored by collect_features, matched with weights 0.7 / 0.3 and 2 subtasks: the float64
    scores of the features computed here, and the train ids."""
    _, pool, _, ck = _checkpoints(impl, tmp_path)
    scores, ids = impl.match([c["train"] for c in ck], [c["val"] for c in ck], [0.7, 0.3], n_subtasks=2)
    assert ids == [e["id"] for e in pool] and scores.dtype == torch.float32
    assert_close(scores, scores64([c["t64"] for c in ck], [c["v64"] for c in ck], [0.7, 0.3], 2))


def _incompatible(impl, tmp_path, case):
    """(train files, val files) that must not be scored together."""
    model, ex, val = _lm(), _examples(6), _examples(4, seed=3, prefix="val")
    other = _lm()
    with torch.no_grad():
        other.model.embed_tokens.weight[5, 3] += 0.25  # another base model: another gradient everywhere
    t1, v1 = _files(impl, tmp_path, model, "t1", ex), _files(impl, tmp_path, model, "v1", val)
    if case in ("seed", "kind", "checkpoint", "model"):
        kw = {"seed": {"seed": 9}, "kind": {"kind": "sjlt"}, "checkpoint": {"checkpoint": "ck2"}, "model": {}}[case]
        return [t1], [_files(impl, tmp_path, other if case == "model" else model, "v-x", val, **kw)]
    if case == "one val file for two train files":
        return [t1, _files(impl, tmp_path, other, "t2", ex, checkpoint="ck2")], [v1]
    m2 = other  # the second checkpoint's model
    if case == "val ids differ between checkpoints":
        return [t1, _files(impl, tmp_path, m2, "t2", ex, checkpoint="ck2")], [v1, _files(impl, tmp_path, m2, "v2", val[::-1], checkpoint="ck2")]
    return [t1, _files(impl, tmp_path, m2, "t2", ex[::-1], checkpoint="ck2")], [v1, _files(impl, tmp_path, m2, "v2", val, checkpoint="ck2")]


INCOMPATIBLE = ["seed", "kind", "checkpoint", "model", "one val file for two train files",
                "val ids differ between checkpoints", "train ids differ between checkpoints"]


@spec("L7.1")
@pytest.mark.parametrize("case", INCOMPATIBLE)
def test_match_refuses_incompatible_files(impl, tmp_path, case):
    train, val = _incompatible(impl, tmp_path, case)
    with pytest.raises(ValueError):
        impl.match(train, val)


MATCH_REFUSALS = {"out of epoch order": "epoch order", "the same checkpoint twice": "same checkpoint",
                  "one checkpoint under two names": "same checkpoint", "validation of adam features": "sgd"}


def _refused_match(impl, tmp_path, case):
    """(train files, val files) match must refuse: checkpoint-2 before checkpoint-1 (each weight would go to another
    epoch), one checkpoint twice -- the same files, or the same model and optimizer state collected under two names
    (its weight counted twice) --, a validation side that is not plain gradients."""
    model, pool, val, ck = _checkpoints(impl, tmp_path)
    t, v = [c["train"] for c in ck], [c["val"] for c in ck]
    if case == "out of epoch order":
        return t[::-1], v[::-1]
    if case == "the same checkpoint twice":
        return [t[0], t[0]], [v[0], v[0]]
    opt_file = str(tmp_path / "opt0.pt")
    model, opt, named = _trainer_setup()
    if case == "one checkpoint under two names":
        t = [_files(impl, tmp_path, model, f"t-as{c}", pool, grad_type="adam", checkpoint=f"checkpoint-{c}",
                    optimizer_state=opt_file) for c in (1, 2)]
        return t, [_files(impl, tmp_path, model, f"v-as{c}", val, checkpoint=f"checkpoint-{c}") for c in (1, 2)]
    v = [_files(impl, tmp_path, model, "v-adam", val, grad_type="adam", checkpoint="checkpoint-1", optimizer_state=opt_file)]
    t = [_files(impl, tmp_path, model, "t-adam", pool, grad_type="adam", checkpoint="checkpoint-1", optimizer_state=opt_file)]
    return t, v


@spec("L7.2")
@pytest.mark.parametrize("case", list(MATCH_REFUSALS))
def test_match_refuses_what_would_weight_another_epoch(impl, tmp_path, case):
    """Files out of epoch order, one checkpoint twice (same files, or the same model and optimizer under two names),
    a validation side that is not plain gradients: scores would be silently wrong, so any error, never scores."""
    t, v = _refused_match(impl, tmp_path, case)
    with pytest.raises(Exception):  # noqa: B017 -- the message is policy (L7.3)
        impl.match(t, v)


@spec("L7.2")
def test_checkpoint_steps_are_numbers(impl, tmp_path):
    """checkpoint-9 then checkpoint-10 is epoch order -- steps are numbers, not strings: matched, with the float64
    scores (weights 0.7 / 0.3); the reverse order is refused."""
    _, pool, _, ck = _checkpoints(impl, tmp_path, steps=(9, 10))
    t, v = [c["train"] for c in ck], [c["val"] for c in ck]
    scores, ids = impl.match(t, v, [0.7, 0.3])
    assert ids == [e["id"] for e in pool]
    assert_close(scores, scores64([c["t64"] for c in ck], [c["v64"] for c in ck], [0.7, 0.3], 1))
    with pytest.raises(Exception):  # noqa: B017 -- the message is policy (L7.3)
        impl.match(t[::-1], v[::-1], [0.3, 0.7])


@spec("L7.3")
@pytest.mark.parametrize("case", list(MATCH_REFUSALS))
def test_match_refusals_name_what_is_wrong(impl, tmp_path, case):
    t, v = _refused_match(impl, tmp_path, case)
    with pytest.raises(ValueError, match=MATCH_REFUSALS[case]):
        impl.match(t, v)


@spec("L7.3")
def test_match_refusal_names_files_and_first_differing_id(impl, tmp_path):
    train, val = _incompatible(impl, tmp_path, "val ids differ between checkpoints")
    with pytest.raises(ValueError, match=r"v2.*v1.*val"):
        impl.match(train, val)


# --- L8: the whole method in memory


@spec("L8.1")
def test_less_scores_in_memory(impl, tmp_path):
    """less_scores over two checkpoints (weights, Adam moments, eta 0.7 / 0.3, 2 subtasks) equals the float64 scores
    of the features computed here -- on its own, no stored file involved --, and leaves the model as it came: its
    own weights (not the last checkpoint's) and its train mode."""
    model, opt, named = _trainer_setup()
    pool, val = _examples(7), _examples(4, seed=3, prefix="val")
    ckpts, t64, v64 = [], [], []
    for c in range(2):
        if c:
            model(input_ids=torch.tensor([pool[c]["input_ids"]]), labels=torch.tensor([pool[c]["labels"]])).loss.backward()
            opt.step()
        moments = _moments(opt, named)
        ckpts.append(({n: p.detach().clone() for n, p in model.named_parameters()}, moments, [0.7, 0.3][c]))
        t64.append(expected_features(impl, model, pool, adam=moments))
        v64.append(expected_features(impl, model, val))
    with torch.no_grad():  # the weights in the checkpoints are what counts, not the model's current ones
        for p in model.parameters():
            p.add_(0.01)
    model.train()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    scores = impl.less_scores(model, ckpts, pool, val, impl.Projection(64, 1), n_subtasks=2)
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    assert_close(scores, scores64(t64, v64, [0.7, 0.3], 2), "less_scores")
    assert model.training, "less_scores left the model in eval mode (dropout off in the user's training)"
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, before[n])]
    assert not changed, f"less_scores left checkpoint weights in the model: {changed[:3]}"


@spec("L8.1")
@pytest.mark.parametrize("case", ["another prefix", "a trainable parameter missing"])
def test_less_scores_refuses_weights_that_load_nothing(impl, case):
    """Weights saved as base_model.model.<name> (a peft wrapper's keys) would load nothing: refused, never the
    scores of the unloaded model."""
    model, opt, named = _trainer_setup()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if case == "another prefix":
        weights = {f"base_model.model.{n}": p for n, p in weights.items()}
    else:
        del weights[named[0][0]]
    with pytest.raises(Exception):  # noqa: B017 -- the message is policy (L8.2)
        impl.less_scores(model, [(weights, _moments(opt, named), 1.0)], _examples(3), _examples(2, seed=3), impl.Projection(16))


@spec("L8.1")
@pytest.mark.parametrize("side", ["train", "val"])
def test_less_scores_refuses_an_example_with_no_scored_token(impl, side):
    """An example whose only label is at position 0 has no loss (HF's mean over no token): refused, never scored
    with a zero or NaN gradient."""
    model, opt, named = _trainer_setup()
    pool, val = _examples(3), _examples(2, seed=3, prefix="val")
    bad = pool if side == "train" else val
    bad[1]["labels"] = [bad[1]["input_ids"][0]] + [-100] * (len(bad[1]["labels"]) - 1)
    with pytest.raises(Exception):  # noqa: B017 -- the message is policy (L2.3)
        impl.less_scores(model, [(None, _moments(opt, named), 1.0)], pool, val, impl.Projection(16))


@spec("L8.2")
@pytest.mark.parametrize("case", ["moments one entry short", "a negative exp_avg_sq", "a live optimizer as moments",
                                  "weights of another prefix"])
def test_less_scores_errors_name_the_checkpoint(impl, case):
    model, opt, named = _trainer_setup()
    m, v = _moments(opt, named)
    weights, moments = None, (m, v)
    if case == "moments one entry short":
        moments = (m[:-1], v[:-1])
    elif case == "a negative exp_avg_sq":
        moments = (m, torch.cat([-v[:1] - 1, v[1:]]))
    elif case == "a live optimizer as moments":
        moments = opt
    else:
        weights = {f"base_model.model.{n}": p.detach() for n, p in model.named_parameters()}
    with pytest.raises(REFUSED, match="checkpoint 0"):
        impl.less_scores(model, [(weights, moments, 1.0)], _examples(3), _examples(2, seed=3), impl.Projection(16))


TRAINER_LOG = [{"epoch": 0.5, "learning_rate": 2.0}, {"epoch": 1.0, "learning_rate": 1.0}, {"epoch": 1.0, "loss": 3.0},
               {"epoch": 1.5, "learning_rate": 0.5}, {"epoch": 2.0, "learning_rate": 0.25}]
BAD_TRAINER_STATES = {"bad.json": ({"global_step": 3}, "log_history"),
                      "gap.json": ({"log_history": TRAINER_LOG[:2] + [{"epoch": 3.0, "learning_rate": 0.1}]}, "epoch 2"),
                      "nan.json": ({"log_history": TRAINER_LOG[:3] + [{"epoch": 1.5, "learning_rate": float("nan")}]},
                                   r"nan.json.*log_history\[3\]"),
                      "neg.json": ({"log_history": [{"epoch": 1.0, "learning_rate": -1e-5}]}, r"neg.json.*log_history\[0\]"),
                      "cut.json": ('{"log_history": [', "cut.json")}


def _trainer_states(tmp_path):
    for name, (state, _) in BAD_TRAINER_STATES.items():
        (tmp_path / name).write_text(state if isinstance(state, str) else json.dumps(state))
    return [(tmp_path / name, says) for name, (_, says) in BAD_TRAINER_STATES.items()]


@spec("L8.3")
def test_checkpoint_weights_from_a_trainer_state(impl, tmp_path):
    """eta_i = the mean logged rate of epoch i, entries with epoch in (i - 1, i] (1.0 belongs to epoch 1); a state
    with an epoch missing, a NaN or negative rate, or no log is refused (its weights would be wrong)."""
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": TRAINER_LOG}))
    assert impl.checkpoint_weights_from_trainer_state(tmp_path / "trainer_state.json") == [1.5, 0.375]
    for path, _ in _trainer_states(tmp_path):
        with pytest.raises(Exception):  # noqa: B017 -- the message is policy (L8.4)
            impl.checkpoint_weights_from_trainer_state(path)


@spec("L8.4")
def test_trainer_state_refusals_name_file_and_entry(impl, tmp_path):
    for path, says in _trainer_states(tmp_path):
        with pytest.raises(ValueError, match=says):
            impl.checkpoint_weights_from_trainer_state(path)


# --- L9: data preparation


def _word_tokenizer():
    return word_tokenizer(["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] +
                          [str(i) for i in range(20)] + ["what", "is", "+", "?", "=", "####", "the", "answer"])


@spec("L9.1")
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


@spec("L9.1")
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


@spec("L9.2")
def test_encode_errors_name_the_record(impl):
    tok = _word_tokenizer()
    with pytest.raises(ValueError, match="'long'.*max_length=6"):
        impl.encode_example({"id": "long", "prompt": "what is 3 + 4 ?", "response": "7"}, tok, max_length=6)
    with pytest.raises(ValueError, match="'x'.*prompt"):
        impl.encode_example({"id": "x", "text": "what"}, tok)


@spec("L9.2")
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


# --- L10: DataFlex's dynamic selection


@spec("L10.1")
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
    m, v = _moments(opt, named)
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


# ============================================================================
# Part B: reference-only machinery (less_ref itself; deselected when --less-impl names a candidate)

import less_ref as ref  # noqa: E402
from cli import less as less_cli  # noqa: E402
from cli.common import UsageError  # noqa: E402


def test_projection_matrix_ignores_block_size_and_is_never_whole():
    x = torch.randn(3, 1000)
    for kind in KINDS:
        a = ref.project(x, 128, seed=5, block_rows=1000, kind=kind)
        for block in (1, 7, 333):
            assert_projections_close(ref.project(x, 128, seed=5, block_rows=block, kind=kind), a, x, 128)
    assert torch.equal(ref._rademacher_rows(5, 100, 50, 128), ref._rademacher_rows(5, 0, 1000, 128)[100:150])


@pytest.mark.parametrize("kind,s", [("rademacher", 4), ("sjlt", 4), ("sjlt", 3)])
@pytest.mark.parametrize("row0", [0, 2 ** 32 - 2, 2 ** 40 + 1])
def test_the_fast_projection_equals_the_plain_one(kind, s, row0):
    """project (R generated block by block: a byte table, addmm_ / index_add_) equals project_plain (R whole from
    projection_matrix's per-entry rule, x @ R / scale), and projection_matrix equals the rule written out in this
    file in Python integers."""
    x = torch.randn(3, 150, generator=torch.Generator().manual_seed(row0 % 97))
    plain = ref.project_plain(x, 96, 11, row0, kind, s)
    assert_projections_close(ref.project(x, 96, 11, row0, kind, s, block_rows=37), plain, x, 96)
    rule = documented_matrix(150, 96, 11, row0) if kind == "rademacher" else documented_sjlt(150, 96, 11, s, row0)
    R = ref.projection_matrix(150, 96, 11, row0, kind, s).double()
    assert torch.equal(R.sign(), rule.sign()) and torch.allclose(R, rule, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_less_scores_fast_path_equals_its_plain_definition(kind):
    """less_scores (vmap gradients, R made block by block) equals less_scores(plain=True) -- a backward per example,
    R whole from projection_matrix -- over two checkpoints with their own weights, on a model with dropout (eval mode
    must hold in both paths); and plain=True equals the float64 scores of the rule written out in this file."""
    model, opt, named = _trainer_setup()
    for m in model.modules():  # dropout on: a path that leaves train mode would give other gradients each call
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    model.train()
    pool, val = _examples(6), _examples(4, seed=3, prefix="val")
    ckpts = []
    for c in range(2):
        model(input_ids=torch.tensor([pool[c]["input_ids"]]), labels=torch.tensor([pool[c]["labels"]])).loss.backward()
        opt.step()
        ckpts.append(({n: p.detach().clone() for n, p in model.named_parameters()}, _moments(opt, named), [0.4, 0.6][c]))
    proj = ref.Projection(64, 3, kind)
    plain = ref.less_scores(model, ckpts, pool, val, proj, n_subtasks=2, plain=True)
    assert_close(ref.less_scores(model, ckpts, pool, val, proj, n_subtasks=2), plain.double(), "fast vs plain")
    R = (documented_matrix if kind == "rademacher" else documented_sjlt)(sum(p.numel() for _, p in named), 64, 3)
    t64, v64 = [], []
    for weights, (m, v), _ in ckpts:
        model.load_state_dict(weights)
        t64.append(adam64(loop_gradients(model, pool), m, v) @ R)
        v64.append(loop_gradients(model, val).double() @ R)
    assert_close(plain, scores64(t64, v64, [0.4, 0.6], 2), "plain vs float64")


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
    torch.testing.assert_close(ref.example_gradients(model, ex, vmap=True), ref.example_gradients(model, ex, vmap=False),
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
    monkeypatch.setattr(ref, "GRAD_BUFFER_BYTES", 1)  # one chunk per projection: each chunk is written when done
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


def test_dead_rank_then_resume_equals_clean_run(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("LESS_GRAD_BUFFER_BYTES", "1")  # the ranks write each chunk when it is done
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


def test_read_jsonl_ids_and_bad_lines(tmp_path, monkeypatch):
    """Default ids come from the record's content (128 bits), so they follow it through a reordering or an insertion
    (an identical record repeated gets -2); two lines with one id -- given, or a collision of two different records
    -- are an error naming both lines; bad lines are errors naming file and line."""
    from cli import common
    from cli.common import read_jsonl
    lines = ['{"id": "q1", "prompt": "1", "response": "2"}', '{"prompt": "3", "response": "4"}',
             '{"prompt": "5", "response": "6"}', '{"prompt": "3", "response": "4"}']
    (tmp_path / "d.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    ids = [r["id"] for r in read_jsonl(tmp_path / "d.jsonl")]
    assert ids[0] == "q1" and len(set(ids)) == 4 and ids[3] == ids[1] + "-2" and re.fullmatch("rec-[0-9a-f]{32}", ids[1])
    (tmp_path / "r.jsonl").write_text('{"prompt": "3", "response": "4"}\n{"prompt": "3", "response": "5"}\n')
    a, b = (r["id"] for r in read_jsonl(tmp_path / "r.jsonl"))  # one prompt, two responses: the whole record hashes
    assert a != b and not b.endswith("-2"), (a, b)
    (tmp_path / "e.jsonl").write_text("\n".join(['{"prompt": "0", "response": "0"}', lines[2], lines[1]]) + "\n")
    moved = {r["prompt"]: r["id"] for r in read_jsonl(tmp_path / "e.jsonl")}
    assert moved["5"] == ids[2] and moved["3"] == ids[1]
    (tmp_path / "twice.jsonl").write_text('{"id": "a", "prompt": "1"}\n{"id": "b"}\n{"id": "a", "prompt": "2"}\n')
    with pytest.raises(ValueError, match=r"twice.jsonl:3: id 'a' is also the id of line 1"):
        read_jsonl(tmp_path / "twice.jsonl")
    monkeypatch.setattr(common, "ID_HEX", 0)  # every default id is 'rec-': two different records collide
    with pytest.raises(ValueError, match=r"d.jsonl:4: id 'rec-' is also the id of line 3"):
        read_jsonl(tmp_path / "d.jsonl")
    monkeypatch.undo()
    # a given id equal to the suffixed default id of a repeated record: named with both lines, whichever comes first
    rec = '{"prompt": "same"}\n'
    suffixed = [r["id"] for r in read_jsonl(_write(tmp_path / "rep.jsonl", rec * 2))][1]
    assert suffixed.endswith("-2")
    for text, line, other in ((json.dumps({"id": suffixed, "prompt": "x"}) + "\n" + rec * 2, 3, 1), (rec * 2 + json.dumps({"id": suffixed}) + "\n", 3, 2)):
        with pytest.raises(ValueError, match=rf"s.jsonl:{line}: id '{suffixed}' is also the id of line {other}"):
            read_jsonl(_write(tmp_path / "s.jsonl", text))
    for name, text, where in (("bad.jsonl", '{"id": 1}\n[1, 2]\n', "bad.jsonl:2"), ("enc.jsonl", b'{"a": 1}\n{"b": "\xff"}\n', "enc.jsonl:2.*UTF-8"),
                              ("list.jsonl", '{"id": "a"}\n{"id": ["x"]}\n', "list.jsonl:2: id .* string or a whole number.*list"),
                              ("long.jsonl", json.dumps({"id": "x" * 5000}) + "\n", "long.jsonl:1: id .* at most 1024 characters"),
                              ("bool.jsonl", '{"id": true}\n', "bool.jsonl:1: id"),
                              ("surrogate.jsonl", '{"prompt": "a \\ud800 b"}\n', "surrogate.jsonl:1: .*not Unicode"),
                              ("empty.jsonl", "\n", "empty.jsonl: no records"), ("none.jsonl", None, "none.jsonl: no such file")):
        if text is not None:
            (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=where):
            read_jsonl(tmp_path / name)


def _write(path, text):
    path.write_text(text)
    return path


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
    less_cli.main(["collect", *common, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "v"), "--loop"])
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
                         "--out", str(tmp_path / "s.jsonl")], "nothing.safetensors: no such file")):
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


def _cli(*argv, env=None):
    """cli/less.py in a subprocess, output to pipes (not a terminal, as under nohup or a scheduler)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "cli/less.py", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def test_command_line_checks_everything_before_the_model_loads(tmp_path, monkeypatch):
    """collect's options and files are checked before any model loads (a loader that must not be called): adam without
    --optimizer-state, a file that is not an optimizer state, --lora-r with adam, a missing adapter, a wrong GGUF name
    (the .gguf files there are listed, no URL), an --out that cannot be written; match and select check --out before
    reading any feature. Usage mistakes exit 2, file mistakes 1, each one line on stderr, no delete advice."""
    _tiny_model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.Q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "d.jsonl").write_text('{"prompt": "what is 1 ?", "response": "2"}\n')
    (tmp_path / "ad").mkdir()
    (tmp_path / "not_an_optimizer.pt").write_bytes(b"not a zip")
    for name in ("t.safetensors", "v.safetensors", "s.jsonl"):  # inputs that exist: --out is what is wrong
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(less_cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    base = ["collect", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]
    cases = [(base, "needs --optimizer-state", 2),
             (base + ["--optimizer-state", str(tmp_path / "not_an_optimizer.pt")], "not_an_optimizer.pt", 1),
             (base + ["--optimizer-state", str(tmp_path / "nowhere.pt")], "nowhere.pt: no such file", 2),
             (base + ["--grad-type", "sgd", "--lora-r", "4", "--lora-adapter", str(tmp_path / "ad")], "not both", 2),
             (base + ["--lora-r", "4"], "no Adam moments", 2),
             (base + ["--grad-type", "sgd", "--lora-adapter", str(tmp_path / "ad")], "adapter_config.json", 1),
             (base + ["--grad-type", "sgd", "--gguf-file", "model.gguf"], "model.Q4.gguf", 2),
             (["collect", *base[1:5], "--out", str(tmp_path / "s.jsonl"), "--grad-type", "sgd"], "is a file", 2),
             (["match", "--train", str(tmp_path / "t.safetensors"), "--val", str(tmp_path / "v.safetensors"),
               "--out", str(tmp_path / "nodir" / "s.jsonl")], "does not exist", 2),
             (["match", "--train", str(tmp_path / "t.safetensors"), "--val", str(tmp_path / "v.safetensors"),
               "--weights", "1", "--trainer-state", str(tmp_path / "x.json"), "--out", str(tmp_path / "s.jsonl")], "not both", 2),
             (["select", "--scores", str(tmp_path / "s.jsonl"), "--data", str(tmp_path / "d.jsonl"), "--k", "1",
               "--out", str(tmp_path / "nodir" / "x.jsonl")], "does not exist", 2)]
    for argv, says, code in cases:
        with pytest.raises((ValueError, OSError)) as e:
            less_cli.main(argv)
        assert says in str(e.value) and "http" not in str(e.value), (argv, e.value)
        assert (isinstance(e.value, UsageError) and code == 2) or (not isinstance(e.value, UsageError) and code == 1), argv
    for argv, _, code in cases[:2] + cases[6:7]:  # the exit statuses and the one line, as a user sees them
        _one_line_exit(_cli(*argv), code)
    proc = _cli("collect", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--proj-dim", "0")
    assert proc.returncode == 2 and "--proj-dim" in proc.stderr, proc.stderr  # argparse's own usage errors: 2 as well
    proc = _cli("match", "--train", tmp_path / "m" / "config.json", "--val", tmp_path / "m" / "config.json",
                "--out", tmp_path / "s.jsonl")
    assert proc.returncode == 1 and "config.json" in proc.stderr and "delete" not in proc.stderr, proc.stderr


def test_command_line_never_writes_over_its_inputs_and_checks_paths_first(tmp_path):
    """An --out that is one of the command's inputs (itself, a link to it, the same path written another way) or
    that collides with another output is refused before any work, and the input is intact; a missing input file or
    model directory exits 2 (the command line names a path that is not there) in one line, before torch is imported
    (no torch in the child's modules); argparse's own errors are one line too."""
    (tmp_path / "d.jsonl").write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "q", "response": "s"}\n')
    (tmp_path / "s.jsonl").write_text('{"id": "a", "score": 1.0}\n{"id": "b", "score": 0.5}\n')
    os.symlink(tmp_path / "d.jsonl", tmp_path / "link.jsonl")
    before = {p: (tmp_path / p).read_bytes() for p in ("d.jsonl", "s.jsonl")}
    sel = ["select", "--scores", tmp_path / "s.jsonl", "--data", tmp_path / "d.jsonl", "--k", "1", "--out"]
    for out in (tmp_path / "d.jsonl", tmp_path / "link.jsonl", f"{tmp_path}/./s.jsonl"):
        proc = _cli(*sel, out)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "never writes over" in proc.stderr, proc.stderr
    proc = _cli("match", "--train", tmp_path / "s.jsonl", "--val", tmp_path / "d.jsonl", "--out", tmp_path / "d.jsonl")
    assert proc.returncode == 2 and "never writes over" in proc.stderr, proc.stderr
    assert before == {p: (tmp_path / p).read_bytes() for p in before}, "an input was changed"
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.')\n"
             "try:\n    runpy.run_path('cli/less.py', run_name='__main__')\n"
             "finally:\n    print('torch' in sys.modules)")
    import subprocess
    import sys
    for argv in (["select", "--scores", tmp_path / "nowhere.jsonl", "--data", tmp_path / "d.jsonl", "--k", "1", "--out", tmp_path / "x"],
                 ["collect", "--model", tmp_path, "--data", tmp_path / "nowhere.jsonl", "--out", tmp_path / "o", "--grad-type", "sgd"],
                 ["collect", "--model", tmp_path / "nowhere", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"],
                 ["collect", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--proj-dim", "x"]):
        proc = subprocess.run([sys.executable, "-c", probe, "cli/less.py", *map(str, argv)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert proc.stdout.strip() == "False", f"torch was imported before the check: {argv}"


def test_command_line_collect_shows_progress_in_a_log_file(tmp_path):
    """Output to a file (no terminal): collect prints progress lines to stderr -- records done of the total, the rate
    and the time left -- not only a terminal bar."""
    _tiny_model_dir(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} ?", "response": f"{i}"}) + "\n"
                                              for i in range(10)))
    proc = _cli("collect", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o",
                "--grad-type", "sgd", "--proj-dim", "32", "--batch-size", "2", env={"PROGRESS_SECONDS": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "records (" in x]
    assert len(lines) >= 5 and lines[-1].startswith("rank 0: sgd features: 10/10 records (100%)") and "ETA" in lines[0], lines
    assert "\r" not in proc.stderr and "Warning" not in proc.stderr, "a library's bar or warning in the log"


def test_progress_lines_come_on_a_timer(monkeypatch, capsys):
    """Progress in a log file is a timer, not a record count: with nothing done for a while (a model load, a slow
    batch) lines still come every PROGRESS_SECONDS -- less_ref's and the command lines' alike."""
    import time

    from cli import common
    monkeypatch.setenv("PROGRESS_SECONDS", "0.1")
    for bar in (ref.Progress(10, "lib"), common.Progress(10, "cli"), common.Progress(None, "loading")):
        time.sleep(0.45)
        bar.close()
    err = capsys.readouterr().err.splitlines()
    for desc, says in (("lib", "lib: 0/10 records"), ("cli", "cli: 0/10 records"), ("loading", "loading: 0m00s so far")):
        assert sum(line.startswith(says) for line in err) >= 2, (desc, err)


def test_warmup_base_model_is_tied_to_its_gguf_file(tmp_path):
    """OUT/base-model made from one GGUF file is not reused for another (its source.json names file and sha256)."""
    from cli.common import plain_model_dir

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.gguf").write_bytes(b"GGUF one")
    (tmp_path / "out" / "base-model").mkdir(parents=True)
    (tmp_path / "out" / "base-model" / "source.json").write_text(json.dumps({"gguf_file": "a.gguf", "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="was not made from"):
        plain_model_dir(str(tmp_path / "m"), "a.gguf", str(tmp_path / "out"))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft, not ours
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
    warm_args = ["warmup", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "train.jsonl"), "--out",
                 str(tmp_path / "warm"), "--fraction", "0.5", "--epochs", "2", "--grad-accum", "2", "--lora-r", "4",
                 "--lora-targets", "q_proj,v_proj", "--lr"]
    ckpts = less_cli.main(warm_args + ["1e-2"])
    # the same --out again: this run is there (refused without --resume; --resume finds it finished), another one is
    # refused naming what differs, a directory of other files too
    with pytest.raises(ValueError, match="holds this warm-up run already.*checkpoint-5, checkpoint-10.*--resume"):
        less_cli.main(warm_args + ["1e-2"])
    assert less_cli.main(warm_args + ["1e-2", "--resume"]) == ckpts
    with pytest.raises(ValueError, match=r"another warm-up run \(lr: 0.01 -> 0.02\)"):
        less_cli.main(warm_args + ["2e-2"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="no readable warmup.json"):
        less_cli.main(warm_args[:6] + [str(tmp_path / "other")] + warm_args[7:] + ["1e-2"])
    with pytest.raises(UsageError, match="is --model .* never writes over"):  # the model's own directory
        less_cli.main(warm_args[:6] + [str(tmp_path / "m")] + warm_args[7:] + ["1e-2"])
    warm = [r["id"] for r in read_jsonl(tmp_path / "warm" / "warmup.jsonl")]
    assert len(warm) == 10 == len(set(warm)) and set(warm) <= {r["id"] for r in rows}
    assert [os.path.basename(c) for c in ckpts] == ["checkpoint-5", "checkpoint-10"], "10 records, 2 per step, 2 epochs"
    for c in ckpts:
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(c))
    log = json.load(open(os.path.join(ckpts[-1], "trainer_state.json")))["log_history"]
    lrs = [e["learning_rate"] for e in log if "learning_rate" in e]
    assert len(lrs) == 10 and lrs[1:] == sorted(lrs[1:], reverse=True) and max(lrs) <= 1e-2, "warm-up, linear decay"
    common = ["--model", str(tmp_path / "m"), "--proj-dim", "64", "--kind", "sjlt", "--loop"]
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


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_warmup_removes_a_checkpoint_it_could_not_write(tmp_path, monkeypatch):
    """A full disk while the Trainer writes optimizer.pt: one OSError naming the checkpoint, and the partial checkpoint
    this run made is removed (a later --resume must not find half a checkpoint)."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    import transformers

    _tiny_model_dir(tmp_path / "m")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} ?", "response": f"{i}"}) + "\n"
                                                  for i in range(4)))

    def full_disk(self, output_dir):
        open(os.path.join(output_dir, "optimizer.pt"), "wb").close()  # what a failed torch.save leaves: 0 bytes
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full_disk)
    with pytest.raises(OSError, match="checkpoint-2: writing the checkpoint failed.*removed"):
        less_cli.main(["warmup", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "train.jsonl"), "--out",
                       str(tmp_path / "warm"), "--fraction", "1", "--epochs", "1", "--grad-accum", "2", "--lora-r", "2",
                       "--lora-targets", "q_proj"])
    assert not any(d.startswith("checkpoint-") for d in os.listdir(tmp_path / "warm"))


def _read_feature_file(out_dir):
    """(features, ids) of a finished collect directory, read with safetensors alone (not through the code under test)."""
    from safetensors import safe_open
    with safe_open(str(out_dir / "features.safetensors"), "pt") as f:
        return f.get_tensor("features"), json.loads(bytes(f.get_tensor("ids").tolist()))  # ids: their JSON as uint8


# --- reliability round 6 (issue 43): nothing of the user's is replaced, no model runs with random weights


def _one_line_exit(proc, code, *says):
    """Exit status code and one error line, last, saying each of says; before it only the command's first line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code and lines and lines[-1].startswith("error: "), proc.stderr
    assert all(x.startswith("cli/less.py ") for x in lines[:-1]) and len(lines) <= 2, proc.stderr
    assert all(s in lines[-1] for s in says) and "Traceback" not in proc.stderr, (says, proc.stderr)


def test_collect_never_replaces_files_it_did_not_write(tmp_path):
    """collect --out DIR that holds another tool's features.safetensors (no identity.json) or any file collect does not
    write is refused (exit 2) before any work, the files intact; an --out inside --model or --lora-adapter (every file
    of a model directory is an input) too."""
    _tiny_model_dir(tmp_path / "m")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "features.safetensors").write_bytes(b"another collection's features")
    base = ["collect", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--grad-type", "sgd", "--out"]
    _one_line_exit(_cli(*base, tmp_path / "res"), 2, "did not write", "features.safetensors", "no identity.json")
    (tmp_path / "res" / "identity.json").write_text("{}")
    (tmp_path / "res" / "notes.txt").write_text("mine")
    _one_line_exit(_cli(*base, tmp_path / "res"), 2, "did not write", "notes.txt")
    assert (tmp_path / "res" / "features.safetensors").read_bytes() == b"another collection's features"
    _one_line_exit(_cli(*base, tmp_path / "m" / "feats"), 2, "lies inside --model", "never writes over")
    _one_line_exit(_cli(*base, tmp_path / "m"), 2, "is --model")
    assert not (tmp_path / "m" / "feats").exists() and not (tmp_path / "m" / "identity.json").exists()


def _model_with_prefixed_weights(path):
    """A model directory whose weight names carry a peft-style 'base_model.model.' prefix: nothing fits the Llama."""
    from safetensors.torch import load_file, save_file
    _tiny_model_dir(path)
    weights = load_file(path / "model.safetensors")
    save_file({f"base_model.model.{k}": v for k, v in weights.items()}, path / "model.safetensors")


def test_a_model_whose_weights_do_not_fit_never_runs(tmp_path):
    """Weights whose names do not fit the architecture would load as random weights (transformers reports them at a
    log level a log file hides): exit 1 naming the keys, with stderr to a pipe, before any feature is written."""
    _model_with_prefixed_weights(tmp_path / "m")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    proc = _cli("collect", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--grad-type", "sgd", "--out",
                tmp_path / "o")
    _one_line_exit(proc, 1, "--model", "base_model.model.", "missing keys", "random weights")
    assert not (tmp_path / "o" / "features.safetensors").exists()


def test_repeated_options_add_up_or_are_refused(tmp_path):
    """An option that takes several values adds up when repeated (select --scores A --scores B reads both); any other
    option given twice is refused naming it (argparse would keep the last silently); --weights must give one weight
    per checkpoint (exit 2 naming --weights); a --model directory that is no model names --model and the directory."""
    _write(tmp_path / "d.jsonl", "".join(json.dumps({"id": f"r{i}", "prompt": "p", "response": f"{i}"}) + "\n"
                                         for i in range(4)))
    _write(tmp_path / "a.jsonl", '{"id": "r0", "score": 0.1}\n{"id": "r1", "score": 0.9}\n')
    _write(tmp_path / "b.jsonl", '{"id": "r2", "score": 0.5}\n{"id": "r3", "score": 0.7}\n')
    proc = _cli("select", "--scores", tmp_path / "a.jsonl", "--scores", tmp_path / "b.jsonl", "--data",
                tmp_path / "d.jsonl", "--k", "3", "--out", tmp_path / "top.jsonl")
    assert proc.returncode == 0 and "3 of 4 records" in proc.stdout, (proc.stdout, proc.stderr)
    assert [json.loads(x)["id"] for x in (tmp_path / "top.jsonl").read_text().splitlines()] == ["r1", "r3", "r2"]
    _one_line_exit(_cli("select", "--scores", tmp_path / "a.jsonl", "--data", tmp_path / "d.jsonl", "--k", "1",
                        "--k", "2", "--out", tmp_path / "x.jsonl"), 2, "--k is given 2 times")
    for name in ("t.safetensors", "v.safetensors"):
        (tmp_path / name).write_bytes(b"")
    _one_line_exit(_cli("match", "--train", tmp_path / "t.safetensors", "--val", tmp_path / "v.safetensors",
                        "--weights", "1", "2", "--out", tmp_path / "s.jsonl"), 2, "--weights gives 2 weights for 1")
    (tmp_path / "empty").mkdir()
    _one_line_exit(_cli("collect", "--model", tmp_path / "empty", "--data", tmp_path / "d.jsonl", "--out",
                        tmp_path / "o"), 2, "--model", str(tmp_path / "empty"), "not a model directory")


def test_environment_settings_are_read_where_used_and_named(tmp_path, monkeypatch):
    """A bad LESS_GRAD_BUFFER_BYTES, LESS_BUFFER_SECONDS or PROGRESS_SECONDS (2GiB, abc, inf, a negative or zero value)
    never breaks `import less_ref`; where it is used it is one ValueError naming the variable and what it accepts, and
    a command stops with one line before the model loads."""
    import importlib.util
    monkeypatch.setenv("LESS_GRAD_BUFFER_BYTES", "2GiB")
    monkeypatch.setenv("PROGRESS_SECONDS", "abc")
    spec = importlib.util.spec_from_file_location("less_ref_fresh", ref.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # a fresh import of less_ref: no error
    monkeypatch.setenv("PROGRESS_SECONDS", "0.5")  # LESS's buffer settings never break a progress line (minpp's tools)
    from cli import common
    for bar in (ref.Progress(3, "x"), common.Progress(None, "loading")):
        bar.close()
    for name, value in (("LESS_GRAD_BUFFER_BYTES", "2GiB"), ("LESS_GRAD_BUFFER_BYTES", "0"), ("LESS_BUFFER_SECONDS", "0"),
                        ("LESS_BUFFER_SECONDS", "inf"), ("PROGRESS_SECONDS", "inf"), ("PROGRESS_SECONDS", "abc"),
                        ("PROGRESS_SECONDS", "-1")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"{name}={value!r}: it must be"):
            ref.Progress(3, "x") if name == "PROGRESS_SECONDS" else ref._settings()
        monkeypatch.delenv(name)
    _tiny_model_dir(tmp_path / "m")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    proc = _cli("collect", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--grad-type", "sgd", "--out",
                tmp_path / "o", env={"LESS_GRAD_BUFFER_BYTES": "2GiB"})
    _one_line_exit(proc, 1, "LESS_GRAD_BUFFER_BYTES='2GiB'")
    assert "loading the model" not in proc.stderr


def test_the_progress_timer_stops_when_the_work_fails(tmp_path, monkeypatch, capsys):
    """A collection that fails (a full disk) stops its progress lines with it: no '6/6 records' every PROGRESS_SECONDS
    for the rest of the process."""
    import time
    monkeypatch.setenv("PROGRESS_SECONDS", "0.05")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ref, "_write_atomic", full_disk)
    with pytest.raises(OSError):
        _ref_collect(_lm(), _examples(6), tmp_path / "a")
    capsys.readouterr()
    time.sleep(0.3)
    assert capsys.readouterr().err == "", "progress lines went on after the work failed"


def test_progress_says_what_is_written_and_tells_hung_from_slow(monkeypatch, capsys):
    """Progress lines say how many records are on disk beside those computed, and never 'ETA ?': with none finished
    over the last lines they say for how long."""
    import time
    monkeypatch.setenv("PROGRESS_SECONDS", "0.05")
    with ref.Progress(300, "collect", written=0) as bar:
        time.sleep(0.2)
        bar.update(120)
        bar.written = 96
        time.sleep(0.12)
    err = capsys.readouterr().err.splitlines()
    assert err and not any("?" in line for line in err), err
    assert any(line.startswith("collect: 0/300 records (0%), 0 written") and "none finished in the last" in line
               for line in err), err
    assert any("120/300 records (40%), 96 written" in line and "ETA" in line for line in err), err


def test_a_buffer_is_written_once_it_has_held_gradients_for_buffer_seconds(tmp_path, monkeypatch):
    """LESS_BUFFER_SECONDS: a buffer that held gradients that long is projected and its chunks written, so a kill
    loses at most that much work whatever the model size (here any time at all: every chunk on its own)."""
    real, calls = ref.example_gradients, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # chunks of 4, batches of 3: the 5th batch is in the 3rd chunk
            raise KeyboardInterrupt("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(ref, "example_gradients", failing)
    monkeypatch.setenv("LESS_BUFFER_SECONDS", "1e-9")
    with pytest.raises(KeyboardInterrupt):
        _ref_collect(_lm(), _examples(13), tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run" / "shard-000-of-001")) == ["chunk_000000.safetensors",
                                                                         "chunk_000001.safetensors"]


@pytest.mark.parametrize("case", ["ids None and 2.5", "a bool id", "ids as a JSON object", "ids as int32",
                                  "an id of 5000 digits", "ids not JSON"])
def test_forged_ids_are_refused_naming_the_file(tmp_path, case):
    """A feature file from a forged or foreign writer with a correct checksum: ids that are not a JSON list of str or
    int ids, stored in another dtype, or past Python's digit limit are one ValueError naming the file."""
    from safetensors.torch import save_file
    raw = {"ids None and 2.5": b"[null, 2.5]", "a bool id": b'[true, "a"]', "ids as a JSON object": b'{"a": 1, "b": 2}',
           "ids as int32": None, "an id of 5000 digits": b"[1" + b"0" * 5000 + b', "a"]', "ids not JSON": b"[1, 2"}[case]
    ids = torch.zeros(2, dtype=torch.int32) if raw is None else torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    tensors = {"features": torch.ones(2, 4), "ids": ids}
    meta = {"identity": {"proj_dim": 4, "ids": "0"}, "format": ref.FILE_FORMAT}
    path = tmp_path / "features.safetensors"
    save_file(tensors, path, metadata={**{k: json.dumps(v) for k, v in meta.items()},
                                       "checksum": ref._file_checksum(tensors, meta)})
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        ref.load_features(path)
    assert len(str(e.value)) < 400 and "\n" not in str(e.value), e.value


def test_a_jsonl_id_past_the_digit_limit_names_file_and_line(tmp_path):
    from cli.common import read_jsonl
    _write(tmp_path / "d.jsonl", '{"prompt": "p", "response": "r"}\n{"id": 1' + "0" * 5000 + ', "prompt": "p"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'd.jsonl'}:2: not JSON")):
        read_jsonl(tmp_path / "d.jsonl")


def test_lora_options_without_peft_are_one_line_before_the_model_loads(tmp_path, monkeypatch):
    """--lora-r / --lora-adapter / warmup without peft installed (it is not in requirements.txt): a UsageError naming
    peft and examples/requirements.txt, before any model loads -- not a ModuleNotFoundError after it."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(less_cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    _tiny_model_dir(tmp_path / "m")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    for extra in (["collect", "--grad-type", "sgd", "--lora-r", "4"], ["warmup"]):
        with pytest.raises(UsageError, match="needs peft.*pip install -r examples/requirements.txt"):
            less_cli.main([extra[0], "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out",
                           str(tmp_path / "o"), *extra[1:]])


@pytest.mark.parametrize("argv", [["collect", "--grad-type", "sgd"], ["warmup", "--fraction", "1"]],
                         ids=["collect", "warmup"])
def test_a_command_says_what_it_does_within_5_seconds(tmp_path, argv):
    """With `import torch` taking 8 s (a busy machine, a cold disk), collect and warmup still print their first line
    (what they are about to do) within 5 s of starting, to stderr, which a log file shows."""
    import subprocess
    import sys
    import time
    if argv[0] == "warmup":
        pytest.importorskip("peft")  # warmup says it needs peft before anything else
    _tiny_model_dir(tmp_path / "m")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    probe = ("import builtins, runpy, sys, time\nreal = builtins.__import__\n"
             "def slow(name, *a, **k):\n    if name == 'torch' and 'torch' not in sys.modules:\n        time.sleep(8)\n"
             "    return real(name, *a, **k)\nbuiltins.__import__ = slow\nsys.argv = sys.argv[1:]\n"
             "runpy.run_path('cli/less.py', run_name='__main__')")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", probe, "cli/less.py", argv[0], "--model", str(tmp_path / "m"),
                             "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), *argv[1:]],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        took = time.time() - start
    finally:
        proc.kill()
        proc.wait()
    assert line.startswith(f"cli/less.py {argv[0]}: ") and took < 5, (line, took)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's, on this transformers
@pytest.mark.filterwarnings("ignore:Found missing adapter keys:UserWarning")  # intended: what the check turns into an error
def test_a_lora_adapter_whose_weights_do_not_fit_never_runs(tmp_path):
    """A saved adapter whose weight names do not fit the model (another prefix) would be skipped by peft and run from
    its initialisation: collect refuses it naming the keys, before any feature is computed."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    _tiny_model_dir(tmp_path / "m")
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "m"),
                        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lm.save_pretrained(tmp_path / "ad")
    weights = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    save_file({f"other.{k}": v for k, v in weights.items()}, tmp_path / "ad" / "adapter_model.safetensors")
    _write(tmp_path / "d.jsonl", '{"prompt": "what is 1 ?", "response": "2"}\n')
    with pytest.raises(ValueError, match="--lora-adapter .* do not fit the model"):
        less_cli.main(["collect", "--model", str(tmp_path / "m"), "--lora-adapter", str(tmp_path / "ad"), "--data",
                       str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--grad-type", "sgd"])
    assert not (tmp_path / "o" / "features.safetensors").exists()
