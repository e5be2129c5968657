"""An independent LESS implementation of the gradient half, written from SPEC Part 1 (not from less_ref):
batch-size-1 autograd loop, Adam features, optimizer state from a live optimizer / Trainer optimizer.pt /
FSDP optimizer.bin, influence scores and top-k. No projection or storage (those tests skip).
    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl loop_less
"""
import torch
import torch.nn.functional as F


def adam_features(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=1e-8, eps_outside=False):
    g = grad.to(torch.float64)
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g.square()
    return (m / (v.sqrt() + eps) if eps_outside else m / (v + eps).sqrt()).float()


def gradient_features(grads, grad_type, adam_state=None, eps_outside=False):
    if grad_type == "adam":
        if adam_state is None:
            raise ValueError("adam features need (exp_avg, exp_avg_sq)")
        return adam_features(grads, *adam_state, eps_outside=eps_outside)
    if grad_type not in ("sgd", "sign"):
        raise ValueError(f"unknown grad_type {grad_type!r}")
    return grads.float() if grad_type == "sgd" else grads.float().sign()


def _check(ex, vocab):
    sid = ex.get("id")
    ids, lab = torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"])
    for name, t in (("input_ids", ids), ("labels", lab)):
        if t.dim() != 1:
            raise ValueError(f"example {sid!r}: {name} has shape {tuple(t.shape)}, not 1-D")
        if t.is_floating_point() and (t != t.round()).any():
            raise ValueError(f"example {sid!r}: {name} holds non-integers")
    ids, lab = ids.long(), lab.long()
    if ((ids < 0) | (ids >= vocab)).any() or ((lab != -100) & ((lab < 0) | (lab >= vocab))).any():
        raise ValueError(f"example {sid!r}: a token id or label outside [0, {vocab})")
    if (lab[1:] == -100).all():
        raise ValueError(f"example {sid!r}: no response token")
    return ids, lab


def example_gradients(model, examples):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().num_embeddings
    checked = [_check(ex, vocab) for ex in examples]
    mode = model.training
    model.eval()
    out = []
    try:
        for ids, lab in checked:
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            target = lab[1:]
            keep = target != -100
            loss = F.cross_entropy(logits[keep], target[keep])
            out.append(torch.cat([g.flatten().float() for g in torch.autograd.grad(loss, params)]))
    finally:
        model.train(mode)
    assert len(names) == len(params)
    return torch.stack(out)


def adam_state(model, source):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(source, torch.optim.Optimizer):
        states = [source.state[p] for _, p in named]
    else:
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{source}: cannot load as an optimizer state_dict: {e}") from None
        if not isinstance(sd, dict) or "state" not in sd:
            raise ValueError(f"{source}: no 'state' entry, not an optimizer state_dict")
        st = sd["state"]
        if st and all(isinstance(k, str) for k in st):
            states = []
            for n, _ in named:
                hits = [v for k, v in st.items() if k == n or k.endswith("." + n)]
                if len(hits) != 1:
                    raise ValueError(f"{source}: no unique state for parameter {n}")
                states.append(hits[0])
        else:
            from transformers import Trainer

            decay = set(Trainer.get_decay_parameter_names(None, model))
            order = [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]
            index = [i for g in sd["param_groups"] for i in g["params"]]
            by_name = dict(zip(order, (st.get(i) for i in index)))
            states = [by_name.get(n) for n, _ in named]
    ms, vs = [], []
    for (n, p), s in zip(named, states):
        if not s or "exp_avg" not in s or s["exp_avg"].shape != p.shape or s["exp_avg_sq"].shape != p.shape:
            raise ValueError(f"optimizer state for parameter {n} is missing or has the wrong shape")
        ms.append(s["exp_avg"].flatten().float())
        vs.append(s["exp_avg_sq"].flatten().float())
    return torch.cat(ms), torch.cat(vs)


def influence_scores(train, val, checkpoint_weights=None, n_subtasks=1):
    train = [train] if torch.is_tensor(train) else list(train)
    val = [val] if torch.is_tensor(val) else list(val)
    if not train or len(train) != len(val):
        raise ValueError("one train and one val tensor per checkpoint")
    if isinstance(n_subtasks, bool) or not isinstance(n_subtasks, int) or n_subtasks < 1:
        raise ValueError(f"bad n_subtasks {n_subtasks!r}")
    eta = torch.ones(len(train), dtype=torch.float64) if checkpoint_weights is None else \
        torch.tensor(checkpoint_weights, dtype=torch.float64)
    if len(eta) != len(train) or (eta < 0).any() or eta.sum() <= 0:
        raise ValueError("bad checkpoint weights")
    total = 0
    for e, t, v in zip(eta / eta.sum(), train, val):
        t, v = t.double(), v.double()
        if not len(t) or not len(v) or v.shape[0] % n_subtasks:
            raise ValueError("empty side or validation not divisible into subtasks")
        t, v = t / t.abs().amax(1, keepdim=True), v / v.abs().amax(1, keepdim=True)  # safe scale first
        nt, nv = t.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
        if not (torch.isfinite(nt).all() and torch.isfinite(nv).all()):
            raise ValueError("a zero or non-finite row")
        total = total + e * (t / nt) @ (v / nv).T
    return total.view(total.shape[0], n_subtasks, -1).mean(2).max(1).values.float()


def select_top(scores, fraction=None, k=None):
    if (fraction is None) == (k is None) or not torch.is_tensor(scores) or scores.dim() != 1 or scores.isnan().any():
        raise ValueError("1-D scores without NaN and exactly one of fraction / k")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError("fraction in (0, 1]")
        k = int(fraction * len(scores))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(scores):
        raise ValueError(f"bad k {k!r}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    return torch.tensor(order[:k], dtype=torch.long)
