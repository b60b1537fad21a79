"""Classification metrics on gathered predictions, by scikit-learn.

`evaluate.load("f1")` would fetch the metric from the hub at run time, which
fails on compute nodes without internet; scikit-learn computes the same macro-F1.
"""

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score


def classification_metrics(preds, labels, class_names) -> dict:
    """Accuracy, macro-F1, per-class accuracy (recall) and confusion matrix over every sample once."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = list(range(len(class_names)))
    cm = confusion_matrix(labels, preds, labels=classes)
    support = cm.sum(axis=1)
    per_class = {name: (float(cm[i, i] / support[i]) if support[i] else None)
                 for i, name in enumerate(class_names)}
    return {
        # From the same matrix as the per-class numbers, so the two can never disagree.
        "acc": float(np.trace(cm) / max(1, cm.sum())),
        "f1_macro": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "num_samples": int(len(labels)),
    }
