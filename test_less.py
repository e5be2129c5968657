"""Conformance suite for LESS gradient features, projection, matching and selection (SPEC Part 1).

Part A reaches the implementation only through the `impl` fixture (less_ref, or --less-impl NAME) and
compares it with float64 computations written here. Part B tests reference-only machinery (per-example
gradients of a transformers model, optimizer state, storage, resume, the demo) on less_ref itself.
"""
import json
import math
import os

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import TOL

IMPL_KIND = "less"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, msg="", dtype=torch.float32):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{msg}\n{m}")


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
    g64, m64, v64 = gd.double(), m.double(), v.double()
    expected = (0.9 * m64 + 0.1 * g64) / torch.sqrt(0.999 * v64 + 0.001 * g64 ** 2 + 1e-8)
    assert out.dtype == torch.float32
    assert_close(out, expected, f"adam_features, grad {dtype}")


def test_adam_eps_inside_the_root_and_no_bias_correction(impl):
    g, m, v = torch.zeros(3), torch.tensor([1.0, 0.0, -2.0]), torch.zeros(3)
    # m_hat = 0.9 m, v_hat = 0: eps inside gives 0.9 m / 1e-4 (outside would be 0.9 m / 1e-8)
    assert_close(impl.adam_features(g, m, v), torch.tensor([9000.0, 0.0, -18000.0]))
    out = impl.adam_features(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([4.0]))
    assert_close(out, torch.tensor([(0.9 + 0.2) / math.sqrt(0.999 * 4 + 0.004 + 1e-8)]))


def test_adam_zero_state_and_zero_grad_are_finite(impl):
    out = impl.adam_features(torch.zeros(2, 5), torch.zeros(5), torch.zeros(5))
    assert torch.equal(out, torch.zeros(2, 5))


# --- projection


@given(x=matrix(max_cols=200), k=st.integers(1, 96), a=st.floats(-3, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_is_linear(impl, x, k, a, seed):
    x = x.float()
    y = torch.roll(x, 1, 0)
    lhs = impl.project(a * x + y, k, seed)
    rhs = a * impl.project(x, k, seed) + impl.project(y, k, seed)
    assert_projections_close(lhs, rhs, x.abs() * (abs(a) + 1) + y.abs(), k)


@given(x=matrix(max_cols=200), k=st.integers(1, 96), seed=st.integers(0, 2 ** 32 - 1))
def test_projection_rows_do_not_depend_on_the_batch(impl, x, k, seed):
    x = x.float()
    full = impl.project(x, k, seed)
    for i in range(x.shape[0]):
        assert_projections_close(impl.project(x[i:i + 1], k, seed)[0], full[i], x[i], k)
        assert_projections_close(impl.project(x[i], k, seed), full[i], x[i], k)


@pytest.mark.parametrize("D,k", [(1, 1), (7, 33), (64, 512), (300, 100)])
def test_basis_vectors_map_to_signs(impl, D, k):
    """project(e_i) = row i of R / sqrt(k): every entry exactly +-1/sqrt(k), both signs present."""
    out = impl.project(torch.eye(D), k, seed=3)
    assert out.shape == (D, k) and out.dtype == torch.float32
    assert torch.equal(out.abs(), torch.full((D, k), 1 / math.sqrt(k), dtype=torch.float32))
    if D * k >= 64:
        frac = (out > 0).double().mean().item()
        assert abs(frac - 0.5) < 6 * 0.5 / math.sqrt(D * k), f"fraction of +1 is {frac}"


def test_projection_rows_are_nearly_orthogonal(impl):
    """R R^T / k ~ I: off-diagonal entries within 6 standard deviations (1 / sqrt(k))."""
    k = 1024
    R = impl.project(torch.eye(256), k, seed=11).double() * math.sqrt(k)
    gram = R @ R.T / k
    assert torch.allclose(gram.diagonal(), torch.ones(256, dtype=torch.float64))
    assert (gram - torch.eye(256, dtype=torch.float64)).abs().max() < 6 / math.sqrt(k)


@given(seed=st.integers(0, 2 ** 32 - 1), pair=st.integers(0, 2 ** 31 - 1))
def test_jl_norm_and_inner_products_are_preserved(impl, seed, pair):
    """For k = 2048, |Px|^2 / |x|^2 and <Px, Py> - <x, y> deviate by less than 6 sqrt(2 / k) |x| |y|."""
    gen = torch.Generator().manual_seed(pair)
    x = torch.randn(3, 3000, generator=gen) * torch.rand(3, 3000, generator=gen)
    px = impl.project(x, 2048, seed).double()
    x64 = x.double()
    bound = 6 * math.sqrt(2 / 2048)
    nx = x64.norm(dim=1)
    assert ((px.norm(dim=1) ** 2 / nx ** 2 - 1).abs() < bound).all()
    err = (px @ px.T - x64 @ x64.T) / (nx[:, None] * nx[None, :])
    assert (err.abs() < bound).all()


def test_projection_is_deterministic_and_seeded(impl):
    x = torch.randn(4, 500)
    a, b = impl.project(x, 64, seed=1), impl.project(x, 64, seed=1)
    assert torch.equal(a, b)
    c = impl.project(torch.eye(500), 64, seed=2)
    d = impl.project(torch.eye(500), 64, seed=1)
    assert (c != d).double().mean() > 0.4, "different seeds must give different matrices"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_of_low_precision_input_is_fp32_quality(impl, dtype):
    x = (torch.randn(5, 1000) * 100).to(dtype)
    out = impl.project(x, 256, seed=0)
    assert out.dtype == torch.float32
    expected = impl.project(torch.eye(1000), 256, seed=0).double()  # R / sqrt(k), exactly
    assert_projections_close(out, x.double() @ expected, x, 256)


def test_projection_agrees_with_the_reference(impl):
    """A candidate's matrix must be the reference's: the same (seed, row, column) -> sign function."""
    import less_ref

    x = torch.randn(3, 777)
    assert_projections_close(impl.project(x, 300, seed=12345), less_ref.project(x, 300, seed=12345), x, 300)
    # a long, sparse input: rows far apart, whatever block size the candidate uses internally
    D = 2 ** 20 + 3
    idx = torch.tensor([0, 1, 2 ** 16 + 1, 2 ** 19 - 1, 2 ** 19, D - 1])
    x = torch.zeros(2, D)
    x[0, idx] = torch.arange(1.0, 7.0)
    x[1, idx[-1]] = 1.0
    assert_projections_close(impl.project(x, 16, seed=3), less_ref.project(x, 16, seed=3), x, 16)


def test_projection_is_the_same_on_cuda(impl, device):
    x = torch.randn(3, 2000)
    assert_projections_close(impl.project(x.to(device), 1000, seed=7).cpu(), impl.project(x, 1000, seed=7), x, 1000)
    basis = impl.project(torch.eye(300, device=device), 200, seed=7).cpu()
    assert torch.equal(basis, impl.project(torch.eye(300), 200, seed=7)), "signs must be bit-identical across devices"


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


@given(seed=st.integers(0, 2 ** 31 - 1), c=st.floats(1e-3, 1e3))
def test_influence_invariant_to_row_scale_and_weight_scale(impl, seed, c):
    gen = torch.Generator().manual_seed(seed)
    t, v = [torch.randn(6, 16, generator=gen) for _ in range(2)], [torch.randn(4, 16, generator=gen) for _ in range(2)]
    base = impl.influence_scores(t, v, [1.0, 3.0], 2)
    row_scale = torch.rand(6, 1, generator=gen) * 10 + 0.01
    assert_close(impl.influence_scores([x * row_scale for x in t], [y * c for y in v], [c, 3 * c], 2), base)


def test_influence_bad_inputs_are_errors(impl):
    t, v = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError):
        impl.influence_scores(t, v, n_subtasks=4)  # 6 val examples do not split into 4 subtasks
    with pytest.raises(ValueError):
        impl.influence_scores(torch.cat([t, torch.zeros(1, 8)]), v)  # a zero row has no direction
    with pytest.raises(ValueError):
        impl.influence_scores([t, t], [v], [0.5, 0.5])


# --- selection


@given(scores=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.25]), min_size=1, max_size=40), k=st.integers(0, 40))
def test_select_top_descending_ties_by_position(impl, scores, k):
    k = min(k, len(scores))
    idx = impl.select_top(torch.tensor(scores), k=k).tolist()
    expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    assert idx == expected


@pytest.mark.parametrize("N,fraction,k", [(10, 0.05, 0), (30, 0.1, 3), (7, 0.5, 3), (100, 0.05, 5), (3, 1.0, 3)])
def test_select_top_fraction_rounds_down(impl, N, fraction, k):
    assert len(impl.select_top(torch.arange(N, dtype=torch.float32), fraction=fraction)) == k


def test_select_top_nan_is_error(impl):
    with pytest.raises(ValueError):
        impl.select_top(torch.tensor([0.1, float("nan"), 0.3]), k=2)


# ============================================================================
# Part B: reference-only machinery (less_ref itself)

import less_ref as ref  # noqa: E402


def test_projection_matrix_ignores_block_size_and_is_never_whole():
    x = torch.randn(3, 1000)
    a = ref.project(x, 128, seed=5, block_rows=1000)
    for block in (1, 7, 333):
        assert_projections_close(ref.project(x, 128, seed=5, block_rows=block), a, x, 128)
    assert torch.equal(ref.rademacher_block(5, 100, 50, 128), ref.rademacher_block(5, 0, 1000, 128)[100:150])


def test_hash_multiplication_is_exact():
    """_mul32 splits the product so int64 never overflows: compare with Python's big integers."""
    h = torch.tensor([0, 1, 2 ** 32 - 1, 123456789, 2 ** 31], dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF):
        assert ref._mul32(h, c).tolist() == [(int(v) * c) % 2 ** 32 for v in h.tolist()]


def _lm(seed=0, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        attention_dropout=dropout))


def _examples(n, seed=0, prefix="ex"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(0, 64, (L,), generator=g).tolist()
        p = int(torch.randint(2, L - 2, (1,), generator=g))
        out.append({"id": f"{prefix}{i}", "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


@pytest.mark.parametrize("trainable", ["all", "lora-like"])
def test_batched_gradients_equal_the_batch_size_1_loop(trainable):
    model = _lm(dropout=0.3)
    for n, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or "q_proj" in n or "v_proj" in n)
    ex = _examples(5)
    loop = ref.example_gradients(model, ex, "loop")
    assert loop.shape == (5, sum(p.numel() for _, p in ref.trainable_parameters(model)))
    torch.testing.assert_close(ref.example_gradients(model, ex, "vmap"), loop, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref.example_gradients(model, ex[2:3], "vmap")[0], loop[2], rtol=1e-4, atol=1e-6)
    # against a hand-written loss: mean CE over response tokens, shifted by one
    e = ex[0]
    ids = torch.tensor(e["input_ids"])[None]
    lab = torch.tensor(e["labels"])[1:]
    logits = model(input_ids=ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits[lab != -100], lab[lab != -100])
    g = torch.autograd.grad(loss, [p for _, p in ref.trainable_parameters(model)])
    torch.testing.assert_close(torch.cat([x.reshape(-1) for x in g]), loop[0], rtol=1e-4, atol=1e-7)


def _trainer_like_model():
    """A model whose trainable set mixes decay and no-decay params, so index order != named order."""
    model = _lm()
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1" in n or "norm" in n)
    return model


def _step(model, opt):
    ex = _examples(1, seed=9)[0]
    model(input_ids=torch.tensor(ex["input_ids"])[None], labels=torch.tensor(ex["labels"])[None]).loss.backward()
    opt.step()


def test_optimizer_state_from_all_three_sources(tmp_path):
    model = _trainer_like_model()
    opt = ref.trainer_optimizer(model, lr=1e-2, weight_decay=0.1)
    order, sizes = ref.trainer_param_order(model)
    named = [n for n, _ in ref.trainable_parameters(model)]
    assert sizes[0] > 0 and sizes[1] > 0 and order != named, "the test needs two groups out of named order"
    _step(model, opt)
    params = dict(model.named_parameters())
    expected_m = torch.cat([opt.state[params[n]]["exp_avg"].reshape(-1) for n in named])
    expected_v = torch.cat([opt.state[params[n]]["exp_avg_sq"].reshape(-1) for n in named])
    live = ref.adam_state(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    by_index = ref.adam_state(model, str(tmp_path / "optimizer.pt"))
    torch.save({"state": {"_fsdp_wrapped_module." + n: opt.state[params[n]] for n in named}, "param_groups": []},
               tmp_path / "optimizer.bin")
    by_name = ref.adam_state(model, str(tmp_path / "optimizer.bin"))
    for m, v in (live, by_index, by_name):
        assert torch.equal(m, expected_m) and torch.equal(v, expected_v)


def test_optimizer_state_errors_name_the_parameter(tmp_path):
    model = _trainer_like_model()
    opt = ref.trainer_optimizer(model, lr=1e-2)
    _step(model, opt)
    params = dict(model.named_parameters())
    named = [n for n, _ in ref.trainable_parameters(model)]
    state = {n: dict(opt.state[params[n]]) for n in named}
    missing = dict(state)
    del missing[named[1]]
    torch.save({"state": missing, "param_groups": []}, tmp_path / "a.bin")
    with pytest.raises(ValueError, match=named[1]):
        ref.adam_state(model, str(tmp_path / "a.bin"))
    state[named[0]]["exp_avg"] = torch.zeros(3)
    torch.save({"state": state, "param_groups": []}, tmp_path / "b.bin")
    with pytest.raises(ValueError, match=f"{named[0]}.*shape"):
        ref.adam_state(model, str(tmp_path / "b.bin"))
    sd = opt.state_dict()
    sd["param_groups"] = [sd["param_groups"][0]]  # a file from another grouping
    torch.save(sd, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="param_groups"):
        ref.adam_state(model, str(tmp_path / "optimizer.pt"))


def test_optimizer_file_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, tmp_path / "optimizer.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ref.adam_state(_lm(), str(tmp_path / "optimizer.pt"))


def _collect(model, ex, out, **kw):
    args = dict(grad_type="sgd", proj_dim=64, seed=1, checkpoint="ck1", chunk_size=4, batch_size=3, progress=False)
    args.update(kw)
    return ref.collect_features(model, ex, str(out), **args)


def test_ids_stay_with_their_rows_through_chunks_and_merge(tmp_path):
    model = _lm()
    ex = _examples(11)
    _collect(model, ex, tmp_path / "a")
    feats, ids, identity = ref.merge_features(str(tmp_path / "a"))
    assert ids == [e["id"] for e in ex] and identity["proj_dim"] == 64
    direct = ref.project(ref.example_gradients(model, ex, "loop"), 64, seed=1)
    torch.testing.assert_close(feats, direct / direct.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    assert ref.validate_features(str(tmp_path / "a" / "features.safetensors")) == 11
    # shuffled input: each id keeps its own row
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0)).tolist()
    _collect(model, [ex[i] for i in perm], tmp_path / "b")
    feats_b, ids_b, _ = ref.merge_features(str(tmp_path / "b"))
    assert ids_b == [ex[i]["id"] for i in perm]
    torch.testing.assert_close(feats_b, feats[perm], rtol=1e-4, atol=1e-6)


def test_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    model = _lm()
    ex = _examples(13)
    _collect(model, ex, tmp_path / "clean")
    clean = ref.merge_features(str(tmp_path / "clean"))
    real, calls = ref.example_gradients, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # the 5th batch: mid-way through the 3rd chunk
            raise KeyboardInterrupt("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(ref, "example_gradients", failing)
    with pytest.raises(KeyboardInterrupt):
        _collect(model, ex, tmp_path / "run")
    shard = tmp_path / "run" / "shard-000-of-001"
    assert sorted(os.listdir(shard)) == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    (shard / "chunk_000002.safetensors.tmp999").write_bytes(b"half a file")  # a torn write
    monkeypatch.setattr(ref, "example_gradients", real)
    calls.clear()
    monkeypatch.setattr(ref, "example_gradients", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _collect(model, ex, tmp_path / "run")
    assert len(calls) == 3, "finished chunks must not be recomputed (chunk 2: 2 batches, chunk 3: 1)"
    feats, ids, _ = ref.merge_features(str(tmp_path / "run"))
    assert ids == clean[1]
    torch.testing.assert_close(feats, clean[0])


def test_changed_configuration_is_refused(tmp_path):
    model = _lm()
    ex = _examples(5)
    _collect(model, ex, tmp_path / "a")
    for change in ({"proj_dim": 32}, {"seed": 2}, {"checkpoint": "ck2"}, {"grad_type": "sign"}):
        with pytest.raises(ValueError, match=list(change)[0]):
            _collect(model, ex, tmp_path / "a", **change)
    with pytest.raises(ValueError, match="data"):
        _collect(model, ex[:4] + _examples(1, seed=5, prefix="other"), tmp_path / "a")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(ValueError, match="model"):
        _collect(model, ex, tmp_path / "a")


def test_bad_examples_are_errors_naming_the_id(tmp_path):
    model = _lm()
    ex = _examples(4)
    ex[2]["labels"] = [-100] * len(ex[2]["labels"])
    with pytest.raises(ValueError, match="ex2"):
        _collect(model, ex, tmp_path / "a")
    ex = _examples(4)
    ex[3]["id"] = "ex1"
    with pytest.raises(ValueError, match="duplicate sample id 'ex1'"):
        _collect(model, ex, tmp_path / "b")
    ex = _examples(4)
    ex[1]["input_ids"][0] = 63
    for e in ex[:1] + ex[2:]:
        e["input_ids"] = [t % 63 for t in e["input_ids"]]
    with torch.no_grad():
        model.model.embed_tokens.weight[63] = float("nan")  # only example ex1 touches token 63
    with pytest.raises(ValueError, match="non-finite gradient for sample id 'ex1'"):
        _collect(model, ex, tmp_path / "c")


def test_match_refuses_incompatible_pairs(tmp_path):
    model = _lm()
    ex, val = _examples(6), _examples(2, seed=3, prefix="val")
    _collect(model, ex, tmp_path / "t")
    _collect(model, val, tmp_path / "v")
    _collect(model, val, tmp_path / "v2", seed=9)
    for d in ("t", "v", "v2"):
        ref.merge_features(str(tmp_path / d))
    scores, ids = ref.match([str(tmp_path / "t" / "features.safetensors")], [str(tmp_path / "v" / "features.safetensors")])
    assert ids == [e["id"] for e in ex] and scores.shape == (6,)
    with pytest.raises(ValueError, match="seed"):
        ref.match([str(tmp_path / "t" / "features.safetensors")], [str(tmp_path / "v2" / "features.safetensors")])


def test_checkpoint_weights_from_trainer_state(tmp_path):
    log = [{"epoch": 0.5, "learning_rate": 2.0}, {"epoch": 1.0, "learning_rate": 1.0}, {"epoch": 1.0, "loss": 3.0},
           {"epoch": 1.5, "learning_rate": 0.5}, {"epoch": 2.0, "learning_rate": 0.25}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    assert ref.checkpoint_weights_from_trainer_state(tmp_path / "trainer_state.json") == [1.5, 0.375]


def test_demo_selects_the_validation_task(tmp_path):
    """The pool is 10% 'copy' (the validation task); the top 5% (20 examples) must hold >= 10 copy examples.
    Seeds 0-3 gave 20, 14, 17, 15; random selection gives 2 on average and >= 10 with probability < 1e-5."""
    hit, n = ref.demo(str(tmp_path))
    assert n == 20 and hit >= 10, hit


# ============================================================================
# Part C: sharded collection, resume across ranks, dynamic selection (reference-only; gloo on CPU)


def _fake_rank(monkeypatch, rank, world):
    """Run one rank's share in this process: the shard files are exactly what that rank would write."""
    agree = ref._agree
    monkeypatch.setattr(ref, "_world", lambda: (rank, world))
    monkeypatch.setattr(ref, "_agree", lambda r, w, error: agree(0, 1, error))


def _sharded(tmp_path, monkeypatch, ex, world, name="s"):
    model = _lm()
    for rank in range(world):
        _fake_rank(monkeypatch, rank, world)
        _collect(model, ex, tmp_path / name, merge=False, chunk_size=2)
    monkeypatch.undo()
    return tmp_path / name


def test_shard_positions_pad_like_distributed_sampler():
    assert [ref.shard_positions(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    from torch.utils.data import DistributedSampler

    for n, world in ((7, 3), (10, 4), (5, 5), (3, 4)):
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)
            assert ref.shard_positions(n, r, world) == list(sampler)


def test_merge_restores_order_and_drops_padding(tmp_path, monkeypatch):
    ex = _examples(7)
    _collect(_lm(), ex, tmp_path / "single")
    single = ref.merge_features(str(tmp_path / "single"))
    for world in (2, 3):
        out = _sharded(tmp_path, monkeypatch, ex, world, f"w{world}")
        feats, ids, _ = ref.merge_features(str(out))
        assert ids == single[1]
        torch.testing.assert_close(feats, single[0], rtol=1e-4, atol=1e-6)


def test_merge_refuses_missing_rank_conflicts_and_foreign_chunks(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    ex = _examples(7)
    out = _sharded(tmp_path, monkeypatch, ex, 2)
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


def _dist_worker(rank, world, init_file, job, out_dir, n, result_file):
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model, ex = _lm(), _examples(n)
        if job == "collect-crash" and rank == 1:
            real = ref.example_gradients
            calls = []

            def dying(*a, **k):
                calls.append(1)
                if len(calls) == 3:  # chunk 0 (positions 1 3 5 7) took 2 batches: die in chunk 1
                    os._exit(3)  # the process dies: no cleanup, no exception handling
                return real(*a, **k)

            ref.example_gradients = dying
        if job.startswith("collect"):
            _collect(model, ex, out_dir)
        elif job == "select":
            opt = ref.trainer_optimizer(model, lr=1e-2)
            _step(model, opt)
            chosen = ref.select_step(model, opt, ex, _examples(3, seed=7, prefix="val"), n_select=4, proj_dim=64)
            with open(f"{result_file}.{rank}", "w") as f:
                json.dump(chosen.tolist(), f)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")


def _spawn(tmp_path, world, job, out_dir=None, n=9, tag=""):
    import torch.multiprocessing as mp

    init = tmp_path / f"init-{job}-{world}-{tag}"
    result = tmp_path / f"result-{job}-{world}"
    mp.spawn(_dist_worker, args=(world, str(init), job, str(out_dir), n, str(result)), nprocs=world, join=True)
    return result


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_style_collection_equals_single_process(tmp_path, world):
    ex = _examples(9)
    _collect(_lm(), ex, tmp_path / "single")
    single = ref.load_features(tmp_path / "single" / "features.safetensors")
    _spawn(tmp_path, world, "collect", tmp_path / "multi")
    feats, ids, identity = ref.load_features(tmp_path / "multi" / "features.safetensors")
    assert ids == single[1] and identity["world_size"] == world
    torch.testing.assert_close(feats, single[0], rtol=1e-4, atol=1e-6)


def test_dead_rank_then_resume_equals_clean_run(tmp_path):
    import torch.multiprocessing as mp

    ex = _examples(9)
    _collect(_lm(), ex, tmp_path / "single")
    single = ref.load_features(tmp_path / "single" / "features.safetensors")
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(tmp_path, 2, "collect-crash", tmp_path / "multi", tag="crash")
    assert not (tmp_path / "multi" / "features.safetensors").exists()
    assert len(os.listdir(tmp_path / "multi" / "shard-001-of-002")) == 1, "rank 1 died in its 2nd chunk"
    _spawn(tmp_path, 2, "collect", tmp_path / "multi", tag="resume")
    feats, ids, _ = ref.load_features(tmp_path / "multi" / "features.safetensors")
    assert ids == single[1]
    torch.testing.assert_close(feats, single[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="world_size"):  # another world size is another configuration
        _collect(_lm(), ex, tmp_path / "multi")


def test_flex_plan():
    assert ref.flex_plan(10, 5, 3) == ([10, 15, 20], 25)
    assert ref.flex_plan(0, 1, 1) == ([0], 1)
    for bad in ((-1, 5, 3), (10, 0, 3), (10, 5, 0), (1.5, 5, 3)):
        with pytest.raises(ValueError):
            ref.flex_plan(*bad)


def test_select_step_uses_the_live_optimizer_moments():
    model = _lm()
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1" in n)
    opt = ref.trainer_optimizer(model, lr=1e-2)
    _step(model, opt)
    pool, val = _examples(12), _examples(3, seed=7, prefix="val")
    chosen = ref.select_step(model, opt, pool, val, n_select=4, proj_dim=256)
    m, v = ref.adam_state(model, opt)
    g = ref.example_gradients(model, pool)
    expected = ref.influence_scores(ref.project(ref.adam_features(g, m, v), 256),
                                    ref.project(ref.example_gradients(model, val), 256))
    assert chosen.tolist() == ref.select_top(expected, k=4).tolist()
    before = ref.project(ref.adam_features(g, m, v), 256)
    for state in opt.state.values():  # other moments, same weights: other Adam features
        state["exp_avg_sq"].mul_(100.0)
    m2, v2 = ref.adam_state(model, opt)
    assert not torch.allclose(ref.project(ref.adam_features(g, m2, v2), 256), before)


def test_select_step_is_broadcast_so_ranks_agree(tmp_path):
    result = _spawn(tmp_path, 2, "select", n=9)
    picks = [json.load(open(f"{result}.{r}")) for r in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 4
    model = _lm()
    opt = ref.trainer_optimizer(model, lr=1e-2)
    _step(model, opt)
    single = ref.select_step(model, opt, _examples(9), _examples(3, seed=7, prefix="val"), n_select=4, proj_dim=64)
    assert picks[0] == single.tolist()
