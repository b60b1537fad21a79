import numpy as np
import pytest
from sklearn.metrics import f1_score

from train.metrics import classification_metrics

NAMES = [f"c{i}" for i in range(5)]


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_plain_counting_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 333)
    preds = np.where(rng.random(333) < 0.6, labels, rng.integers(0, 4, 333))  # class 4 is rarely predicted
    m = classification_metrics(preds, labels, NAMES)
    assert m["acc"] == pytest.approx(np.mean(preds == labels))
    assert m["num_samples"] == 333
    for k, name in enumerate(NAMES):
        assert m["per_class_accuracy"][name] == pytest.approx(np.mean(preds[labels == k] == k))
    # Overall accuracy is the support-weighted mean of per-class accuracies (what "10.31 %" broke).
    support = np.bincount(labels, minlength=5)
    weighted = sum(m["per_class_accuracy"][n] * s for n, s in zip(NAMES, support)) / support.sum()
    assert m["acc"] == pytest.approx(weighted)
    expected_cm = np.zeros((5, 5), int)
    np.add.at(expected_cm, (labels, preds), 1)
    assert m["confusion_matrix"] == expected_cm.tolist()
    assert m["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))


def test_classes_without_predictions_or_samples():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 0, 0])  # classes 1, 2 never predicted; class 3 never present
    m = classification_metrics(preds, labels, ["a", "b", "c", "d"])
    assert m["acc"] == pytest.approx(0.4)
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.0, "d": None}
    # Per-class F1 by hand: a: p=2/5, r=1 -> 4/7; b, c: 0; d: 0 (absent, counted as 0 like sklearn's zero_division=0)
    assert m["f1_macro"] == pytest.approx((4 / 7) / 4)
    assert np.asarray(m["confusion_matrix"]).shape == (4, 4)


def test_one_class_for_nearly_every_image_is_flagged():
    from train.metrics import one_class

    names = ["cat", "dog", "frog"]
    dog_for_all = [[0, 30, 0], [0, 30, 0], [0, 30, 0]]  # the lab's smoke run, in small
    assert one_class(dog_for_all, names) == {"class": "dog", "predicted": 90, "images": 90, "share": 1.0}
    assert one_class([[3, 27, 0], [0, 30, 0], [0, 27, 3]], names)["share"] == pytest.approx(84 / 90)
    assert one_class([[8, 22, 0], [0, 30, 0], [0, 22, 8]], names) is None  # 74 of 90: below 90 %
    assert one_class([[95, 0, 0], [4, 1, 0], [1, 0, 0]], names) is None  # cat is 95 % of the images: right to say it
    assert one_class([[0, 0, 0]] * 3, names) is None  # no images
