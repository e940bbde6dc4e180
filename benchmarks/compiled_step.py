"""A compiled training step with crossent's loss against the same step with torch's loss.

    PYTHONPATH=src python benchmarks/compiled_step.py                 # both models
    PYTHONPATH=src python benchmarks/compiled_step.py --model small --repeats 9

Both variants are ``torch.compile``d (Inductor, full graph) and run interleaved after a
warm-up (compilation excluded); a sample is the mean of ``--inner`` steps (forward,
backward, SGD update) and the table gives the median and the min-max of ``--repeats``
samples, in ms per step, and the ratio torch / crossent (>1: crossent's step is faster).

Models: ``small``, a 2-layer GPT (d=64, V=128, 8 x 64 tokens), where the loss is a small
part of the step; ``lmhead``, an LM-head-heavy model (embedding, one 512-wide MLP block,
a 512 -> 32000 head; 1024 tokens), where the loss and its gradient are a large part.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as TF

import crossent
from crossent.bench.gpt import GPT


MODELS = {  # name: (GPT arguments, batch, tokens per sequence)
    "small": (dict(vocab=128, d=64, layers=2, heads=4, block=64), 8, 64),
    "lmhead": (dict(vocab=32000, d=512, layers=1, heads=8, block=256), 4, 256),
}
LOSSES = {"torch": TF.cross_entropy, "crossent": crossent.cross_entropy}


def _step_fn(name, loss_name):
    args, B, T = MODELS[name]
    torch.manual_seed(0)
    model = GPT(LOSSES[loss_name], **args)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    fwd = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args["vocab"], (B, T), generator=g)
    tgt = torch.randint(0, args["vocab"], (B, T), generator=g)

    def step():
        _, loss = fwd(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="all")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=0, help="steps per sample (0: per model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = list(MODELS) if a.model == "all" else [a.model]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step: median [min-max] "
        f"of {a.repeats} samples"
    )
    print("| model | torch loss | crossent loss | torch / crossent |")
    print("|---|---|---|---|")
    for name in names:
        inner = a.inner or (20 if name == "small" else 2)
        steps = {k: _step_fn(name, k) for k in LOSSES}
        for s in steps.values():  # compile and warm up
            for _ in range(3):
                s()
        samples = {k: [] for k in steps}
        order = list(steps)
        for r in range(a.repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                for _ in range(inner):
                    steps[k]()
                samples[k].append((time.perf_counter() - t0) / inner * 1e3)
        med = {k: statistics.median(v) for k, v in samples.items()}
        cell = {k: f"{med[k]:.2f} [{min(v):.2f}-{max(v):.2f}]" for k, v in samples.items()}
        print(f"| {name} | {cell['torch']} | {cell['crossent']} | {med['torch'] / med['crossent']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
