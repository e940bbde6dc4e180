"""docs/lm-head.md's GRPO example, run from the page and compared with the unfused torch
version (full logits, log_softmax, gather, p * log p entropy); the docstring examples of
crossent.functional._lm_head."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import torch
import torch.nn.functional as TF

from _helpers import assert_close

DOC = Path(__file__).resolve().parents[2] / "docs" / "lm-head.md"


def _doc_namespace():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/lm-head.md: expected one python block (the GRPO example)"
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    return ns


def grpo_unfused(
    hidden, W, tokens, old_logprobs, advantages, mask, *, clip_eps=0.2, entropy_coef=0.01, temperature=1.0
):
    logits = TF.linear(hidden, W) / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages[:, None]
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = (-obj - entropy_coef * entropy) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def test_grpo_example_matches_the_unfused_version():
    grpo_loss = _doc_namespace()["grpo_loss"]
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 8, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False
    with torch.no_grad():  # the sampling policy: slightly different weights, so ratios leave [0.8, 1.2]
        old = torch.log_softmax(TF.linear(hidden, W * 1.3), -1).gather(-1, tokens[..., None]).squeeze(-1)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (hidden, W)]
    got = grpo_loss(params[0], params[1], tokens, old, advantages, mask, temperature=0.9, entropy_coef=0.05)
    got.backward()
    ref = [t.clone().requires_grad_() for t in (hidden, W)]
    want = grpo_unfused(ref[0], ref[1], tokens, old, advantages, mask, temperature=0.9, entropy_coef=0.05)
    want.backward()
    ratio = torch.exp(torch.log_softmax(TF.linear(hidden, W) / 0.9, -1).gather(-1, tokens[..., None])[..., 0] - old)
    assert ((ratio[mask] < 0.8) | (ratio[mask] > 1.2)).any()  # the clip is exercised
    assert_close(got, want)
    for p, r in zip(params, ref):
        assert_close(p.grad, r.grad)


def test_lm_head_docstring_examples():
    module = importlib.import_module("crossent.functional._lm_head")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
