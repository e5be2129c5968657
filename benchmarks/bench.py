"""Benchmarks: each hot path of less_ref / minpp_ref against the baseline a user would otherwise pick,
in one process, as medians and ratios. Not part of CI's test run.

    python benchmarks/bench.py all [--smoke] [--device cuda] [--json results.json]
    python benchmarks/bench.py project | grads | loss | head | samplers | ...

project  : less_ref.project vs TRAK's BasicProjector (pip install traker; Rademacher, same D, proj_dim, rows,
           dtype; each at its best block size); on CUDA also vs a matmul with the matrix already materialised.
grads    : less_ref.example_gradients, batched (torch.func) vs the batch-size-1 loop, on a Llama from a config.
loss     : minpp_loss fwd+bwd vs F.cross_entropy fwd+bwd on the same logits; minpp_probs vs minpp_logits;
           peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS above the start, sampled).
head     : train_head, 300 Adam steps at N = 4096: one band_statistics pass + O(N K) steps vs minpp_loss on the
           (N, V) logits every step (the previous train_head); final weights compared.
samplers : apply_top_p / apply_top_k / apply_min_p vs transformers' TopP / TopK / MinP logits warpers.
sjlt     : project(kind="sjlt") vs the dense kind at D = 2^22, k = 8192, 16 rows; per-example projection time at
           a LoRA-sized D = 2^24 (dense, sjlt, TRAK BasicProjector).
jl       : JL quality of both kinds on real per-example gradients (a tiny Llama): |Px|^2 / |x|^2, pairwise
           cosine errors, and the top-5% LESS selection from projected vs exact (unprojected) features.
fingerprint : model_fingerprint (sha256 of every parameter) on a ~1e8-parameter Llama.
slices   : peak memory of the collection's feature step, whole gradient vs projected_features (row_offset slices).
rgen     : one (2048, 8192) block of R, made as project makes it, vs torch's normal_ and fill_ on the same block.
collect  : collect_features on a full-parameter 2-layer Llama (D = 590k), k = 8192, sgd: dense vs sjlt on 320
           records (2 chunks, one projection buffer) and on 48 records (R made once for them all).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import less_ref  # noqa: E402
import minpp_ref  # noqa: E402
from cli import less as less_cli  # noqa: E402

ROWS = []


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device, repeat=5, slow=2.0):
    """Median of `repeat` timed calls after one warm-up call; a warm-up slower than `slow` seconds is
    itself the measurement (warm-up effects are negligible there, and the script must stay < 10 min)."""
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    if first > slow:
        return first
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device):
    """Bytes above the starting level at the peak of fn(): CUDA allocator statistics, or sampled RSS on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base, peak, done = _rss(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    fn()
    done[0] = True
    t.join()
    return max(peak[0], _rss()) - base


def row(group, case, ours, baseline, what="time_s", note=""):
    r = {"group": group, "case": case, "metric": what, "ours": ours, "baseline": baseline,
         "ratio": ours / baseline if baseline else float("nan"), "note": note}
    ROWS.append(r)
    unit = "s" if what == "time_s" else ("MiB" if what == "peak_bytes" else "")
    scale = 2 ** 20 if what == "peak_bytes" else 1
    print(f"{group:9s} {case:48s} {what:10s} ours {ours / scale:10.4g}{unit}  baseline {baseline / scale:10.4g}{unit}  "
          f"ratio {r['ratio']:6.3f}  {note}", flush=True)


# ----------------------------------------------------------------------------


def bench_project(device, smoke):
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        BasicProjector = None
        print("project: traker is not installed (pip install --no-deps traker): BasicProjector rows skipped")
    if smoke:
        dims, ks, rows_list = [2 ** 12], [512], [1, 16]
    elif str(device).startswith("cuda"):
        dims, ks, rows_list = [2 ** 22, 2 ** 24], [8192, 4096], [1, 16, 32, 64]
    else:
        dims, ks, rows_list = [2 ** 16, 2 ** 18], [8192, 4096], [1, 16, 64]
    for D in dims:
        for k in ks:
            for n in rows_list:
                x = torch.randn(n, D, device=device)
                ours = median_time(lambda: less_ref.project(x, k, seed=0), device, repeat=3)
                if BasicProjector is not None:
                    best, best_bs = math.inf, None
                    # columns per generated block (one block = the whole matrix, cached: not streaming);
                    # 512 and 2048 were within 5% of each other at every CPU size, so CPU tries 2048 only
                    for bs in (512, 2048) if str(device).startswith("cuda") else (2048,):
                        if bs >= k:
                            continue
                        proj = BasicProjector(D, k, 0, ProjectionType.rademacher, torch.device(device), block_size=bs)
                        t = median_time(lambda: proj.project(x, model_id=0), device, repeat=3)
                        if t < best:
                            best, best_bs = t, bs
                        del proj
                    row("project", f"D=2^{int(math.log2(D))} k={k} rows={n}", ours, best,
                        note=f"vs BasicProjector(block_size={best_bs})")
                if str(device).startswith("cuda"):
                    Ds = min(D, (8 * 2 ** 30) // (4 * k))  # the materialised matrix on at most 8 GiB, scaled to D
                    R = torch.randint(0, 2, (Ds, k), device=device).float().mul_(2).sub_(1)
                    xs = x[:, :Ds].contiguous()
                    t = median_time(lambda: xs @ R, device) * D / Ds
                    row("project", f"D=2^{int(math.log2(D))} k={k} rows={n}", ours, t,
                        note=f"vs materialised matmul (timed on D={Ds}, scaled)")
                    del R


def bench_grads(device, smoke):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
        n_ex, L = 8, 16
    elif str(device).startswith("cuda"):
        cfg = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=12)  # ~135M parameters
        n_ex, L = 32, 128
    else:
        cfg = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                   num_attention_heads=8, num_key_value_heads=8)  # ~9.5M parameters
        n_ex, L = 16, 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **cfg)).to(device)
    g = torch.Generator().manual_seed(0)
    ex = []
    for i in range(n_ex):
        n = int(torch.randint(L // 2, L + 1, (1,), generator=g))
        ids = torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()
        ex.append({"id": i, "input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    nparams = sum(p.numel() for p in model.parameters())
    for subset in ("lora-like (q,v)", "full"):
        for n_, p in model.named_parameters():
            p.requires_grad_(subset == "full" or "q_proj" in n_ or "v_proj" in n_)
        D = sum(p.numel() for _, p in less_ref.trainable_parameters(model))
        for bs in (16,) if not smoke else (4,):
            batched = lambda: torch.cat([less_ref.example_gradients(model, ex[b:b + bs], vmap=True) for b in range(0, n_ex, bs)])
            loop = lambda: less_ref.example_gradients(model, ex, vmap=False)
            a, b = batched(), loop()
            err = ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()
            tb, tl = median_time(batched, device, repeat=3), median_time(loop, device, repeat=3)
            row("grads", f"{nparams / 1e6:.1f}M params, {subset}, D={D / 1e6:.2f}M, batch={bs}", tb, tl,
                note=f"vmap vs loop: {n_ex / tb:.1f} vs {n_ex / tl:.1f} examples/s; max rel. diff {err:.1e}")


GRIDS = {"K=32 log from 1e-3": dict(K=32, tau_min=1e-3), "seed grid: K=65 log from 1e-5": dict(K=65, tau_min=1e-5)}


def _loss_case(N, V, dtype, device, which, grid="K=32 log from 1e-3"):
    z = (torch.randn(N, V, device=device) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=device)
    tau = minpp_ref.threshold_grid(**GRIDS[grid]).to(device)
    w = (torch.rand(tau.numel(), generator=torch.Generator().manual_seed(0)) + 0.1).to(device).requires_grad_(True)

    def run():
        z.grad = w.grad = None  # as after optimizer.zero_grad(): no accumulation pass
        if which == "ours":
            minpp_ref.minpp_loss(z, t, tau, w).backward()
        else:
            F.cross_entropy(z.float(), t).backward()
    return run


def _fresh_peak(N, V, dtype_name, which, grid):
    """Peak RSS of one fwd+bwd above the inputs, in this (fresh) interpreter: no memory freed earlier to reuse."""
    return peak_memory(_loss_case(N, V, getattr(torch, dtype_name), "cpu", which, grid), "cpu")


def loss_peak(N, V, dtype, device, which, grid):
    if str(device).startswith("cuda"):
        return peak_memory(_loss_case(N, V, dtype, device, which, grid), device)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_fresh_peak, (N, V, str(dtype)[6:], which, grid))


def interleaved(fns, device, repeat=7):
    """Medians of fns timed in turn (a, b, a, b, ...) after a warm-up each: drift and memory state hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def bench_loss(device, smoke):
    shapes = [(64, 1000)] if smoke else [(1024, 32000), (4096, 32000), (1024, 128256), (4096, 128256)]
    for grid in GRIDS:
        tau, w0 = minpp_ref.threshold_grid(**GRIDS[grid]), torch.rand(GRIDS[grid]["K"], generator=torch.Generator().manual_seed(0)) + 0.1
        for N, V in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                if not smoke and N * V > 4096 * 32000 and dtype == torch.float32 and not str(device).startswith("cuda"):
                    continue  # 2 GiB of fp32 logits plus their gradient: skipped on the 24 GiB CPU machines
                if not smoke and grid != "K=32 log from 1e-3" and N * V < 4096 * 32000:
                    continue  # the seed grid: the shapes
                ours, base = _loss_case(N, V, dtype, device, "ours", grid), _loss_case(N, V, dtype, device, "ce", grid)
                case = f"{grid}: N={N} V={V} {str(dtype)[6:]}"
                t_ours, t_base = interleaved([ours, base], device, repeat=3 if N * V > 4096 * 32000 else 7)
                row("loss", case, t_ours, t_base, note="minpp_loss fwd+bwd (grad to logits and w) vs cross_entropy fwd+bwd, interleaved medians")
                del ours, base
                row("loss", case, loss_peak(N, V, dtype, device, "ours", grid), loss_peak(N, V, dtype, device, "ce", grid),
                    "peak_bytes", note="above the inputs, fresh process (CPU) / allocator peak (CUDA)")
                if not smoke and (N * V > 4096 * 32000 or grid != "K=32 log from 1e-3") and not str(device).startswith("cuda"):
                    continue  # forward-only comparison: the smaller shapes tell it (keeps the run < 10 min)
                z = (torch.randn(N, V, device=device) * 3).to(dtype)
                tau_d, w = tau.to(device), w0.to(device)
                with torch.no_grad():
                    p = torch.softmax(z.float(), -1)
                    row("loss", case, median_time(lambda: minpp_ref.minpp_probs(p, tau_d, w), device),
                        median_time(lambda z=z: minpp_ref.minpp_logits(z, tau_d, w), device),
                        note="minpp_probs vs minpp_logits (forward)")
                del z


def bench_samplers(device, smoke):
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    N, V = (8, 1000) if smoke else (64, 128256)
    z = torch.randn(N, V, device=device) * 3
    p = torch.softmax(z, -1)
    cases = [("top_p=0.9", lambda: minpp_ref.apply_top_p(p, 0.9), TopPLogitsWarper(0.9)),
             ("top_k=50", lambda: minpp_ref.apply_top_k(p, 50), TopKLogitsWarper(50)),
             ("min_p=0.1", lambda: minpp_ref.apply_min_p(p, 0.1), MinPLogitsWarper(0.1))]
    for name, ours, warper in cases:
        # the warper returns masked logits; a sampler then needs softmax: counted on its side too
        theirs = lambda: torch.softmax(warper(None, z), -1)
        row("samplers", f"{name} (N={N}, V={V})", median_time(ours, device, repeat=7),
            median_time(theirs, device, repeat=7), note="probs in, renormalised probs out vs warper + softmax")


def bench_sjlt(device, smoke):
    """sjlt vs dense at the issue's size; the dense kind is timed whole once (about 2 minutes on 2 CPU cores)."""
    D, k, n = (2 ** 14, 1024, 4) if smoke else (2 ** 22, 8192, 16)
    x = torch.randn(n, D, device=device)
    sj = median_time(lambda: less_ref.project(x, k, kind="sjlt"), device, repeat=3)
    dense = median_time(lambda: less_ref.project(x, k), device, repeat=1, slow=0)
    row("sjlt", f"D=2^{int(math.log2(D))} k={k} rows={n}", sj, dense, note="project(kind='sjlt', s=4) vs dense Rademacher")
    # per-example projection at a LoRA-sized gradient (SmolLM2-135M LoRA ~ 1.8e7): dense and TRAK on a slice, scaled
    D, k = (2 ** 16, 1024) if smoke else (2 ** 24, 8192)
    Ds = D if smoke else 2 ** 18
    x = torch.randn(1, D, device=device)
    sj = median_time(lambda: less_ref.project(x, k, kind="sjlt"), device, repeat=3)
    dense = median_time(lambda: less_ref.project(x[:, :Ds], k), device, repeat=3) * D / Ds
    row("sjlt", f"1 example, D=2^{int(math.log2(D))} k={k}", sj, dense,
        note=f"sjlt vs dense (dense timed on D=2^{int(math.log2(Ds))}, scaled linearly)")
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return
    proj = BasicProjector(Ds, k, 0, ProjectionType.rademacher, torch.device(device), block_size=2048)
    trak = median_time(lambda: proj.project(x[:, :Ds], model_id=0), device, repeat=3) * D / Ds
    row("sjlt", f"1 example, D=2^{int(math.log2(D))} k={k}", sj, trak,
        note=f"sjlt vs TRAK BasicProjector (timed on D=2^{int(math.log2(Ds))}, scaled linearly)")


def _gradients(smoke):
    """Per-example gradients of a tiny Llama on two synthetic task families (the LESS demo's data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(0)
    n = 40 if smoke else 400
    pool = less_cli._task_examples("copy", n // 10, g, 0) + less_cli._task_examples("reverse", n - n // 10, g, 0)
    val = less_cli._task_examples("copy", 8, g, 1000)
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "v_proj" in name)
    grads = lambda ex: torch.cat([less_ref.example_gradients(model, ex[b:b + 32]) for b in range(0, len(ex), 32)])
    return grads(pool), grads(val)


def bench_jl(device, smoke):
    train, val = _gradients(smoke)
    D = train.shape[1]
    exact = less_ref.influence_scores(train, val)
    n_top = max(1, int(0.05 * len(exact)))
    top = set(less_ref.select_top(exact, k=n_top).tolist())
    x = train[:100].double()
    n_x = x.shape[0]
    gram = x @ x.T / (x.norm(dim=1)[:, None] * x.norm(dim=1)[None])
    for k in (1024,) if smoke else (2048, 8192):
        for kind, s in (("rademacher", None), ("sjlt", 1), ("sjlt", 4)):
            kw = {} if s is None else {"kind": kind, "s": s}
            pt, pv = less_ref.project(train, k, **kw), less_ref.project(val, k, **kw)
            ratio = (pt[:n_x].double().norm(dim=1) / x.norm(dim=1)) ** 2
            px = pt[:n_x].double()
            pg = px @ px.T / (px.norm(dim=1)[:, None] * px.norm(dim=1)[None])
            off = ~torch.eye(n_x, dtype=torch.bool)
            chosen = set(less_ref.select_top(less_ref.influence_scores(pt, pv), k=n_top).tolist())
            name = kind if s is None else f"sjlt s={s}"
            r = {"group": "jl", "case": f"{name} k={k} D={D}", "norm_ratio_mean": ratio.mean().item(),
                 "norm_ratio_std": ratio.std().item(), "norm_ratio_max_dev": (ratio - 1).abs().max().item(),
                 "cosine_err_rms": (pg - gram)[off].pow(2).mean().sqrt().item(),
                 "cosine_err_max": (pg - gram)[off].abs().max().item(),
                 "top5_overlap_with_exact": len(chosen & top) / n_top, "n_top": n_top}
            ROWS.append(r)
            print(f"jl        {r['case']:40s} |Px|^2/|x|^2 {r['norm_ratio_mean']:.3f} +- {r['norm_ratio_std']:.3f} "
                  f"(max dev {r['norm_ratio_max_dev']:.3f}); cosine err rms {r['cosine_err_rms']:.4f} max "
                  f"{r['cosine_err_max']:.3f}; top-5% overlap with exact {r['top5_overlap_with_exact']:.2f}", flush=True)


def bench_fingerprint(device, smoke):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else \
        dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12)
    model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **cfg)).to(device)
    n = sum(p.numel() for p in model.parameters())
    t = median_time(lambda: less_ref.model_fingerprint(model), device, repeat=3)
    gb = n * 4 / 1e9
    row("fingerprint", f"{n / 1e6:.0f}M params fp32 ({gb:.2f} GB)", t, gb,
        what="s_vs_GB", note=f"sha256 of every parameter: {gb / t:.2f} GB/s; a 7B bf16 model (14 GB) ~ {14 / (gb / t):.0f} s")


def _features_peak(which, B, D):
    """Peak RSS above the inputs of Adam features + sjlt projection of (B, D) gradients, in a fresh process."""
    g, m, v = torch.randn(B, D), torch.randn(D) * 1e-3, torch.rand(D) * 1e-6
    if which == "whole":
        fn = lambda: less_ref.project(less_ref.gradient_features(g, "adam", (m, v)), 8192, kind="sjlt")  # noqa: E731
    else:
        fn = lambda: less_ref.projected_features(g, "adam", (m, v), less_ref.Projection(8192, kind="sjlt"))  # noqa: E731
    return peak_memory(fn, "cpu")


def bench_slices(device, smoke):
    """Collection's feature step: Adam features of the whole (B, D) gradient then project, vs projected_features
    (slices of 2^22 coordinates with row_offset)."""
    import multiprocessing as mp

    B, D = (2, 2 ** 16) if smoke else (8, 2 ** 24)
    with mp.get_context("spawn").Pool(1) as pool:
        sliced = pool.apply(_features_peak, ("sliced", B, D))
    with mp.get_context("spawn").Pool(1) as pool:
        whole = pool.apply(_features_peak, ("whole", B, D))
    row("slices", f"Adam features + sjlt, B={B}, D=2^{int(math.log2(D))}", sliced, whole, "peak_bytes",
        note="projected_features (row_offset slices) vs project(gradient_features(...)), fresh processes")


def bench_collect(device, smoke):
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
    n_ex, k = (8, 256) if smoke else (320, 8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=128, **cfg)).to(device)
    D = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ex = []
    for i in range(n_ex):
        n = int(torch.randint(32, 65, (1,), generator=g))
        ids = torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()
        ex.append({"id": f"r{i}", "input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})

    def run(kind, ex=ex):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = less_ref.collect_features(model, ex, tmp, "sgd", projection=less_ref.Projection(k, 0, kind))
            return (time.perf_counter() - t) / len(ex), less_ref.load_features(path)[0]
    sj, _ = run("sjlt")
    dense, _ = run("rademacher")
    row("collect", f"full-parameter Llama D={D / 1e6:.2f}M k={k} N={n_ex}, dense vs sjlt", dense, sj,
        "s_per_record", note=f"dense / sjlt = {dense / sj:.2f}; load {os.getloadavg()[0]:.1f}")
    # the floor of the dense kind: the (N, D) @ (D, k) product alone, one R block reused (no generation)
    x, block = torch.randn(n_ex, D), max(1, 2 ** 24 // k)
    R = torch.randn(block, k)
    out = torch.zeros(n_ex, k)
    t = time.perf_counter()
    for r0 in range(0, D, block):
        out.addmm_(x[:, r0:r0 + block], R[:min(block, D - r0)])
    gemm = (time.perf_counter() - t) / n_ex
    row("collect", f"full-parameter Llama D={D / 1e6:.2f}M k={k} N={n_ex}, dense - sjlt vs the GEMM alone", dense - sj,
        gemm, "s_per_record", note=f"GEMM {2 * D * k * n_ex / gemm / n_ex / 1e9:.0f} GFLOP/s")
    few = ex[:min(48, n_ex)]  # a small pool: R is made once for all of it, so its cost decides
    sj_few, _ = run("sjlt", ex=few)
    dense_few, _ = run("rademacher", ex=few)
    row("collect", f"full-parameter Llama D={D / 1e6:.2f}M k={k} N={len(few)}, dense vs sjlt", dense_few, sj_few,
        "s_per_record", note=f"dense / sjlt = {dense_few / sj_few:.2f}; load {os.getloadavg()[0]:.1f}")


def bench_head(device, smoke):
    """train_head's 300 Adam steps: minpp_loss on the (N, V) logits every step (the previous train_head) vs one
    band_statistics pass then O(N K) steps (band_loss); the seed's grid; final weights compared. At V = 128256 on
    a CPU the per-step baseline runs 30 steps (every step costs the same), scaled by 10."""
    tau = minpp_ref.threshold_grid(**GRIDS["seed grid: K=65 log from 1e-5"]).to(device)
    for N, V in [(64, 1000)] if smoke else [(4096, 32000), (4096, 128256)]:
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(N, V, generator=g) * 3).to(device)
        t = torch.randint(0, V, (N,), generator=g).to(device)
        base_steps = 30 if V > 32000 and not str(device).startswith("cuda") else 300

        def per_step(steps):
            head = minpp_ref.MinPPlusHead(tau=tau.cpu()).to(device)
            opt = torch.optim.Adam([head.theta], lr=0.1)
            for i in range(steps):
                loss = minpp_ref.minpp_loss(z, t, head.tau, head.w)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return head.w.detach()

        def with_stats(steps):
            head = minpp_ref.MinPPlusHead(tau=tau.cpu()).to(device)
            return minpp_ref.train_head(head, z, t, steps=steps, lr=0.1).w.detach()

        out, times = [], []
        for fn, steps in ((per_step, base_steps), (with_stats, 300)):
            sync(device)
            t0 = time.perf_counter()
            out.append(fn(steps))
            sync(device)
            times.append(time.perf_counter() - t0)
        w_old, w_new = out[0], out[1] if base_steps == 300 else with_stats(base_steps)
        diff = ((w_new - w_old).abs().max() / w_old.abs().max()).item()
        ce = interleaved([lambda: F.cross_entropy(z.detach().requires_grad_(True), t).backward()], device, 3)[0]
        row("head", f"N={N} V={V} fp32, K=65, train_head vs one cross_entropy fwd+bwd", times[1], ce,
            note=f"load {os.getloadavg()[0]:.1f}")
        row("head", f"N={N} V={V} fp32, K=65, 300 steps", times[1], times[0] * 300 / base_steps,
            note=f"train_head via band statistics vs minpp_loss per step{'' if base_steps == 300 else ' (30 steps timed, x10)'}; "
                 f"weights after {base_steps} steps: max |difference| / max w = {diff:.2e}")


def bench_rgen(device, smoke):
    """One block of R as project makes it -- (2048, 8192), 64 MiB, into the buffer project reuses -- vs torch's own RNG
    (normal_) and the memory-write floor (fill_) on a block of the same size, interleaved in one process."""
    n, k = (256, 512) if smoke else (2048, 8192)
    buf, blk = torch.empty(n, k, device=device), torch.empty(n, k, device=device)
    ours, normal, fill = interleaved([lambda: less_ref._rademacher_rows(0, 12345, n, k, device, buf),
                                      lambda: blk.normal_(), lambda: blk.fill_(1.0)], device, repeat=15)
    load = os.getloadavg()[0]
    row("rgen", f"R block ({n}, {k}) vs normal_", ours, normal, note=f"load {load:.1f}")
    row("rgen", f"R block ({n}, {k}) vs fill_", ours, fill, note=f"load {load:.1f}")
    x = torch.randn(16, n, device=device)
    gemm = interleaved([lambda: torch.mm(x, buf)], device, repeat=15)[0]
    row("rgen", f"R block ({n}, {k}) vs its product with 16 rows", ours, gemm, note=f"load {load:.1f}")


BENCHES = ("project", "grads", "loss", "head", "samplers", "sjlt", "jl", "fingerprint", "slices", "collect", "rgen")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", *BENCHES])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the rows and the machine description here")
    a = ap.parse_args()
    machine = {"torch": torch.__version__, "device": a.device, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None}
    print(json.dumps(machine))
    for name in BENCHES if a.what == "all" else (a.what,):
        globals()[f"bench_{name}"](a.device, a.smoke)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
