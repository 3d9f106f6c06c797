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
already have a prediction and replaces the rows of paths that had an error). The output folder must
be new, empty or hold only an earlier run's Parquet files (predict's columns): a folder holding
anything else (the input table, other data) is refused, as nothing but predict's own files may be
replaced. It is created only once Ray is up, and removed again if the job fails while empty. Row order is not
preserved. Every node needs this package installed (the actors import imagepiece and ip_runtime) and
must see the image files, the artifact and --labels at the same paths (a shared file system): they
travel by path, not through the object store.

Without --address a local Ray is started for the run (all cores, a small object store, no
dashboard, worker logs kept off the terminal) and stopped after, even where a `ray start` cluster
runs on the machine; with one (or with RAY_ADDRESS set, as `ray job submit` does), the job joins that
cluster ("auto" finds a running local one) once it accepted a connection and answered as a gRPC server does,
within RAY_CONNECT_TIMEOUT_S (Ray itself retries an address where nothing, or something else, answers forever).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from .classifier import Classifier, choose_batch
from .labels import class_names
from .pipeline import ImagePreparer, RunStats
from .preprocess import Preprocess
from .rows import Row, prediction_rows
from .sources import InputItem
from .writers import check_topk_found, rows_to_arrow, warn_if_resume_matches_nothing
from imagepiece.command_line import warning_printer
from imagepiece.termination import STOPPED, Terminated, how_stopped, stops_deferred

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
DECODE_BATCH = 16  # images per decode task: small enough to spread over workers, big enough to amortise a task
RAY_CONNECT_TIMEOUT_S = 10.0
STAGING_PREFIX = ".staging-"


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
        image, error, _ = prepare(os.fsdecode(location))
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
        self.names = class_names(self.classifier.metadata, labels_file)

    def __call__(self, batch: Dict[str, np.ndarray]):
        paths, errors = [str(p) for p in batch["path"]], [str(e) for e in batch["error"]]
        ok = np.array([not error for error in errors], dtype=bool)
        classes, probs = self.classifier.classify(np.ascontiguousarray(batch["pixels"][ok]))
        predicted = iter(prediction_rows([p for p, good in zip(paths, ok) if good], classes, probs, self.names))
        rows = [next(predicted) if good else Row(path, error=error) for path, error, good in zip(paths, errors, ok)]
        return rows_to_arrow(rows)


def _parquet_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.parquet") if p.is_file()) if folder.is_dir() else []


def _is_predict_output(file: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(file).names == rows_to_arrow([]).schema.names
    except (OSError, ValueError):  # not Parquet at all (pyarrow's ArrowInvalid is a ValueError)
        return False


def check_output_folder(folder: Path, input_spec: str) -> None:
    """Refuse an --output folder holding anything but an earlier run's Parquet files: a fresh run replaces those
    (as the single-process path replaces its output file), and nothing else is this job's to delete or read as rows."""
    if os.path.isfile(input_spec) and folder.is_dir() and os.path.samefile(os.path.dirname(os.path.abspath(input_spec)), folder):
        raise ValueError(f"the input {input_spec!r} is inside the output folder {str(folder)!r}; write the predictions to another folder")
    if not folder.is_dir():
        return
    foreign = [entry.name for entry in sorted(folder.iterdir())
               if not entry.name.startswith(STAGING_PREFIX)  # an earlier run's, killed before it could remove it
               and not (entry.suffix == ".parquet" and entry.is_file() and _is_predict_output(entry))]
    if foreign:
        raise ValueError(f"output folder {str(folder)!r} holds {len(foreign)} entries that are no predict output (e.g. "
                         f"{foreign[0]!r}); with --ray give a new or empty folder, or one holding only an earlier run's output")


def _earlier_outcomes(folder: Path, topk: Optional[int]) -> Dict[str, bool]:
    """Each path an earlier run's files hold: True if one of its rows is a prediction. Only the columns this needs
    (path, error, the number of classes) are read, a file at a time: the driver holds a flag per path (as it holds
    the input's paths), never the earlier predictions. Refuses rows of another --topk."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    outcomes: Dict[str, bool] = {}
    found: Set[int] = set()
    for file in _parquet_files(folder):
        try:
            table = pq.read_table(file, columns=["path", "error", "classes"])
        except Exception as error:
            raise ValueError(f"cannot resume: {str(file)!r} is not a readable predict output ({type(error).__name__}: {error})") from None
        ok = pc.fill_null(pc.equal(pc.fill_null(table["error"], ""), ""), False)
        found.update(pc.unique(pc.filter(pc.list_value_length(table["classes"]), ok)).to_pylist())
        for path, predicted in zip(table["path"].to_pylist(), ok.to_pylist()):
            outcomes[path] = outcomes.get(path, False) or predicted
    check_topk_found({int(count) for count in found if count is not None}, topk, folder)
    return outcomes


def resume_plan(earlier: Dict[str, bool], items: List[InputItem]) -> Tuple[List[InputItem], Set[str]]:
    """(items still to do, paths whose earlier error rows the new run replaces), from each earlier path's outcome
    (True: it has a prediction).

    Only error rows of paths that are listed again are replaced: an earlier error row for a path no
    longer in the input stays, as in the single-process path (its merge keeps unlisted rows).
    """
    todo = [item for item in items if not earlier.get(item.path, False)]
    retried = {item.path for item in todo if item.path in earlier}
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


# An HTTP/2 client's opening (preface + an empty SETTINGS frame). Ray's GCS and its Ray Client server are gRPC
# servers, which answer it with a SETTINGS frame; anything else (a web server, a port that accepts and stays
# silent) does not, and ray.init would retry that address forever.
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S, given_as: Optional[str] = None) -> None:
    """Raise ValueError unless `address` (host:port or ray://host:port) accepts a TCP connection and answers an HTTP/2
    opening as a gRPC server does, each within `timeout`: ray.init retries an address where nothing answers, or
    something other than Ray does, forever. "auto" needs no probe (Ray fails at once without a local cluster). A
    cluster on TLS (RAY_USE_TLS, as Ray reads it) answers no plaintext opening: there only the connection is checked.
    Any gRPC server passes (another Ray process's port too): this catches the wrong host or port, not every one.
    The error names the address as the user gave it: `given_as`, "--address <address>" unless said otherwise."""
    if address == "auto":
        return
    given_as = given_as or f"--address {address}"
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{given_as} is not host:port (or 'auto', or 'local' for a new local Ray)")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as error:
        raise ValueError(f"no Ray cluster answers at {given_as} ({error.strerror or error})") from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        if not _answers_as_grpc(connection, time.monotonic() + timeout):
            raise ValueError(f"{given_as} accepts connections but is no Ray cluster (no gRPC answer within "
                             f"{timeout:g} s): give the head node's GCS port (ray start --head --port, 6379 by default) "
                             "or ray://host:10001")


def _answers_as_grpc(connection: socket.socket, deadline: float) -> bool:
    """Whether the server on `connection` answers an HTTP/2 opening with a SETTINGS frame before `deadline`."""
    reply = b""  # a frame header: length (3 bytes), type, flags, stream id
    try:
        connection.sendall(HTTP2_CLIENT_PREFACE)
        while len(reply) < 4 and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(9)
            if not chunk:
                break
            reply += chunk
    except OSError:  # a timeout, or a reset
        return False
    return len(reply) >= 4 and reply[3] == HTTP2_SETTINGS


def _start_ray(address: Optional[str]) -> bool:
    """Join `address` or start a local Ray, unless this process already has one; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    # ray.init replaces the SIGTERM handler with its own (sys.exit(15)): the caller's comes back after it, so that the
    # CLI's SIGTERM unwinds, cleans up and reports as its Ctrl-C does (imagepiece.termination).
    caller_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        given_as = f"--address {address}"
    else:  # `ray job submit` runs its entrypoint with RAY_ADDRESS set
        address = os.environ.get("RAY_ADDRESS")
        given_as = f"RAY_ADDRESS={address}"
    try:
        if address and address != "local":  # Ray's own word for a new local Ray: what no address does here too
            check_reachable(address, given_as=given_as)
            ray.init(address=address, **common)
        else:  # "local": a new Ray even where a `ray start` cluster runs (ray.init() would join it). Its CPU count is
            # Ray's own, which follows a container's CPU quota (os.cpu_count() counts the host's cores).
            ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    except BaseException as error:
        ray.shutdown()  # its half-started processes go too
        if isinstance(error, SystemExit) and error.code == signal.SIGTERM:  # SIGTERM while Ray starts: its handler's sys.exit(15)
            raise Terminated() from None
        raise
    finally:
        if caller_sigterm is not None:
            signal.signal(signal.SIGTERM, caller_sigterm)
    return True


# Loggers whose failure reports stay off the terminal (the session log keeps them): the page of tracebacks Ray Data
# prints when a task or actor fails, asking to report it to Ray, and its account of actors that died starting.
RAY_DATA_FAILURE_REPORTS = ("ray.data.exceptions", "ray.data._internal.execution.operators.actor_pool_map_operator")


def _not_ray_datas_failure_report(record: logging.LogRecord) -> bool:
    """Whether `record` may reach the terminal: not a failure report (an error, or a warning with its traceback, as
    each actor that dies starting gets), whose cause the run says in one line (RayJobFailed)."""
    return record.name not in RAY_DATA_FAILURE_REPORTS or (record.levelno < logging.ERROR and record.exc_info is None)


def _set_ray_data_output(progress: bool) -> None:
    """What Ray Data prints on the terminal: progress bars if asked for, warnings and errors; its INFO
    lines (every execution plan) stay in its log file."""
    # Its handlers exist once ray.data is imported: quieting before that would find none.
    import ray.data
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
            if _not_ray_datas_failure_report not in handler.filters:
                handler.addFilter(_not_ray_datas_failure_report)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:
        # --no-progress was asked for: spend Ray's one-time warning that says how to turn them back on.
        log_once("ray_data_progress_manager_disabled")


def check_cluster_resources(cuda: bool) -> int:
    """The default model actor count, one per GPU for a CUDA artifact, per CPU otherwise; ValueError where the cluster
    has no CPU (decoding, and every actor, takes one) or, for a CUDA artifact, no GPU: Ray Data would wait forever for
    workers that cannot be placed."""
    import ray

    resources = ray.cluster_resources()
    lacking = [name for name in ("CPU", "GPU")[:1 + cuda] if resources.get(name, 0) < 1]
    if lacking:
        raise ValueError(f"the Ray cluster has no {' and no '.join(lacking)}: decoding and the model actors need "
                         f"{'a CPU, and each actor a GPU' if cuda else 'a CPU each'}, and Ray would wait for them forever "
                         "(an autoscaling cluster must have such a node up when the run starts)")
    return int(resources["GPU" if cuda else "CPU"])


class RayRowsLost(Exception):
    """The job's Parquet files hold fewer (or more) rows than images were sent: never a silently partial output."""


class RayJobFailed(Exception):
    """A task or actor of the job failed: its cause in one line (Ray's own report is pages of tracebacks)."""


# A traceback's exception line: "ip_runtime._core.Error: ...", "RuntimeError: CUDA error: out of memory".
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): ")


def failure_cause(error: BaseException) -> str:
    """The innermost error of a Ray failure, e.g. "ip_runtime._core.Error: 'x.so' does not exist or is not a file"."""
    cause = getattr(error, "cause", None)  # a failed task's own exception
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
        return f"{type(cause).__name__}: {cause}"
    # An actor's, or a model call Ray Data wrapped ("UDF failed to process a data block", raised from the real one):
    # the last exception line of the traceback text that is not Ray's own.
    lines = [line.strip() for line in str(error).splitlines()]
    ours = [line for line in lines if _EXCEPTION_LINE.match(line) and not line.startswith("ray.")]
    return ours[-1] if ours else next((line for line in reversed(lines) if line), type(error).__name__)


class StoppedAfterWriting(Exception):
    """Ctrl-C or SIGTERM came once the output was complete (while Ray shut down): `stop` says which."""

    def __init__(self, stop: BaseException, stats: RunStats) -> None:
        super().__init__(how_stopped(stop))
        self.stop, self.stats = stop, stats


def run_on_ray(args, items: List[InputItem], warn: Callable[[str], None] = warning_printer()) -> RunStats:
    """Predict `items` on Ray into the folder `args.output`; same row contents as the single-process path."""
    import ray
    import ray.data.exceptions

    from imagepiece.artifact import read_metadata

    # Absolute: Ray's workers (on a cluster started elsewhere, --address) resolve relative paths against their own folder.
    output = Path(os.path.abspath(args.output))
    metadata = read_metadata(args.artifact)
    earlier = _earlier_outcomes(output, args.topk) if args.resume else {}
    warn_if_resume_matches_nothing(list(earlier), [item.path for item in items], output, warn)
    todo, retried = resume_plan(earlier, items)
    stats = RunStats(skipped=len(items) - len(todo), decode_seconds=None, inference_seconds=None)
    if not todo:  # --resume with every path predicted already: the output stands as it is, and Ray need not start
        return stats
    old_files = _parquet_files(output)
    created = not output.exists()
    staging = output / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    started = _start_ray(args.address)
    committed = False
    try:
        try:
            try:
                new_files = _run_job(args, todo, metadata, output, staging, stats)
            except (ray.exceptions.RayError, ray.data.exceptions.ExecutionTimeoutError) as error:
                raise RayJobFailed(f"the Ray job failed ({failure_cause(error)}); {output} is as it was before this run "
                                   "(on a cluster, the artifact, --labels and the images must be at the same paths on "
                                   "every node)") from None
            with stops_deferred():  # a stop half-way would leave old and new rows side by side
                _commit(new_files, output, staging, old_files, retried, args.resume)
                committed = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if created:  # a folder this run made is empty only if the job failed or was interrupted: it goes again
                with contextlib.suppress(OSError):  # rmdir removes nothing but an empty folder
                    output.rmdir()
            if started:
                ray.shutdown()
    except STOPPED as stop:
        if committed:  # the output is whole (the stop came after, or while Ray shut down): not "as it was"
            raise StoppedAfterWriting(stop, stats) from None
        raise
    return stats


def _run_job(args, todo: List[InputItem], metadata: dict, output: Path, staging: Path, stats: RunStats) -> List[Path]:
    """The Ray job, writing into `staging`; its files, once their rows are counted into `stats`."""
    import pyarrow.parquet as pq
    import ray

    output.mkdir(exist_ok=True)  # not before: a Ray that cannot start leaves no empty folder behind
    _set_ray_data_output(progress=not args.no_progress)
    cuda = (args.device or metadata["device_type"]).startswith("cuda")
    concurrency = args.concurrency or check_cluster_resources(cuda)
    began = time.perf_counter()
    blocks = max(1, min(len(todo) // DECODE_BATCH, 1000))
    concurrency = min(concurrency, blocks)  # more actors than blocks would only idle
    # Absolute without normalising: "link/../x.jpg" must resolve through the link, as the single-process path opens it.
    # As the file system's bytes: a name that is not UTF-8 is no Arrow string (Ray warned once per block, then pickled it).
    locations = [{"path": i.path, "location": os.fsencode(i.location and os.path.join(os.getcwd(), i.location))}
                 for i in todo]  # "": its error row
    dataset = ray.data.from_items(locations, override_num_blocks=blocks)
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
    if stats.images != len(todo):  # checked before anything moves: the output stays as it was
        raise RayRowsLost(f"the Ray job wrote {stats.images} rows for {len(todo)} images; "
                          f"{output} is as it was before this run")
    return new_files


def _commit(new_files: List[Path], output: Path, staging: Path, old_files: List[Path], retried: Set[str], resume: bool) -> None:
    """The new files into `output`; the earlier ones removed (a fresh run) or without the retried rows (--resume);
    staging folders of earlier runs killed before they could remove theirs go too."""
    for file in new_files:
        os.replace(file, output / file.name)
    if resume:
        _drop_rows(old_files, retried)
    else:
        for file in old_files:
            file.unlink()
    for stale in output.glob(f"{STAGING_PREFIX}*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
