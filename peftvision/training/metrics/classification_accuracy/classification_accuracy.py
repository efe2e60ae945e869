"""Top-1, top-k and mean per-class accuracy as an `evaluate` module shipped with peftvision.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub; this module is loaded by path
(`peftvision.training.evaluate.load_metric`) so evaluation works offline. Predictions are each sample's top-k
class indices, best first, so one pass gives every accuracy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 and top-k accuracy, and accuracy averaged over classes (robust to class imbalance)."
_KWARGS = """
Args:
    predictions: for each sample, its top-k predicted class indices, best first.
    references: the true class index of each sample.
    num_classes: number of classes for the per-class mean (default: those seen in references).
Returns:
    top1, top{k} (k = length of the prediction lists, if > 1), mean_per_class_accuracy (all in [0, 1]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ClassificationAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        preds = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)  # (N, k)
        refs = np.asarray(references, dtype=np.int64)  # (N,)
        if len(refs) == 0:
            return {"top1": 0.0, "mean_per_class_accuracy": 0.0}
        hit1 = preds[:, 0] == refs
        result = {"top1": float(hit1.mean())}
        if preds.shape[1] > 1:
            result[f"top{preds.shape[1]}"] = float((preds == refs[:, None]).any(axis=1).mean())
        classes = range(num_classes) if num_classes else np.unique(refs)
        per_class = [hit1[refs == c].mean() for c in classes if (refs == c).any()]
        result["mean_per_class_accuracy"] = float(np.mean(per_class))
        return result
