"""Precision / recall / F1 per class and macro-averaged, as an `evaluate` module shipped with peftlab (offline)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = ("F1 = 2PR/(P+R) per class; macro average = unweighted mean over the classes that occur in the references or "
                "the predictions, as sklearn's f1_score(average='macro', zero_division=0): a class absent from both is "
                "not scored (an evaluation split without one of the classes is not marked down for it).")
_KWARGS = ("predictions, references: lists of int; num_classes: int (default: max label + 1); "
           "average: 'macro' -> {'f1'}, None -> per-class {'precision','recall','f1','support'} lists.")


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes=None, average="macro"):
        p, r = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        k = num_classes or int(max(p.max(initial=0), r.max(initial=0)) + 1)
        confusion = np.bincount(r * k + p, minlength=k * k).reshape(k, k)  # rows: reference, cols: prediction
        tp = np.diag(confusion).astype(float)
        predicted, support = confusion.sum(0), confusion.sum(1)
        precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
        if average == "macro":
            seen = (support > 0) | (predicted > 0)
            return {"f1": float(f1[seen].mean()) if seen.any() else 0.0}
        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                "support": support.tolist(), "confusion": confusion.tolist()}
