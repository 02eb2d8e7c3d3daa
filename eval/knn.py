"""Weighted k-NN classification on frozen features (DINO protocol, docs/METHOD.md#knn).

Features are L2-normalised, each query takes the top-k cosine neighbours in the train bank,
each neighbour votes for its class with weight exp(s / T), and the class score is the sum of
the votes. Memory stays bounded for ImageNet-sized banks: queries are processed in chunks
and, for each chunk, the bank is streamed in blocks (converted to float32 and normalised one
block at a time) while a running top-k is kept, so a float16 or memory-mapped bank is never
copied whole. Peak extra memory ≈ one bank block in float32 + one [chunk, block] similarity
matrix + the running top-k of one chunk.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from agmae.errors import UserError

KS = (10, 20, 100, 200)
HEADLINE_K = 20
DEFAULT_T = 0.07
QUERY_CHUNK = 1024
BANK_BLOCK = 16384


def normalised_rows(features, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of features ([N, D] numpy/memmap/torch, any float dtype) as L2-normalised float32."""
    rows = features[start:stop]
    if not isinstance(rows, torch.Tensor):
        rows = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    return F.normalize(rows.to(torch.float32), dim=1)


def clamp_k(k: int, bank_size: int) -> int:
    """k larger than the bank is clamped to the bank size with a warning (every bank item then votes)."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    if bank_size < 1:
        raise UserError("the k-NN bank is empty: the train split has no images")
    if k > bank_size:
        warnings.warn(f"k={k} exceeds the bank size {bank_size}; using k={bank_size}", stacklevel=3)
        return bank_size
    return k


def check_bank_labels(labels, protocol: str = "k-NN") -> None:
    """Refuse a bank (or probe training set) whose labels hold fewer than two classes: every query would be
    right by construction."""
    classes = labels_tensor(labels).unique().tolist()
    if len(classes) < 2:
        raise UserError(f"{protocol} needs a bank of at least two classes, got {len(classes)} (labels {classes}); "
                        "with one class every query is right by construction: add images of other classes")


def nearest_neighbours(
    train_feats, test_feats, k: int, *, query_chunk: int = QUERY_CHUNK, bank_block: int = BANK_BLOCK,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every test feature in the bank.

    train_feats: [N, D], test_feats: [M, D] (numpy, memmap or torch; need not be normalised).
    k is clamped to N with a warning (see `clamp_k`).
    Returns (similarities [M, k] float32, sorted descending; indices [M, k] int64 into the bank).
    """
    bank_size, num_queries = len(train_feats), len(test_feats)
    k = clamp_k(k, bank_size)
    all_sims = torch.empty(num_queries, k)
    all_indices = torch.empty(num_queries, k, dtype=torch.long)
    blocks_per_chunk = -(-bank_size // bank_block)
    total = blocks_per_chunk * -(-num_queries // query_chunk)
    with torch.inference_mode(), tqdm(total=total, desc="k-NN", unit="block", disable=not progress) as bar:
        for q_start in range(0, num_queries, query_chunk):
            queries = normalised_rows(test_feats, q_start, q_start + query_chunk)
            best_sims = torch.full((len(queries), 0), -float("inf"))
            best_indices = torch.empty((len(queries), 0), dtype=torch.long)
            for b_start in range(0, bank_size, bank_block):
                sims = queries @ normalised_rows(train_feats, b_start, b_start + bank_block).T
                block_sims, block_indices = sims.topk(min(k, sims.shape[1]), dim=1)
                candidates = torch.cat([best_sims, block_sims], dim=1)
                candidate_indices = torch.cat([best_indices, block_indices + b_start], dim=1)
                best_sims, order = candidates.topk(min(k, candidates.shape[1]), dim=1)
                best_indices = candidate_indices.gather(1, order)
                bar.update()
            all_sims[q_start : q_start + len(queries)] = best_sims
            all_indices[q_start : q_start + len(queries)] = best_indices
    return all_sims, all_indices


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, T: float = DEFAULT_T):
    """Class scores [M, num_classes] from neighbours: sims, labels [M, k]; each votes exp(s / T)."""
    scores = torch.zeros(neighbour_sims.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, (neighbour_sims / T).exp())


def labels_tensor(labels) -> torch.Tensor:
    return labels.long() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels, dtype=np.int64))


def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = HEADLINE_K,
                T: float = DEFAULT_T, **chunking) -> torch.Tensor:
    """Weighted k-NN class scores.

    train_feats: [N, D], train_labels: [N] int, test_feats: [M, D] (need not be normalised).
    k > N is clamped to N with a warning. `chunking`: query_chunk, bank_block, progress.
    Returns scores: [M, num_classes] float32 (sum over the k neighbours of exp(cos / T) per class).
    """
    check_bank_labels(train_labels)
    sims, indices = nearest_neighbours(train_feats, test_feats, k, **chunking)
    return vote(sims, labels_tensor(train_labels)[indices], num_classes, T)


def topk_accuracy(scores: torch.Tensor, labels, ks=(1, 5)) -> dict:
    """Percent of rows whose label is among the top-k scores, for each k below the class count (top-5 of
    5 classes or fewer would be 100 % by construction, so it is not reported; top-1 always is).
    Counted exactly: 1238 of 2000 is 61.9, not float32's 61.900001764."""
    labels = labels_tensor(labels)
    kept = [k for k in ks if k == 1 or k < scores.shape[1]]
    ranked = scores.topk(min(max(kept), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / max(len(labels), 1) for k in kept}


def knn_correct(bank, queries, k: int = HEADLINE_K, T: float = DEFAULT_T) -> torch.Tensor:
    """bank, queries: FolderFeatures (agmae.eval.features) of the same classes. [M] bool: whether weighted
    k-NN ranks each query's own class first (its top-1 hits)."""
    scores = knn_predict(bank.feats, bank.index.labels, queries.feats, len(bank.index.classes), k=k, T=T)
    return scores.argmax(dim=1) == labels_tensor(queries.index.labels)


def paired_difference(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Two classifiers' per-query hits ([M] bool, the same queries) -> percent points: the accuracy
    difference first - second, the share of queries exactly one of them gets right, and the standard error
    of the difference over the choice of queries, sqrt((d - diff^2) / M) for paired proportions."""
    difference = (first.double() - second.double()).mean().item()
    disagreement = (first != second).double().mean().item()
    standard_error = ((disagreement - difference ** 2) / len(first)) ** 0.5
    return {"difference": 100 * difference, "disagreement": 100 * disagreement,
            "standard_error": 100 * standard_error}


def knn_evaluate(train_feats, train_labels, test_feats, test_labels, num_classes: int, ks=KS,
                 T: float = DEFAULT_T, **chunking) -> dict:
    """Top-1/top-5 (percent) for every k in ks, from one neighbour search for the largest k.

    Returns {"k=10": {"top1": .., "top5": .., "k_used": 10}, ...}; a k above the bank size is clamped (warning),
    so its key still names the k asked for and `k_used` the k used.
    """
    check_bank_labels(train_labels)
    sims, indices = nearest_neighbours(train_feats, test_feats, max(ks), **chunking)
    neighbour_labels = labels_tensor(train_labels)[indices]
    return {
        f"k={k}": {**topk_accuracy(vote(sims[:, :k], neighbour_labels[:, :k], num_classes, T), test_labels),
                   "k_used": min(k, sims.shape[1])}
        for k in ks
    }
