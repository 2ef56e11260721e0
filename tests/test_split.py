from collections import Counter

import pytest

from steel_seg.data.split import split_counts, stratified_split


def _strata(n_per_stratum):
    items = {}
    for key, n in n_per_stratum.items():
        for i in range(n):
            items[f"{'-'.join(map(str, key))}_{i:04d}.jpg"] = frozenset(key)
    return items


STRATA = {(3,): 200, (1,): 40, (4,): 30, (1, 3): 20, (2,): 10, (3, 4): 3}


@pytest.mark.parametrize("n, expected", [(10, [7, 2, 1]), (7, [5, 1, 1]), (1, [1, 0, 0]), (0, [0, 0, 0])])
def test_split_counts_add_up(n, expected):
    assert split_counts(n, (0.7, 0.2, 0.1)) == expected


def test_each_stratum_keeps_the_ratios():
    items = _strata(STRATA)
    split = stratified_split(items, (0.7, 0.2, 0.1), seed=0)
    assert sorted(sum(split.values(), [])) == sorted(items)  # a partition
    for key, n in STRATA.items():
        counts = [sum(1 for i in split[s] if items[i] == frozenset(key)) for s in ("train", "val", "test")]
        assert counts == split_counts(n, (0.7, 0.2, 0.1)), key


def test_split_is_seeded_and_order_independent():
    items = _strata(STRATA)
    reversed_items = dict(reversed(list(items.items())))
    assert stratified_split(items, seed=5) == stratified_split(reversed_items, seed=5)
    assert stratified_split(items, seed=5) != stratified_split(items, seed=6)


def test_class_shares_are_similar_across_splits():
    items = _strata(STRATA)
    split = stratified_split(items, seed=1)
    share = {s: Counter(k for i in split[s] for k in items[i]) for s in split}
    for k in (1, 3, 4):
        t = share["train"][k] / len(split["train"])
        v = share["val"][k] / len(split["val"])
        assert abs(t - v) < 0.05, k
