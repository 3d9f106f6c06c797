"""From image files to predictions with a compiled artifact: `imagepiece-predict` / scripts/predict.py.

One job per module: sources (what to predict) -> decode (file -> RGB) -> preprocess (resize/crop to
uint8, then normalise per batch) -> classifier (artifact -> top-k) -> pipeline (threads, batches,
order) or ray_job (Ray Data) -> writers (csv/jsonl/parquet, atomic, resumable). bench measures it.
"""
from .classifier import Classifier
from .pipeline import RunStats, predict_items
from .rows import Row
from .sources import InputItem, list_inputs

__all__ = ["Classifier", "InputItem", "Row", "RunStats", "list_inputs", "predict_items"]
