"""LESS as the original code computes it, written from SPEC Part 1 (not from less_ref): a correct implementation
with none of this project's extra promises, which must pass the suite's core tier.

    PYTHONPATH=examples/candidates python -m pytest test_less.py --less-impl original_less

- gradients: batch size 1, `model(**batch).loss.backward()`, then p.grad of the trainable parameters in
  named_parameters() order (collect_grad_reps.py), in eval mode;
- Adam features: m_hat / sqrt(v_hat + eps), no bias correction, in float32;
- matching: rows normalised with plain float32 F.normalize (matching.py loads the normalised "all_orig.pt"),
  matmul, checkpoint weights renormalised to sum 1, mean within a subtask, max over subtasks;
- selection: torch.sort(descending=True), whose order among tied scores is whatever the sort gives;
- no input validation: a bad input gives whatever torch gives (the policy tier reports it).
No projection, optimizer files or storage (their tests are skipped).
"""
import torch
import torch.nn.functional as F


def adam_features(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=1e-8, eps_outside=False):
    g = grad.float()
    updated_avg = beta1 * exp_avg.float() + (1 - beta1) * g
    updated_avg_sq = beta2 * exp_avg_sq.float() + (1 - beta2) * g ** 2
    if eps_outside:
        return updated_avg / (torch.sqrt(updated_avg_sq) + eps)
    return updated_avg / torch.sqrt(updated_avg_sq + eps)


def gradient_features(grads, grad_type, adam_state=None, eps_outside=False):
    if grad_type == "adam":
        return adam_features(grads, *adam_state, eps_outside=eps_outside)
    return {"sgd": grads.float(), "sign": torch.sign(grads.float())}[grad_type]


def example_gradients(model, examples):
    model.eval()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    device = params[0].device
    rows = []
    for ex in examples:
        for p in params:
            p.grad = None
        batch = {"input_ids": torch.tensor([ex["input_ids"]], device=device),
                 "labels": torch.tensor([ex["labels"]], device=device)}
        model(**batch).loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).float())
    for p in params:
        p.grad = None
    return torch.stack(rows)


def influence_scores(train, val, checkpoint_weights=None, n_subtasks=1):
    train = [train] if torch.is_tensor(train) else list(train)
    val = [val] if torch.is_tensor(val) else list(val)
    weights = [1.0] * len(train) if checkpoint_weights is None else list(checkpoint_weights)
    if sum(weights) != 1:
        weights = [w / sum(weights) for w in weights]
    score = 0
    for w, t, v in zip(weights, train, val):
        score = score + w * torch.matmul(F.normalize(t.float(), dim=1), F.normalize(v.float(), dim=1).T)
    return score.reshape(score.shape[0], n_subtasks, -1).mean(-1).max(-1)[0]


def select_top(scores, fraction=None, k=None):
    if k is None:
        k = int(fraction * len(scores))
    return torch.sort(scores, descending=True).indices[:k]
