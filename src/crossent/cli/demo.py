"""``crossent demo``: placeholder until the bookkeeping issue lands; prints the tutorials' numbers."""

from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import torch

    import crossent

    logits = torch.tensor([0.2, -1.5, 3.0, 0.7])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    print(f"BCEWithLogitsLoss (tutorial printed 0.4147 / 0.4170): "
          f"{crossent.nn.BCEWithLogitsLoss()(logits, targets).item():.4f}")
    print(f"BCELoss on [0.8, 0.3, 0.6] (tutorial printed 0.3646): "
          f"{crossent.nn.BCELoss()(torch.tensor([0.8, 0.3, 0.6]), torch.tensor([1.0, 0.0, 1.0])).item():.4f}")
    probs = torch.sigmoid(torch.tensor([0.2, -1.0, 3.0, 0.5]))
    print(f"BCELoss on sigmoid([0.2, -1, 3, 0.5]) (tutorial printed 0.5031): "
          f"{crossent.nn.BCELoss()(probs, targets).item():.4f}")
    return 0
