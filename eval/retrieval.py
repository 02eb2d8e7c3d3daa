"""Image retrieval on frozen features (docs/METHOD.md#retrieval): mAP and Recall@k.

Every test image queries the train bank by cosine similarity; a bank item is relevant when
it has the query's class. AP of a query = mean over its relevant items of the precision at
that item's rank in the full ranking of the bank; mAP = mean AP over the queries that have at
least one relevant item (the others are counted, not scored). Recall@k = share of queries
with at least one relevant item among their k nearest (the usual retrieval "R@k").
Queries are ranked in chunks sized so one chunk's full ranking fits `max_chunk_elements`.
"""
import torch

from agmae.eval.knn import BANK_BLOCK, check_bank_labels, labels_tensor, normalised_rows
from agmae.errors import UserError

RECALL_AT = (1, 5)


def retrieval_metrics(train_feats, train_labels, test_feats, test_labels, recall_at=RECALL_AT, *,
                      max_chunk_elements: int = 1 << 24, bank_block: int = BANK_BLOCK) -> dict:
    """mAP and Recall@k in percent.

    train_feats: [N, D], test_feats: [M, D] (numpy/memmap/torch; need not be normalised),
    train_labels: [N], test_labels: [M] int. k above N means "anywhere in the bank".
    Returns {"mAP": .., "R@1": .., "R@5": .., "queries": M, "queries_without_relevant": n}.
    """
    bank_size, num_queries = len(train_feats), len(test_feats)
    if bank_size == 0 or num_queries == 0:
        raise UserError(f"retrieval needs a non-empty bank and query set, got {bank_size} and {num_queries}")
    check_bank_labels(train_labels, "retrieval")
    bank_labels, query_labels = labels_tensor(train_labels), labels_tensor(test_labels)
    chunk = max(1, max_chunk_elements // bank_size)
    ap_sum, scored = 0.0, 0
    recall_hits = {k: 0 for k in recall_at}
    ranks = torch.arange(1, bank_size + 1, dtype=torch.float64)
    with torch.inference_mode():
        for q_start in range(0, num_queries, chunk):
            queries = normalised_rows(test_feats, q_start, q_start + chunk)
            sims = torch.cat([queries @ normalised_rows(train_feats, b, b + bank_block).T
                              for b in range(0, bank_size, bank_block)], dim=1)
            order = sims.argsort(dim=1, descending=True, stable=True)
            relevant = bank_labels[order] == query_labels[q_start : q_start + len(queries), None]
            hits_so_far = relevant.cumsum(dim=1, dtype=torch.float64)
            num_relevant = hits_so_far[:, -1]
            has_relevant = num_relevant > 0
            precision_sum = (hits_so_far / ranks * relevant).sum(dim=1)
            ap_sum += (precision_sum[has_relevant] / num_relevant[has_relevant]).sum().item()
            scored += int(has_relevant.sum())
            for k in recall_at:
                recall_hits[k] += int(relevant[:, :k].any(dim=1).sum())
    results = {"mAP": 100.0 * ap_sum / scored if scored else float("nan")}
    results.update({f"R@{k}": 100.0 * hits / num_queries for k, hits in recall_hits.items()})
    results.update(queries=num_queries, queries_without_relevant=num_queries - scored)
    return results
