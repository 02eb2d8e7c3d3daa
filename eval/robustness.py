"""Background robustness (ImageNet-9 style, docs/METHOD.md#robustness).

Accuracy of k-NN (bank = train split) and of a linear probe trained on the train split, on
each test split that shares the train split's classes (demo: original, mixed-rand, only-fg,
mixed-same when backgrounds are class-correlated). BG-gap = mixed-same − mixed-rand where
both exist. Clean-fg k-NN: bank = the training objects on black (`train-fg`), queries =
`only-fg`, which measures object information with no background on either side (only-fg
queries against a bank with backgrounds are degenerate: they vote for the darkest backgrounds).
"""
from agmae.eval.knn import DEFAULT_T, HEADLINE_K, knn_predict, topk_accuracy
from agmae.eval.linear import probe_accuracy
from agmae.errors import UserError

DEMO_SPLITS = ("original", "mixed-rand", "only-fg", "mixed-same")
CLEAN_FG_BANK, CLEAN_FG_QUERIES = "train-fg", "only-fg"
GAP_SPLITS = ("mixed-same", "mixed-rand")


def check_same_classes(reference, others: dict, protocol: str = "robustness") -> None:
    """reference, others: ImageFolderIndex; raise if any split's class names differ from the reference's,
    naming the classes one side lacks and the protocol that needs them to agree."""
    for name, split in others.items():
        if split.classes != reference.classes:
            mine, theirs = set(reference.classes), set(split.classes)
            raise UserError(
                f"split {name} ({split.root}) lacks the classes {sorted(mine - theirs)[:5]} and has "
                f"{sorted(theirs - mine)[:5]} that the train split {reference.root} lacks; {protocol} "
                "needs both splits to have the same class folders (an empty folder is not a class: give it "
                "an image or remove it from both)")


def check_classes(index, protocol: str) -> None:
    """index: ImageFolderIndex of a k-NN bank or a probe's training split. Refuse fewer than two classes, on which
    every query is right by construction (a one-class split scores 100 %)."""
    if len(index.classes) < 2:
        raise UserError(f"{index.root} has {len(index.classes)} class folder ({', '.join(index.classes)}); {protocol} "
                        "needs at least two, since with one every query is right by construction: add the other "
                        "classes' folders (ROOT/<split>/<class>/<image>)")


def knn_top1(bank, queries, num_classes: int, k: int, T: float) -> float:
    """bank, queries: FolderFeatures; top-1 percent of weighted k-NN."""
    scores = knn_predict(bank.feats, bank.index.labels, queries.feats, num_classes, k=k, T=T)
    return topk_accuracy(scores, queries.index.labels, ks=(1,))["top1"]


def robustness_results(train, splits: dict, *, probe=None, clean_fg_bank=None, k: int = HEADLINE_K,
                       T: float = DEFAULT_T) -> dict:
    """Per-split accuracies, BG-gap and clean-fg k-NN.

    train: FolderFeatures of the bank/probe training split; splits: {name: FolderFeatures};
    probe: a trained linear probe (None skips the linear column); clean_fg_bank: FolderFeatures
    of `train-fg` (None, or no `only-fg` split, skips clean-fg).
    Returns {"splits": {name: {"knn_top1", "linear_top1"}}, "bg_gap": {...} (only with
    mixed-same and mixed-rand), "clean_fg_knn_top1": float (only with train-fg and only-fg)}.
    """
    check_classes(train.index, "robustness")
    check_same_classes(train.index, {name: split.index for name, split in splits.items()})
    num_classes = len(train.index.classes)
    per_split = {}
    for name, split in splits.items():
        row = {"knn_top1": knn_top1(train, split, num_classes, k, T)}
        if probe is not None:
            row["linear_top1"] = probe_accuracy(probe, split.feats, split.index.labels)["top1"]
        per_split[name] = row
    results = {"splits": per_split}
    if all(name in per_split for name in GAP_SPLITS):
        same, rand = (per_split[name] for name in GAP_SPLITS)
        results["bg_gap"] = {column: same[column] - rand[column] for column in same}
    if clean_fg_bank is not None and CLEAN_FG_QUERIES in splits:
        check_same_classes(train.index, {CLEAN_FG_BANK: clean_fg_bank.index})
        results["clean_fg_knn_top1"] = knn_top1(clean_fg_bank, splits[CLEAN_FG_QUERIES], num_classes, k, T)
    return results
