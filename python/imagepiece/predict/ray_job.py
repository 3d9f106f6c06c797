"""Scale-out on Ray Data: paths -> decode/resize on CPU tasks -> an actor pool of Runtimes -> Parquet.

    paths (driver) --from_items--> map_batches(decode_batch, num_cpus=1)        uint8 [n, H, W, 3] + error
                   --map_batches(PredictActor, ActorPoolStrategy(size=N))      one ip_runtime.Runtime per actor,
                                                                                num_gpus=1 each for a CUDA artifact
                   --write_parquet--> <output>/*.parquet                        same columns as predict's .parquet

CUDA artifact: decoding runs in CPU tasks anywhere in the cluster and only uint8 pixels reach the
GPU actors. CPU artifact: both stages ask for one CPU and nothing else, so Ray Data fuses them and
each actor decodes its own batches: on CPUs that is the better plan (no pixels through the object
store, every core busy with one single-threaded model each). `--concurrency` defaults to one actor
per GPU (CUDA) or per CPU (CPU) of the cluster.

Output is a folder of Parquet files (Ray writes one file per block, in parallel, from the workers;
funnelling billions of rows through the driver into one file would undo the scale-out). Any Parquet
reader takes the folder as one table (`pyarrow.parquet.read_table(folder)`, `pandas.read_parquet`,
Spark). The files are written into a hidden folder inside the output and moved in only when the job
succeeded; earlier files are then removed (fresh run) or kept (`--resume`, which skips paths that
already have a prediction and replaces the rows of paths that had an error). Row order is not
preserved. Every node needs this package installed (the actors import imagepiece and ip_runtime) and
must see the image files, the artifact and --labels at the same paths (a shared file system): they
travel by path, not through the object store.

Without --address a local Ray is started for the run (all cores, a small object store, no
dashboard, worker logs kept off the terminal) and stopped after; with one, the job joins that
cluster ("auto" finds a running local one).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from .classifier import Classifier, choose_batch
from .labels import class_names
from .pipeline import ImagePreparer, RunStats
from .preprocess import Preprocess
from .rows import Row, prediction_rows
from .sources import InputItem
from .writers import rows_from_arrow, rows_to_arrow

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
DECODE_BATCH = 16  # images per decode task: small enough to spread over workers, big enough to amortise a task


@functools.lru_cache(maxsize=4)
def _preparer(preprocessing_json: str, input_shape: tuple, max_pixels: int) -> ImagePreparer:
    return ImagePreparer(Preprocess(json.loads(preprocessing_json), input_shape), max_pixels)


def decode_batch(batch: Dict[str, np.ndarray], preprocessing_json: str, input_shape: tuple,
                 max_pixels: int) -> Dict[str, np.ndarray]:
    """Ray task: locations -> uint8 pixels (zeros where the file failed) and error messages."""
    prepare = _preparer(preprocessing_json, tuple(input_shape), max_pixels)
    height, width = input_shape[1:]
    pixels = np.zeros((len(batch["location"]), height, width, 3), np.uint8)
    errors = []
    for index, location in enumerate(batch["location"]):
        image, error, _ = prepare(str(location))
        if image is not None:
            pixels[index] = image
        errors.append(error)
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class PredictActor:
    """Ray actor: holds one Runtime; decoded batch -> output rows as an Arrow table."""

    def __init__(self, artifact: str, topk: int, batch: Optional[int], labels_file: Optional[str], cpus: int,
                 device: str = "") -> None:
        import torch

        torch.set_num_threads(max(1, cpus))
        self.classifier = Classifier(artifact, topk=topk, batch=batch, device=device)
        self.names = class_names(self.classifier.num_classes, labels_file)

    def __call__(self, batch: Dict[str, np.ndarray]):
        paths, errors = [str(p) for p in batch["path"]], [str(e) for e in batch["error"]]
        ok = np.array([not error for error in errors], dtype=bool)
        classes, probs = self.classifier.classify(np.ascontiguousarray(batch["pixels"][ok]))
        predicted = iter(prediction_rows([p for p, good in zip(paths, ok) if good], classes, probs, self.names))
        rows = [next(predicted) if good else Row(path, error=error) for path, error, good in zip(paths, errors, ok)]
        return rows_to_arrow(rows)


def _parquet_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.parquet") if p.is_file()) if folder.is_dir() else []


def _earlier_rows(folder: Path) -> List[Row]:
    import pyarrow.parquet as pq

    rows = []
    for file in _parquet_files(folder):
        try:
            rows += rows_from_arrow(pq.read_table(file))
        except Exception as error:
            raise ValueError(f"cannot resume: {str(file)!r} is not a readable predict output ({type(error).__name__}: {error})") from None
    return rows


def resume_plan(earlier: List[Row], items: List[InputItem]) -> Tuple[List[InputItem], Set[str]]:
    """(items still to do, paths whose earlier error rows the new run replaces).

    Only error rows of paths that are listed again are replaced: an earlier error row for a path no
    longer in the input stays, as in the single-process path (its merge keeps unlisted rows).
    """
    done = {row.path for row in earlier if row.ok}
    todo = [item for item in items if item.path not in done]
    retried = {row.path for row in earlier if not row.ok} & {item.path for item in todo}
    return todo, retried


def _drop_rows(files: List[Path], paths: Set[str]) -> None:
    """Remove the rows of `paths` from earlier files (their retried rows are in the new files)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for file in files:
        table = pq.read_table(file)
        keep = pc.invert(pc.is_in(table["path"], value_set=pa.array(sorted(paths), pa.string())))
        if not pc.all(keep).as_py():
            staged = file.with_name(f".{file.name}.tmp")
            pq.write_table(table.filter(keep), staged)
            os.replace(staged, file)


def _start_ray(address: Optional[str]) -> bool:
    """Join `address` or start a local Ray, unless this process already has one; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    return True


def _set_ray_data_output(progress: bool) -> None:
    """What Ray Data prints on the terminal: progress bars if asked for, warnings and errors; its INFO
    lines (every execution plan) stay in its log file."""
    # Its handlers exist once ray.data is imported: quieting before that would find none.
    import ray.data
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:
        # --no-progress was asked for: spend Ray's one-time warning that says how to turn them back on.
        log_once("ray_data_progress_manager_disabled")


def default_concurrency(cuda: bool) -> int:
    import ray

    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU" if cuda else "CPU", 1)))


def run_on_ray(args, items: List[InputItem]) -> RunStats:
    """Predict `items` on Ray into the folder `args.output`; same row contents as the single-process path."""
    import pyarrow.parquet as pq
    import ray

    from imagepiece.artifact import read_metadata

    output = Path(args.output)
    metadata = read_metadata(args.artifact)
    earlier = _earlier_rows(output) if args.resume else []
    todo, retried = resume_plan(earlier, items)
    stats = RunStats(skipped=len(items) - len(todo), decode_seconds=None, inference_seconds=None)
    old_files = _parquet_files(output)
    output.mkdir(exist_ok=True)
    staging = output / f".staging-{uuid.uuid4().hex[:8]}"
    started = _start_ray(args.address)
    try:
        _set_ray_data_output(progress=not args.no_progress)
        cuda = (args.device or metadata["device_type"]).startswith("cuda")
        concurrency = args.concurrency or default_concurrency(cuda)
        began = time.perf_counter()
        if todo:
            blocks = max(1, min(len(todo) // DECODE_BATCH, 1000))
            concurrency = min(concurrency, blocks)  # more actors than blocks would only idle
            dataset = ray.data.from_items([{"path": i.path, "location": i.location} for i in todo], override_num_blocks=blocks)
            dataset = dataset.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=1,
                                          fn_kwargs={"preprocessing_json": json.dumps(metadata["preprocessing"]),
                                                     "input_shape": tuple(metadata["input_shape"]),
                                                     "max_pixels": args.max_pixels})
            dataset = dataset.map_batches(PredictActor, batch_size=choose_batch(metadata["batch"], args.batch), batch_format="numpy",
                                          compute=ray.data.ActorPoolStrategy(size=concurrency),
                                          num_gpus=1 if cuda else 0, num_cpus=1,
                                          fn_constructor_kwargs={"artifact": str(Path(args.artifact).resolve()), "topk": args.topk,
                                                                 "batch": args.batch, "cpus": 1, "device": args.device,
                                                                 "labels_file": str(Path(args.labels).resolve()) if args.labels else None})
            dataset.write_parquet(str(staging))
        stats.seconds = time.perf_counter() - began
        new_files = _parquet_files(staging)
        for file in new_files:
            table = pq.read_table(file, columns=["error"])
            stats.images += table.num_rows
            stats.errors += sum(1 for error in table["error"].to_pylist() if error)
            os.replace(file, output / file.name)
        if args.resume:
            _drop_rows(old_files, retried)
        else:
            for file in old_files:
                file.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started:
            ray.shutdown()
    return stats
