"""Weighted k-nearest-neighbour classification of features (DINO's ``eval_knn``).

The monitor of self-supervised training: no label is used to train, only to score. For
L2-normalised features, each query votes with its ``k`` most cosine-similar training
features, neighbour ``j`` weighing ``exp(sim_j / T)``; the class with the largest total
wins (DINO: ``k = 20``, ``T = 0.07``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict"]


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """The predicted class of every query.

    Args:
        train: ``(N, D)`` training features; ``train_labels``: ``(N,)`` class ids.
        queries: ``(M, D)`` features to classify.
        num_classes: the number of classes.
        k: neighbours per query (at most ``N`` are used).
        temperature: ``T`` of the vote weights ``exp(sim / T)``.
        chunk: queries per matrix product (bounds the memory at ``chunk x N``).

    Returns:
        ``(M,)`` predicted class ids.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and the temperature > 0; got k={k}, temperature={temperature}")
    train = F.normalize(train.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim, idx = (queries[start:start + chunk] @ train.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())  # (m, num_classes)
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=queries.device)
