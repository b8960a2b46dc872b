"""An independent judge of digit samples: an RBF support-vector classifier (scikit-learn).

The judge is *not* a reward: no training signal ever comes from it. It answers one question —
does a sample still show the prompted digit? — and is a different model (SVC on raw pixels) from
the small torch classifier inside the rewards (:mod:`digits.rewards`).

It is fitted on a fixed, stratified 80 % split of ``load_digits`` (``random_state=0``); the held-out
20 % gives its own accuracy (``DigitsJudge().test_accuracy``, ≈0.99).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from .model import digits_data

__all__ = ["DigitsJudge"]


def _as_array(images: Tensor | np.ndarray) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != (8, 8):
        raise ValueError(f"images must have shape (N, 8, 8), got {arr.shape}")
    return arr.reshape(arr.shape[0], 64).astype(np.float64)


@functools.lru_cache(maxsize=1)
def _fit() -> tuple[object, float]:
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = digits_data()
    x = images.reshape(-1, 64).astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.2, stratify=labels, random_state=0)
    clf = SVC(C=10.0, gamma="scale").fit(x_tr, y_tr)
    return clf, float((clf.predict(x_te) == y_te).mean())


class DigitsJudge:
    """``predict(images (N, 8, 8) in [0, 1]) -> labels (N,)``; ``accuracy(images, labels) -> float``."""

    def __init__(self) -> None:
        self._clf, self.test_accuracy = _fit()

    def predict(self, images: Tensor | np.ndarray) -> np.ndarray:
        """The judge's digit for each image: int64 (N,)."""
        return self._clf.predict(_as_array(images)).astype(np.int64)

    def accuracy(self, images: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
        """Fraction of images the judge reads as their prompted digit ``labels`` (N,)."""
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        pred = self.predict(images)
        if y.shape != pred.shape:
            raise ValueError(f"labels must have shape {pred.shape}, got {y.shape}")
        return float((pred == y).mean())
