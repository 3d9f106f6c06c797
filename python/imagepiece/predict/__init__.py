"""From image files to predictions with a compiled artifact: `imagepiece-predict` / scripts/predict.py.

One job per module: sources (what to predict) -> decode (file -> RGB) -> preprocess (resize/crop to
uint8, then normalise per batch) -> classifier (artifact -> top-k) -> pipeline (threads, batches,
order) or ray_job (Ray Data) -> writers (csv/jsonl/parquet, atomic, resumable). bench measures it.
"""
from imagepiece.command_line import require_extra

# Before the imports that need them: a missing one is named with the extra that installs it (torchvision and timm's hub
# client bring both, so this is for an environment put together by hand).
require_extra("predict", ("PIL", "tqdm"), "imagepiece.predict")

from .classifier import Classifier  # noqa: E402
from .pipeline import RunStats, predict_items  # noqa: E402
from .rows import Row  # noqa: E402
from .sources import InputItem, list_inputs  # noqa: E402

__all__ = ["Classifier", "InputItem", "Row", "RunStats", "list_inputs", "predict_items"]
