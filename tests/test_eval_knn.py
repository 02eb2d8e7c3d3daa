"""eval.knn against a brute-force reference written with plain loops (DINO weighted k-NN)."""
import math

import numpy as np
import pytest
import torch

from agmae.eval.knn import knn_evaluate, knn_predict, nearest_neighbours, topk_accuracy


def brute_force_scores(train, train_labels, test, num_classes, k, T):
    scores = np.zeros((len(test), num_classes))
    for q, query in enumerate(test):
        sims = []
        for i, item in enumerate(train):
            cosine = float(np.dot(query, item) / (np.linalg.norm(query) * np.linalg.norm(item)))
            sims.append((cosine, i))
        sims.sort(reverse=True)
        for cosine, i in sims[:k]:
            scores[q, train_labels[i]] += math.exp(cosine / T)
    return scores


@pytest.fixture
def toy_features():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(57, 6)) * rng.uniform(0.5, 3.0, size=(57, 1))  # not normalised
    labels = rng.integers(0, 4, size=57)
    test = rng.normal(size=(13, 6))
    return train, labels, test


@pytest.mark.parametrize("query_chunk,bank_block", [(2048, 16384), (5, 7), (1, 57), (13, 1)])
def test_knn_predict_matches_brute_force(toy_features, query_chunk, bank_block):
    train, labels, test = toy_features
    expected = brute_force_scores(train, labels, test, 4, k=9, T=0.07)
    scores = knn_predict(torch.tensor(train), torch.tensor(labels), torch.tensor(test), 4, k=9, T=0.07,
                         query_chunk=query_chunk, bank_block=bank_block)
    assert scores.shape == (13, 4)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)


def test_float16_memmap_bank_gives_the_same_neighbours(toy_features, tmp_path):
    train, labels, test = toy_features
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float16, shape=train.shape)
    bank[:] = train
    sims, indices = nearest_neighbours(np.load(tmp_path / "bank.npy", mmap_mode="r"), test, 5, bank_block=8)
    ref_sims, ref_indices = nearest_neighbours(torch.tensor(bank, dtype=torch.float32), torch.tensor(test), 5)
    np.testing.assert_array_equal(indices.numpy(), ref_indices.numpy())
    np.testing.assert_allclose(sims.numpy(), ref_sims.numpy(), atol=1e-6)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])


def test_k_above_bank_size_is_clamped_with_a_warning(toy_features):
    train, labels, test = toy_features
    with pytest.warns(UserWarning, match="k=100 exceeds the bank size 57; using k=57"):
        scores = knn_predict(train, labels, test, 4, k=100, T=0.5)
    np.testing.assert_allclose(scores.numpy(), brute_force_scores(train, labels, test, 4, k=57, T=0.5), rtol=1e-4)


def test_knn_evaluate_slices_one_search_per_k(toy_features):
    train, labels, test = toy_features
    test_labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0])
    results = knn_evaluate(train, labels, test, test_labels, 4, ks=(3, 20), T=0.07, query_chunk=4, bank_block=10)
    for k in (3, 20):
        ranked = np.argsort(-brute_force_scores(train, labels, test, 4, k=k, T=0.07), axis=1)
        assert results[f"k={k}"]["top1"] == pytest.approx(100 * np.mean(ranked[:, 0] == test_labels))
        assert "top5" not in results[f"k={k}"]  # 4 classes: top-5 would be 100 % by construction


def test_identical_query_finds_itself():
    bank = torch.eye(5)
    scores = knn_predict(bank, torch.arange(5), bank * 3.0, 5, k=1)
    assert torch.equal(scores.argmax(dim=1), torch.arange(5))


def test_accuracy_is_counted_exactly_and_top5_needs_more_than_5_classes():
    scores = torch.zeros(2000, 10)
    labels = torch.zeros(2000, dtype=torch.long)
    scores[:1238, 0] = 1.0  # 1238 of 2000 rows rank the true class first
    scores[1238:, 1], scores[1238:, 0] = 1.0, 0.5  # the rest rank it second
    assert topk_accuracy(scores, labels, ks=(1, 5)) == {"top1": 61.9, "top5": 100.0}
    four = topk_accuracy(scores[:, :4], labels, ks=(1, 5))
    assert four == {"top1": 61.9}  # top-5 of 4 classes would be 100 % by construction
