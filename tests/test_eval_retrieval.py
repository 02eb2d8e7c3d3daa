"""eval.retrieval on a case worked out by hand: unit vectors at known angles, so the rankings are fixed."""
import numpy as np
import pytest

from agmae.eval.retrieval import retrieval_metrics


def at_angles(degrees, length=1.0):
    radians = np.deg2rad(degrees)
    return length * np.stack([np.cos(radians), np.sin(radians)], axis=1)


BANK = at_angles([0, 30, 60, 90], length=2.0)  # lengths must not matter: cosine similarity
BANK_LABELS = [0, 1, 0, 1]
QUERIES = at_angles([10, 80, 50])
QUERY_LABELS = [0, 0, 1]
# Rankings by angular distance and their relevance:
#   10° (class 0): 0°, 30°, 60°, 90°  -> relevant 1,0,1,0 -> AP = (1/1 + 2/3) / 2 = 5/6, hit@1
#   80° (class 0): 90°, 60°, 30°, 0°  -> relevant 0,1,0,1 -> AP = (1/2 + 2/4) / 2 = 1/2
#   50° (class 1): 60°, 30°, 90°, 0°  -> relevant 0,1,1,0 -> AP = (1/2 + 2/3) / 2 = 7/12
EXPECTED_AP = [5 / 6, 1 / 2, 7 / 12]


@pytest.mark.parametrize("max_chunk_elements,bank_block", [(1 << 24, 16384), (4, 3), (1, 1)])
def test_retrieval_metrics_match_hand_computed_values(max_chunk_elements, bank_block):
    results = retrieval_metrics(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, recall_at=(1, 2, 5),
                                max_chunk_elements=max_chunk_elements, bank_block=bank_block)
    assert results["mAP"] == pytest.approx(100 * np.mean(EXPECTED_AP))
    assert results["R@1"] == pytest.approx(100 / 3)
    assert results["R@2"] == pytest.approx(100.0)
    assert results["R@5"] == pytest.approx(100.0)
    assert results["queries"] == 3 and results["queries_without_relevant"] == 0


def test_queries_without_relevant_items_are_counted_not_scored():
    results = retrieval_metrics(BANK, BANK_LABELS, at_angles([10, 45]), [0, 7])
    assert results["mAP"] == pytest.approx(100 * 5 / 6)
    assert results["R@1"] == pytest.approx(50.0)
    assert results["queries_without_relevant"] == 1


def test_empty_bank_is_rejected():
    with pytest.raises(ValueError, match="non-empty bank"):
        retrieval_metrics(np.zeros((0, 2)), [], QUERIES, QUERY_LABELS)
