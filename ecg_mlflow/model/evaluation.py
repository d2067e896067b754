"""Metrics, prediction tables and pictures of one evaluated split.

Precision, recall and F1 are macro averages over the four classes (the paper's notebooks
reported Keras' micro averages as if macro; we do not).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES

_EPS = 1e-7


def evaluate(split: str, true_labels: Sequence[str], probabilities: np.ndarray) -> dict[str, float]:
    """Every metric of the run schema for one split (`test` or `val`), by metric name."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    y_true = np.array([CLASSES.index(label) for label in true_labels])
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    metrics = {schema.split_metric(split, "accuracy"): float(accuracy_score(y_true, y_pred))}
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    metrics[schema.split_metric(split, "precision_macro")] = float(precision)
    metrics[schema.split_metric(split, "recall_macro")] = float(recall)
    metrics[schema.split_metric(split, "f1_macro")] = float(f1)
    present = np.unique(y_true)
    if len(present) == len(CLASSES):
        auc = roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=labels)
    else:  # AUC is undefined for a class that has no positive example
        auc = float("nan")
    metrics[schema.split_metric(split, "roc_auc_macro")] = float(auc)
    clipped = np.clip(probabilities[np.arange(len(y_true)), y_true], _EPS, 1.0)
    metrics[schema.split_metric(split, "loss")] = float(-np.log(clipped).mean())
    per_class = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for metric, values in zip(schema.PER_CLASS_METRICS, per_class[:3]):
        for cls, value in zip(CLASSES, values):
            metrics[schema.class_metric(split, metric, cls)] = float(value)
    return metrics


def predictions_frame(
    relpaths: Sequence[str], sha256s: Sequence[str], true_labels: Sequence[str], probabilities: np.ndarray
) -> pd.DataFrame:
    """test_predictions.csv: one row per image with its class probabilities."""
    frame = pd.DataFrame(
        {
            schema.COL_RELPATH: list(relpaths),
            schema.COL_SHA256: list(sha256s),
            schema.COL_TRUE: list(true_labels),
            schema.COL_PRED: [CLASSES[i] for i in probabilities.argmax(axis=1)],
        }
    )
    for index, column in enumerate(schema.PROB_COLUMNS):
        frame[column] = probabilities[:, index].astype(float)
    return frame


def confusion(true_labels: Sequence[str], predicted_labels: Sequence[str]) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true_labels, predicted_labels, labels=list(CLASSES))


def confusion_json(matrix: np.ndarray) -> str:
    return json.dumps({"classes": list(CLASSES), "rows": "true", "columns": "predicted",
                       "matrix": matrix.tolist()}, indent=2)


def plot_confusion(matrix: np.ndarray, title: str):
    """Counts and row percentages, so a class's recall can be read off its row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(matrix / totals, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            share = matrix[i, j] / totals[i, 0]
            ax.text(j, i, f"{matrix[i, j]}\n{share:.0%}", ha="center", va="center",
                    color="white" if share > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_curves(history, title: str):
    """Loss and accuracy per epoch, training and validation, best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.loss) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history.loss, label="train")
    left.plot(epochs, history.val_loss, label="validation")
    left.set_ylabel("categorical cross-entropy")
    right.plot(epochs, history.accuracy, label="train")
    right.plot(epochs, history.val_accuracy, label="validation")
    right.set_ylabel("accuracy")
    for ax in (left, right):
        ax.axvline(history.best_epoch, color="grey", linestyle="--", label=f"best epoch {history.best_epoch}")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
