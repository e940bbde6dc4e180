"""A small nanoGPT-style model compiled with Inductor (full graph) whose loss is crossent's.

Run as a script (the tests start it in fresh processes that share one Inductor cache
directory, so the second run exercises the warm cache). Prints one JSON line: the losses
of a few training steps compiled and eagerly, and the Inductor full-graph checks of the
individual losses (compiled vs eager, values and gradients).
"""

import functools
import json
import sys

import torch

import crossent
from crossent.bench.gpt import GPT


def train(compiled: bool, steps: int = 4):
    torch.manual_seed(0)
    model = GPT(functools.partial(crossent.cross_entropy, ignore_index=-1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 128, (4, 32), generator=g)
        tgt = torch.randint(0, 128, (4, 32), generator=g)
        tgt[:, -3:] = -1
        _, loss = fwd(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def loss_checks():
    """max |compiled - eager| over loss and gradients, per loss, Inductor full graph (all the
    losses in one compiled function)."""
    torch.manual_seed(0)
    z = torch.randn(12, 5, requires_grad=True)
    y = torch.randint(0, 5, (12,))
    s = torch.rand(12, 5)
    w, pw = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25]), torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    cases = {
        "ce": lambda z: crossent.cross_entropy(z, y),
        "ce_weight_smoothing": lambda z: crossent.cross_entropy(z, y, weight=w, label_smoothing=0.1),
        "ce_kdim": lambda z: crossent.cross_entropy(z.view(3, 4, 5).transpose(1, 2), y.view(3, 4)),
        "bce_logits_pos_weight": lambda z: crossent.binary_cross_entropy_with_logits(z, s, pos_weight=pw),
        "bce": lambda z: crossent.binary_cross_entropy(torch.sigmoid(z), s),
        "linear_ce": lambda z: crossent.linear_cross_entropy(z, torch.eye(5) * 2, y, label_smoothing=0.1),
    }
    names = list(cases)

    def all_losses(z):  # one graph holding every loss: one Inductor compile, not one per loss
        return tuple(cases[name](z) for name in names)

    compiled, eager = torch.compile(all_losses, fullgraph=True)(z), all_losses(z)
    out = {}
    for name, a, b in zip(names, compiled, eager):
        (ga,) = torch.autograd.grad(a, z, retain_graph=True)
        (gb,) = torch.autograd.grad(b, z, retain_graph=True)
        out[name] = max((a - b).abs().item(), (ga - gb).abs().max().item())
    return out


if __name__ == "__main__":
    result = {"compiled": train(True), "eager": train(False)}
    if "--checks" in sys.argv:
        result["checks"] = loss_checks()
    print(json.dumps(result))
