"""Small real data sets shipped inside the package (no network), for ``crossent demo`` and tests.
Design notes: ``docs/design.md``, section ``crossent.data``.
"""

from __future__ import annotations

import gzip
from importlib import resources
from typing import List, NamedTuple

import torch

__all__ = ["Dataset", "load_breast_cancer", "load_digits"]


class Dataset(NamedTuple):
    """A bundled data set: ``features`` (float32, (N, F)), ``target`` (int64, (N,)), names, source."""

    features: torch.Tensor
    target: torch.Tensor
    feature_names: List[str]
    target_names: List[str]
    source: str


def _read_gz_csv(name: str) -> str:
    data = resources.files(__name__).joinpath(name).read_bytes()
    return gzip.decompress(data).decode("ascii")


def _parse_csv(body: str) -> torch.Tensor:
    """Comma-separated numbers, one row per line, as a float64 (rows, columns) tensor.

    Python's ``float`` rounds each decimal correctly, as any CSV reader does, so no
    parser dependency is needed for two small files."""
    return torch.tensor(
        [[float(v) for v in line.split(",")] for line in body.splitlines() if line.strip()], dtype=torch.float64
    )


_BC_BASE = [
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
]


def load_breast_cancer() -> Dataset:
    """Breast Cancer Wisconsin (Diagnostic): 569 tumours, 30 features, **target 1 = malignant**.

    Features are the mean, standard error and worst value of ten measurements of cell nuclei
    (``mean radius`` ... ``worst fractal dimension``). Classes: 212 malignant, 357 benign.
    (scikit-learn codes malignant as 0; here the positive class, 1, is the malignant one.)
    """
    text = _read_gz_csv("breast_cancer.csv.gz")
    header, body = text.split("\n", 1)
    n, f = (int(v) for v in header.split(",")[:2])
    arr = _parse_csv(body)
    if tuple(arr.shape) != (n, f + 1):  # pragma: no cover - guards a corrupted install
        raise RuntimeError(
            f"load_breast_cancer: expected {n} rows of {f + 1} values, but got {arr.shape}. Reinstall crossent."
        )
    names = [f"mean {b}" for b in _BC_BASE] + [f"{b} error" for b in _BC_BASE] + [f"worst {b}" for b in _BC_BASE]
    malignant = 1 - arr[:, -1].to(torch.int64)  # file: 0 = malignant, 1 = benign
    return Dataset(
        arr[:, :-1].to(torch.float32),
        malignant,
        names,
        ["benign", "malignant"],
        "UCI ML Breast Cancer Wisconsin (Diagnostic), CC BY 4.0, doi:10.24432/C5DW2B",
    )


def load_digits() -> Dataset:
    """Handwritten digits: 1797 images of 8x8 pixel counts (0..16), classes 0..9."""
    arr = _parse_csv(_read_gz_csv("digits.csv.gz"))
    if tuple(arr.shape) != (1797, 65):  # pragma: no cover - guards a corrupted install
        raise RuntimeError(f"load_digits: expected 1797 rows of 65 values, but got {arr.shape}. Reinstall crossent.")
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return Dataset(
        arr[:, :-1].to(torch.float32),
        arr[:, -1].to(torch.int64),
        names,
        [str(d) for d in range(10)],
        "UCI ML Optical Recognition of Handwritten Digits (test set), CC BY 4.0, doi:10.24432/C50P49",
    )
