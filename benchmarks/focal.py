"""Focal losses, forward + backward: crossent against torchvision's formula (eager and
``torch.compile``) and the softmax focal composition under ``torch.compile``.

    PYTHONPATH=src python benchmarks/focal.py                          # CPU, 2 threads
    PYTHONPATH=src python benchmarks/focal.py --device cuda --rows 8192 --classes 32000

Cases: sigmoid focal on ``--elements`` logits (default 16M, hard 0/1 targets, alpha=0.25,
gamma=2, 'mean'); softmax focal on ``--rows`` x ``--classes`` logits (class indices,
gamma=2, 'mean'). Every variant is warmed up (and compiled) first, then the variants run
interleaved, the order rotating each round; a sample is one forward + backward (CUDA:
synchronised), the table gives the median of ``--repeats`` samples and its p20-p80, in ms.
Ratio = variant time / crossent time (> 1: crossent is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as TF

import crossent


def torchvision_sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision.ops.sigmoid_focal_loss with reduction='mean', restated."""
    p = torch.sigmoid(inputs)
    ce_loss = TF.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).mean()


def softmax_focal_composition(x, y, gamma: float = 2.0):
    """The usual composition: (1 - p_y)^gamma * cross_entropy, mean over rows."""
    logp = torch.log_softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    return (-((1 - logp.exp()) ** gamma) * logp).mean()


def _time(fn, x, device):
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _bench(variants, x, device, repeats):
    for fn in variants.values():  # warm-up (and compilation)
        _time(fn, x, device)
        _time(fn, x, device)
    samples = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_time(variants[name], x, device))
    return samples


def _report(title, samples):
    ours = statistics.median(samples["crossent"])
    print(f"\n{title}")
    print(f"{'variant':34s} {'median ms':>10s} {'p20-p80 ms':>16s} {'ratio':>7s}")
    for name, s in samples.items():
        q = statistics.quantiles(s, n=5)
        med = statistics.median(s)
        print(f"{name:34s} {med:10.2f} {q[0]:7.2f}-{q[3]:<8.2f} {med / ours:7.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--elements", type=int, default=16 * 1024 * 1024)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip", choices=("sigmoid", "softmax"), action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU thread(s), float32, "
        f"forward + backward, median of {args.repeats}"
    )
    g = torch.Generator(device=device).manual_seed(0)
    if "sigmoid" not in args.skip:
        x = (torch.randn(args.elements, generator=g, device=device) * 3).requires_grad_()
        t = (torch.rand(args.elements, generator=g, device=device) > 0.9).float()
        compiled = torch.compile(torchvision_sigmoid_focal_loss)
        variants = {
            "crossent": lambda: crossent.sigmoid_focal_loss(x, t, reduction="mean", validate=False),
            "torchvision formula, eager": lambda: torchvision_sigmoid_focal_loss(x, t),
            "torchvision formula, torch.compile": lambda: compiled(x, t),
        }
        _report(f"sigmoid focal, {args.elements} elements", _bench(variants, x, device, args.repeats))
        del x, t
    if "softmax" not in args.skip:
        x = torch.randn(args.rows, args.classes, generator=g, device=device).requires_grad_()
        y = torch.randint(0, args.classes, (args.rows,), generator=g, device=device)
        compiled = torch.compile(softmax_focal_composition)
        variants = {
            "crossent": lambda: crossent.softmax_focal_loss(x, y, validate=False),
            "composition, eager": lambda: softmax_focal_composition(x, y),
            "composition, torch.compile": lambda: compiled(x, y),
        }
        _report(f"softmax focal, {args.rows} x {args.classes}", _bench(variants, x, device, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
