"""generate written from SPEC.md M4.1 alone, the simple way -- another cost profile, the same generations:
no KV cache (the whole prefix goes through the model at every step), position ids from the attention mask, the
filters in float64, and stop strings checked by decoding the whole generated row at every step (SPEC M4.3's window
is a policy promise, not correctness). It must pass the core tier.

    PYTHONPATH=examples/candidates python -m pytest test_minpp.py --minpp-impl whole_row_generate
"""
import torch

FILTERS = ("temperature", "top_k", "top_p", "min_p", "minpp")


def _keep(p, keep):
    p = torch.where(keep, p, 0.0)
    return p / p.sum(-1, keepdim=True)


def _sampling_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, minpp=None):
    """softmax(z / T), then top-k, top-p, min-p, MinP+, each renormalised (transformers' order), float64."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k is not None:
        p = _keep(p, p >= p.topk(min(top_k, p.shape[-1]), -1).values[..., -1:])
    if top_p is not None and top_p < 1:
        s = p.sort(-1, descending=True).values
        n_kept = (torch.cumsum(s, -1) - s < top_p).sum(-1, keepdim=True)
        p = _keep(p, p >= s.gather(-1, n_kept - 1))
    if min_p is not None:
        p = _keep(p, p >= min_p * p.amax(-1, keepdim=True))
    if minpp is not None:
        tau, w = (x.double().to(p.device) for x in minpp)
        c = ((tau <= (p / p.amax(-1, keepdim=True))[..., None]) * w).sum(-1)
        p = p * c / (p * c).sum(-1, keepdim=True)
    return p


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, *, do_sample=True, generator=None, attention_mask=None,
             eos_token_id=None, stop_strings=(), decode=None, **filters):
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown filters {sorted(unknown)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if mask.shape != input_ids.shape or not ((mask == 0) | (mask == 1)).all() or (mask.diff(dim=1) < 0).any() \
            or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding of input_ids' shape: 0s then 1s")
    eos = set() if eos_token_id is None else set(torch.as_tensor(eos_token_id).reshape(-1).tolist())
    stop_strings = list(stop_strings or [])  # transformers' None; a generator read once
    model.eval()
    ids, out, done = input_ids, [[] for _ in range(input_ids.shape[0])], [False] * input_ids.shape[0]
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        if do_sample:
            tok = torch.multinomial(_sampling_probs(logits, **filters), 1, generator=generator)[:, 0]
        else:
            tok = logits.argmax(-1)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                out[i].append(t)
                text = decode(out[i]) if stop_strings else ""  # the whole generated row, every step
                done[i] = t in eos or any(s in text for s in stop_strings)  # vLLM: contained, not only at the end
        if all(done):
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out
