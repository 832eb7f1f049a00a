import numpy as np
import pytest
import torch

from sarvit.knn import knn_predict


def plain_knn(train, labels, queries, num_classes, k, T):
    """DINO's weighted vote, one query at a time with numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = []
    for q in queries:
        q = q / np.linalg.norm(q)
        sim = train @ q
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[labels[j]] += np.exp(sim[j] / T)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("k,T,chunk", [(1, 0.07, 256), (5, 0.07, 3), (20, 0.5, 7), (100, 0.07, 256)])
def test_knn_equals_a_plain_weighted_vote(k, T, chunk):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(60, 8)).astype(np.float64)
    labels = rng.integers(0, 4, size=60)
    queries = rng.normal(size=(25, 8))
    got = knn_predict(torch.tensor(train), torch.tensor(labels), torch.tensor(queries), 4, k=k, temperature=T,
                      chunk=chunk)
    want = plain_knn(train, labels, queries, 4, min(k, 60), T)
    assert got.tolist() == want.tolist()


def test_knn_weights_near_neighbours_more_than_many_far_ones():
    # one training point of class 1 right on the query, three of class 0 far from it: class 1 wins
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.1, 1.0], [0.1, 1.0]])
    labels = torch.tensor([1, 0, 0, 0])
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), 2, k=4).tolist() == [1]
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(train, labels, train, 2, k=0)
