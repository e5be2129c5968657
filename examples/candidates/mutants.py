"""Does the suite catch realistic bugs? Each mutant is the reference with one bug a faster implementation could
plausibly have; the suite, run against it as a candidate, must fail (exit 1). Not part of CI (15-40 minutes on 2
cores).

    python examples/candidates/mutants.py            # all mutants
    python examples/candidates/mutants.py M3 M8      # some
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MUTANTS = {  # name: (module, what the bug is, old text, new text)
    "M1": ("less_ref", "example_gradients: padding labelled 0 instead of -100 (padding enters the loss)",
           "batch_first=True, padding_value=-100)",
           "batch_first=True, padding_value=0)"),
    "M2": ("less_ref", "adam_state: Trainer optimizer.pt indices mapped in named_parameters() order",
           "return {n: state.get(i) for n, i in zip(param_order, index)}",
           "return {n: state.get(i) for (n, _), i in zip(trainable_parameters(model), index)}"),
    "M3": ("less_ref", "project: row_offset ignored (every slice starts at row 0)",
           "_rademacher_rows(seed, row_offset + r0, nr, proj_dim, x.device, R[:nr])",
           "_rademacher_rows(seed, r0, nr, proj_dim, x.device, R[:nr])"),
    "M4": ("less_ref", "hash counter drops its high 32 bits (rows 2^32 / W apart collide)",
           "    h ^= counter >> 32\n", ""),
    "M5": ("less_ref", "example_gradients: the model is not put in eval mode (dropout changes features)",
           "    params = trainable_parameters(model)  # [(name, param)]: the gradient's layout\n    model.eval()\n",
           "    params = trainable_parameters(model)  # [(name, param)]: the gradient's layout\n"),
    "M6": ("less_ref", "model_fingerprint hashes trainable parameters only (a changed frozen base is resumed)",
           "return _sha(x for n, p in model.named_parameters()",
           "return _sha(x for n, p in trainable_parameters(model)"),
    "M7": ("less_ref", "sjlt without the 1/sqrt(s) scale",
           "return (out[0] if squeeze else out).div_(math.sqrt(s))",
           "return out[0] if squeeze else out"),
    "M8": ("minpp_ref", "minpp_loss backward: the -onehot(target) term of dL/dz is missing",
           "                g.scatter_add_(1, tc[:, None], -g_row[:, None])\n", "                pass\n"),
    "M9": ("minpp_ref", "minpp_loss backward: dL/dw off by one threshold",
           "torch.flip(torch.cumsum(torch.flip(g_prefix, [0]), 0), [0])[1:]",
           "torch.flip(torch.cumsum(torch.flip(g_prefix, [0]), 0), [0])[:-1]"),
    "M10": ("minpp_ref", "generate: position ids not derived from the attention mask (left padding shifts positions)",
            "res = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)",
            "res = model(input_ids=input_ids, attention_mask=mask, use_cache=True)\n    pos = mask.sum(1, keepdim=True) * 0 + input_ids.shape[1] - 1"),
    "M11": ("minpp_ref", "logits processor: log c not scaled by T (MinP+ weights raised to 1/T after temperature)",
            "torch.where(torch.isfinite(out), z + T * (out - z), out)", "out"),
    "M12": ("minpp_ref", "top-p keeps tokens while the mass before them is <= top_p (one token too many at ties)",
            "kept = (before < top_p).sum(-1, keepdim=True)", "kept = (before <= top_p).sum(-1, keepdim=True)"),
    # bugs in the functions the suite reaches since its core/policy split (issue 20)
    "M13": ("minpp_ref", "generate: sampling ignores the temperature",
            "check=False, **filters)", "check=False, **dict(filters, temperature=1.0))"),
    "M14": ("minpp_ref", "generate: a finished row keeps receiving tokens",
            "            if done[i]:\n                continue\n", "            if False:\n                continue\n"),
    "M15": ("less_ref", "encode_example: the prompt's tokens are labelled too",
            "labels = [-100] * n_prompt + ids[n_prompt:]", "labels = list(ids)"),
    "M16": ("less_ref", "encode_example: truncation keeps the last max_length tokens",
            "ids, labels = ids[:max_length], labels[:max_length]", "ids, labels = ids[-max_length:], labels[-max_length:]"),
    "M17": ("minpp_ref", "head file: w = softplus(theta) saved in place of theta",
            '"theta": self.theta.detach().contiguous()', '"theta": self.w.detach().contiguous()'),
    "M18": ("minpp_ref", "head file: load builds the default grid instead of the saved tau",
            'head = cls(tau=t["tau"])', 'head = cls(K=t["tau"].numel())'),
    "M19": ("minpp_ref", "logits processor: masked (-inf) scores clamped to a finite floor",
            "            z = scores.float()  # (B, V)\n", "            z = scores.float().clamp(min=-1e4)  # (B, V)\n"),
    "M20": ("minpp_ref", "loss fast path: a nearly even grid (within 0.1 of an integer bucket) taken for an even one",
            "abs().max() < 1e-4:", "abs().max() < 1e-1:"),
    "M21": ("minpp_ref", "loss fast path: the candidate margin on the wrong side (tokens just above tau_min dropped)",
            "return n0, z >= m + (log_tau[n0] - 1e-3)", "return n0, z >= m + (log_tau[n0] + 1e-3)"),
    "M22": ("less_ref", "data fingerprint without the labels (another label mask is resumed)",
            ', _as_long(e["labels"]).tolist()]\n', "]\n"),
    "M23": ("less_ref", "projection identity without sjlt's s (features of another s are mixed)",
            ', **({"sjlt_s": self.s} if self.kind == "sjlt" else {})}', "}"),
    "M24": ("less_ref", "match does not compare the model (features of two base models are scored together)",
            '"world_size", "optimizer"}', '"world_size", "optimizer", "model"}'),
    "M25": ("less_ref", "projected_features: every slice projected from row 0",
            "row_offset=a, check=False)", "row_offset=0, check=False)"),
    "M26": ("less_ref", "sjlt: every block k // s columns wide (the last columns of wider blocks never used)",
            "return start + (words >> 1) % ((t + 1) * proj_dim // s - start), (1 - 2",
            "return start + (words >> 1) % (proj_dim // s), (1 - 2"),
    "M27": ("minpp_ref", "band_statistics: the target's band counts thresholds < r_t (a target on a threshold misses it)",
            "torch.bucketize(d_t, log_tau, right=True), mass))", "torch.bucketize(d_t, log_tau), mass))"),
    "M28": ("minpp_ref", "band_statistics: the temperature ignored (the statistics of the T = 1 distribution)",
            "z, keep = logits[s:s + chunk_rows].float() / T,", "z, keep = logits[s:s + chunk_rows].float(),"),
    "M29": ("minpp_ref", "band_loss: an unweighted mean (row weights ignored)",
            "loss = (stats.weight * row).sum() / stats.weight.sum()", "loss = row.mean()"),
    "M30": ("minpp_ref", "band_statistics: the masses M_i summed over r_v > tau_i's band below (off by one band)",
            "mass = H.flip(1).cumsum(1).flip(1)[:, 1:] / Z[:, None]", "mass = H.flip(1).cumsum(1).flip(1)[:, :-1] / Z[:, None]"),
    # issue 30's blind spots and issue 25's integrity: each must fail the core tier
    "M31": ("minpp_ref", "band_statistics: rows of a pad id >= 0 scored (ignore_index taken as -100)",
            "_check_loss_args(logits, target, tau, None, ignore_index, chunk_rows)",
            "_check_loss_args(logits, target, tau, None, -100, chunk_rows)"),
    "M32": ("minpp_ref", "minpp_loss_plain: ignore_index taken as -100",
            "target, ignore_index=ignore_index)", "target, ignore_index=-100)"),
    "M33": ("minpp_ref", "train_head: trained at T = 1 whatever the temperature",
            "band_statistics(logits, target, head.tau, 1.0 if temperature is None else temperature)",
            "band_statistics(logits, target, head.tau)"),
    "M34": ("minpp_ref", "generate: a malformed attention mask accepted",
            "left_padding = ((m == 0) | (m == 1)).all() and", "left_padding = True or"),
    "M35": ("less_ref", "Projection: its s not passed on (the default s projects)",
            "args = x, self.proj_dim, self.seed, row_offset, self.kind, self.s",
            "args = x, self.proj_dim, self.seed, row_offset, self.kind"),
    "M36": ("less_ref", "model_fingerprint: the first 1024 entries of each tensor only",
            "{p.requires_grad};\".encode(), p))", "{p.requires_grad};\".encode(), p.reshape(-1)[:1024]))"),
    "M37": ("less_ref", "file checksum: the ids left out (a swapped id passes)",
            "    for k in sorted(tensors):\n        parts +=", "    for k in sorted(set(tensors) - {'ids'}):\n        parts +="),
    "M38": ("less_ref", "file checksum checked only when present (an edited file without one passes)",
            ("if checksum is None or meta.get(\"format\") != FILE_FORMAT:", "if checksum != _file_checksum(tensors, meta):"),
            ("if False:", "if checksum is not None and checksum != _file_checksum(tensors, meta):")),
    "M39": ("less_ref", "less_scores: weights loaded with strict=False, unchecked (another prefix loads nothing)",
            "            _check_weights(model, weights, i)\n", ""),
    "M40": ("less_ref", "collect: an optimizer state given with sgd is used (Adam features under grad_type sgd)",
            ("adam = adam_state(model, optimizer_state) if grad_type == \"adam\" else None",
             "x = gradient_features(grads[:, a:a + slice_cols], grad_type, part, eps_outside)"),
            ("adam = adam_state(model, optimizer_state) if optimizer_state is not None else None",
             "x = gradient_features(grads[:, a:a + slice_cols], \"adam\" if part else grad_type, part, eps_outside)")),
    # issue 35: the bug classes the suite missed
    "M41": ("minpp_ref", "next_token_probs: top-p before top-k",
            "((apply_top_k, top_k), (apply_top_p, top_p), (apply_min_p, min_p))",
            "((apply_top_p, top_p), (apply_top_k, top_k), (apply_min_p, min_p))"),
    "M42": ("minpp_ref", "next_token_probs: MinP+ before min-p",
            ("    for apply, x in ((apply_top_k, top_k), (apply_top_p, top_p), (apply_min_p, min_p)):",
             "    return p if minpp is None else minpp_probs(p, *minpp, check=check)"),
            ("    p = p if minpp is None else minpp_probs(p, *minpp, check=check)\n"
             "    for apply, x in ((apply_top_k, top_k), (apply_top_p, top_p), (apply_min_p, min_p)):",
             "    return p")),
    "M43": ("minpp_ref", "generate: MinP+ applied to the raw logits, before temperature",
            "tok = next_token(res.logits[:, -1], do_sample=do_sample, generator=generator, check=False, **filters)",
            "z = res.logits[:, -1] if filters.get('minpp') is None else minpp_logits(res.logits[:, -1], *filters['minpp'])\n"
            "        tok = next_token(z, do_sample=do_sample, generator=generator, check=False,\n"
            "                         **{k: v for k, v in filters.items() if k != 'minpp'})"),
    "M44": ("minpp_ref", "train_head: the regulariser's sign flipped (lam > 0 smooths)",
            "loss = _band_loss(stats, head.w) + lam * regulariser(head.w, reg)",
            "loss = _band_loss(stats, head.w) - lam * regulariser(head.w, reg)"),
    "M45": ("less_ref", "file checksum: the identity left out (an edited checkpoint name or model hash loads)",
            "parts = [json.dumps(meta, sort_keys=True).encode()]",
            "parts = [json.dumps({k: v for k, v in meta.items() if k != 'identity'}, sort_keys=True).encode()]"),
    "M46": ("less_ref", "match: checkpoint steps compared as strings (checkpoint-10 before checkpoint-9)",
            "if int(steps[i].group(1)) <= int(steps[i - 1].group(1)):", "if steps[i].group(1) <= steps[i - 1].group(1):"),
    "M47": ("less_ref", "match: a checkpoint given twice found by its name only (the same model under two names passes)",
            "((ident[\"model\"], ident[\"optimizer\"]), \"the same model and optimizer state\")", "((\"\",), \"\")"),
    "M48": ("minpp_ref", "train_head: BandStats of another grid or temperature accepted",
            ("        if temperature is not None and temperature != stats.temperature:",
             "        _check_stats(stats, head.tau)\n"),
            ("        if False:", "")),
    "M49": ("minpp_ref", "minpp_logits: weights clamped to 1 instead of divided by their max (scale matters)",
            "c = cumulative_weights(d, tau.to(z).log(), unit_weights(w).to(z))",
            "c = cumulative_weights(d, tau.to(z).log(), w.float().clamp(max=1.0).to(z))"),
    "M50": ("less_ref", "checkpoint weights: a log entry at epoch 1.0 counted in epoch 2",
            "by_epoch.setdefault(max(1, math.ceil(e[\"epoch\"] - 1e-9)), [])",
            "by_epoch.setdefault(int(e[\"epoch\"]) + 1, [])"),
    # issue 48: the oracle's blind spots (generation, checks a fast path skips, buffers and resumes, bands on any grid)
    "M51": ("minpp_ref", "generate: an eos id tested by truthiness (eos 0, GPT-2-style, never stops a row)",
            "if t in eos or any(", "if (t and t in eos) or any("),
    "M52": ("minpp_ref", "generate: MinP+ thresholds not checked once check=False goes down to next_token",
            "        check_thresholds(*filters[\"minpp\"])  # once per call", "        pass  # once per call"),
    "M53": ("minpp_ref", "generate: the stop-string window without its token of context",
            "window = max((len(s.encode(\"utf-8\")) + 1 for s", "window = max((len(s.encode(\"utf-8\")) for s"),
    "M54": ("minpp_ref", "generate: the stop-string window sized by the shortest stop string",
            "window = max((len(", "window = min((len("),
    "M55": ("less_ref", "collect: a new gradient buffer restarts with the batch that filled the last one",
            "            buf, since = [], None", "            buf, since = buf[-1:], None"),
    "M56": ("less_ref", "collect: missing chunks computed from one contiguous run of examples (seed 001's bug)",
            "_features(model, [examples[i] for c in todo for i in chunks[c]]",
            "_features(model, [examples[i] for i in (positions[todo[0] * chunk_size:] if todo else [])"
            "[:sum(len(chunks[c]) for c in todo)]]"),
    "M57": ("less_ref", "projected_features: the projection not checked (a path that skips project's check)",
            "    _check_projection_args(*projection, rows=(0, grads.shape[1]))  # once, not per slice\n", ""),
    "M58": ("minpp_ref", "band_statistics: normalised by the bands above the first threshold only",
            "Z = H.sum(1)  # (n,)", "Z = H[:, 1:].sum(1)  # (n,)"),
    "M59": ("less_ref", "gradient_features: a state at hand gives Adam features whatever the grad_type",
            "    if grad_type in (\"sgd\", \"sign\"):\n",
            "    if adam_state is not None:\n        return adam_features(grads, *adam_state)\n"
            "    if grad_type in (\"sgd\", \"sign\"):\n"),
    "M60": ("less_ref", "collect: a corrupt chunk kept on resume (the merge refuses it after all the work)",
            "if os.path.exists(path) and not _holds(path, identity, chunks[c]):", "if False:"),
    "M61": ("minpp_ref", "generate: a bool attention mask not checked",
            "    if attention_mask is not None:\n        m = attention_mask.long()",
            "    if attention_mask is not None and attention_mask.dtype != torch.bool:\n        m = attention_mask.long()"),
    "M62": ("minpp_ref", "generate: eos_token_id compared as one int (a list or tensor of eos ids never stops)",
            "if t in eos or any(", "if t == eos_token_id or any("),
    "M63": ("minpp_ref", "generate: a stop string must end the text (one completed inside a token is missed)",
            "any(s in tail for s in stop_strings)", "any(tail.endswith(s) for s in stop_strings)"),
    "M64": ("minpp_ref", "train_head / band_loss: BandStats row weights not checked (NaN trains theta to NaN)",
            "    if not (torch.isfinite(stats.weight).all() and (stats.weight >= 0).all() and stats.weight.sum() > 0):",
            "    if False:"),
    "M65": ("less_ref", "less_scores: the last checkpoint's weights left in the model",
            "        model.load_state_dict(saved, strict=False)\n", ""),
    "M66": ("minpp_ref", "generate: stop strings given as a generator consumed by the window's size",
            ("    stops = list(stops) if not isinstance(stops, str) and hasattr(stops, \"__iter__\") else stops",
             "    if not isinstance(stops, list) or not all("),
            ("    stops = stops", "    if isinstance(stops, str) or not all(")),
}


def run(name, tmp):
    module, what, olds, news = MUTANTS[name]
    src = open(os.path.join(ROOT, f"{module}.py")).read()
    for old, new in zip(*((olds, news) if isinstance(olds, tuple) else ((olds,), (news,)))):  # one or more edits
        assert src.count(old) == 1, f"{name}: the text to mutate is not in {module}.py once: {old!r}"
        src = src.replace(old, new)
    with open(os.path.join(tmp, f"mutant_{name}.py"), "w") as f:
        f.write(src)
    kind, test = ("less", "test_less.py") if module == "less_ref" else ("minpp", "test_minpp.py")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test,
                           f"--{kind}-impl", f"mutant_{name}"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=tmp))
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    status = "killed" if proc.returncode == 1 else f"SURVIVED (exit {proc.returncode})"
    print(f"{name:4s} {status:8s} {time.perf_counter() - t:5.1f}s  {what}\n      {failed[0][:150] if failed else ''}")
    return proc.returncode == 1


if __name__ == "__main__":
    names = sys.argv[1:] or list(MUTANTS)
    with tempfile.TemporaryDirectory() as tmp:
        killed = [run(n, tmp) for n in names]
    print(f"{sum(killed)} of {len(killed)} mutants killed")
    sys.exit(0 if all(killed) else 1)
