"""imagepiece-predict --ray on a local 2-CPU Ray: the same rows as the single-process path, and --resume."""
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

import pyarrow.parquet as pq
import pytest
import ray

from image_files import write_bad_images, write_good_images
from imagepiece.predict import ray_job
from imagepiece.predict.cli import main
from imagepiece.predict.ray_job import check_output_folder, resume_plan
from imagepiece.predict.rows import Row
from imagepiece.predict.sources import InputItem
from imagepiece.predict.writers import read_rows, rows_from_arrow, rows_to_arrow
from imagepiece.termination import Terminated, sigterm_unwinds

# The bomb fixtures are meant to trip Pillow's warning; predict refuses them itself (error rows).
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()


def assert_same_rows(actual, expected):
    actual, expected = sorted(actual, key=lambda r: r.path), sorted(expected, key=lambda r: r.path)
    assert [(r.path, r.error, r.classes, r.labels) for r in actual] == [(r.path, r.error, r.classes, r.labels) for r in expected]
    for got, want in zip(actual, expected):
        assert got.probs == pytest.approx(want.probs, rel=1e-4)


def test_ray_rows_equal_single_process_rows_and_resume_adds_only_new_ones(compiled, tmp_path, local_ray, capfd, monkeypatch):
    photos = tmp_path / "photos"
    good = write_good_images(photos)[:12]
    bad = write_bad_images(photos)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"photos/{name}" for name in good + list(bad)) + "\n")
    # Static batch 2: every image is computed in the same batch shape on both paths.
    common = ["--artifact", str(compiled.path("ti_imagepiece")), "--input", str(listing), "--no-progress", "--topk", "3"]

    assert main(common + ["--output", str(tmp_path / "single.parquet")]) == 0
    single = read_rows(tmp_path / "single.parquet")
    output = tmp_path / "ray_out"
    capfd.readouterr()
    # Relative paths, from another folder than Ray's workers run in (as on a cluster started elsewhere): the rows
    # used to be written, and the images looked for, relative to the workers' folder.
    monkeypatch.chdir(tmp_path)
    relative = [arg if arg != str(listing) else "list.txt" for arg in common]
    assert main(relative + ["--output", "ray_out", "--ray", "--concurrency", "1"]) == 0
    terminal = "".join(capfd.readouterr())
    # Ray Data's INFO lines (execution plans) stay in its log file; --no-progress asks for no progress hint.
    assert "Starting execution of Dataset" not in terminal and "Progress bars disabled" not in terminal, terminal
    assert not [p for p in output.iterdir() if p.name.startswith(".")], "staging folder removed"
    assert_same_rows(rows_from_arrow(pq.read_table(output)), single)

    # --resume: one more listed file, and an error row whose file was since fixed.
    shutil.copy(photos / good[0], photos / "added.jpg")
    shutil.copy(photos / good[1], photos / "empty.jpg")
    listing.write_text(listing.read_text() + "photos/added.jpg\n")
    files_before = sorted(output.glob("*.parquet"))
    assert main(common + ["--output", str(output), "--ray", "--resume"]) == 0
    resumed = {row.path: row for row in rows_from_arrow(pq.read_table(output))}
    assert len(resumed) == len(single) + 1 == len(list(rows_from_arrow(pq.read_table(output)))), "no duplicate rows"
    assert resumed["photos/added.jpg"].classes == resumed[f"photos/{good[0]}"].classes
    assert resumed["photos/empty.jpg"].ok and resumed["photos/empty.jpg"].classes == resumed[f"photos/{good[1]}"].classes
    assert set(files_before) < set(output.glob("*.parquet")), "earlier files kept, new ones added"

    # A file name that is not UTF-8 travels to the decoders as bytes: as a str it was no Arrow string (Ray warned).
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(photos / good[0], odd / os.fsdecode(b"caf\xe9.jpg"))
    capfd.readouterr()
    assert main([common[0], common[1], "--input", str(odd), "--no-progress", "--topk", "3", "--output", str(tmp_path / "odd_out"),
                 "--ray"]) == 0
    assert "ArrowConversionError" not in "".join(capfd.readouterr())
    [row] = rows_from_arrow(pq.read_table(tmp_path / "odd_out"))
    assert row.path == str(odd / "caf\\xe9.jpg") and row.ok and row.classes == resumed[f"photos/{good[0]}"].classes


def test_resume_replaces_only_error_rows_of_paths_listed_again():
    # No Ray needed: which rows a --ray --resume redoes, and which earlier error rows it then drops.
    earlier = {"done.jpg": True, "broken.jpg": False, "unlisted.jpg": False}  # which earlier paths have a prediction
    items = [InputItem("done.jpg", "/x/done.jpg"), InputItem("broken.jpg", "/x/broken.jpg"), InputItem("new.jpg", "/x/new.jpg")]
    todo, retried = resume_plan(earlier, items)
    assert [item.path for item in todo] == ["broken.jpg", "new.jpg"]
    assert retried == {"broken.jpg"}, "an error row of a path no longer listed is kept, as in the single-process path"


def test_an_output_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    # No Ray and no artifact needed: the folder is checked before anything is loaded. Ray's write_parquet adds files
    # beside what a folder holds; a fresh run replaces only an earlier run's own files, never the user's.
    folder = tmp_path / "tables"
    folder.mkdir()
    pq.write_table(rows_to_arrow([Row("a.jpg")]).select(["path"]), folder / "table.parquet")
    pq.write_table(rows_to_arrow([Row("b.jpg", error="truncated")]), folder / "earlier_run.parquet")
    common = ["--artifact", str(tmp_path / "unused.so"), "--ray", "--no-progress"]

    assert main(common + ["--input", str(folder / "table.parquet"), "--output", str(folder)]) == 2
    assert "is inside the output folder" in capsys.readouterr().err
    elsewhere = tmp_path / "table.parquet"
    shutil.copy(folder / "table.parquet", elsewhere)
    assert main(common + ["--input", str(elsewhere), "--output", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "holds 1 entries that are no predict output (e.g. 'table.parquet')" in error and len(error.splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["earlier_run.parquet", "table.parquet"]
    (folder / "table.parquet").unlink()
    check_output_folder(folder, str(elsewhere))  # an earlier run's output alone: a fresh run may replace it


def test_an_address_where_no_ray_answers_is_a_one_line_error_and_leaves_no_folder(compiled, tmp_path, capsys, monkeypatch):
    with socket.socket() as closed:  # bound, never listening: a connect is refused
        closed.bind(("127.0.0.1", 0))
        address = "%s:%d" % closed.getsockname()
        output = tmp_path / "preds"
        photos = tmp_path / "photos"
        write_good_images(photos)
        common = ["--artifact", str(compiled.path("ti_imagepiece")), "--input", str(photos), "--output", str(output), "--ray",
                  "--no-progress"]
        assert main(common + ["--address", address]) == 2
        assert f"no Ray cluster answers at --address {address}" in capsys.readouterr().err
        monkeypatch.setenv("RAY_ADDRESS", address)  # no --address was given: the error names where the address came from
        assert main(common) == 2
        assert f"no Ray cluster answers at RAY_ADDRESS={address}" in capsys.readouterr().err
    assert not output.exists()
    with pytest.raises(ValueError, match="is not host:port"):
        ray_job.check_reachable("headnode")


@pytest.mark.parametrize("server", ["silent", "http", "grpc", "grpc_bytewise", "tls"])
def test_an_address_is_probed_for_a_grpc_answer_and_one_without_is_refused_not_waited_on(server, monkeypatch):
    # ray.init would retry such an address forever.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = "%s:%d" % listening.getsockname()

        def answer():
            connection, _ = listening.accept()
            with connection:
                connection.recv(1024)
                if server == "http":
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                elif server.startswith("grpc"):  # what Ray's GCS answers: an empty SETTINGS frame (seen from `ray start --head`)
                    settings = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
                    with contextlib.suppress(OSError):  # the probe hangs up once it has read the frame type (4 bytes)
                        for piece in ([settings[i:i + 1] for i in range(9)] if server == "grpc_bytewise" else [settings]):
                            connection.sendall(piece)
                            time.sleep(0.01)
                else:  # silent, or a TLS server waiting for its handshake
                    time.sleep(1.5)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        if server == "tls":  # Ray's gRPC on TLS answers no plaintext opening: only the connection is checked
            monkeypatch.setenv("RAY_USE_TLS", "1")
            ray_job.check_reachable(address, timeout=0.5)
        elif server.startswith("grpc"):  # a generous deadline: it returns as soon as the answer came, on a busy machine too
            ray_job.check_reachable(address, timeout=10)
        else:
            with pytest.raises(ValueError, match=f"--address {address} accepts connections but is no Ray cluster"):
                ray_job.check_reachable(address, timeout=0.5)
        thread.join()


def test_ray_resume_checks_topk_and_spelling_as_the_single_process_path_does(compiled, tmp_path, monkeypatch, capsys):
    # No Ray needed: both checks come before Ray starts; a Ctrl-C right after them stands in for the job.
    photos = tmp_path / "photos"
    names = write_good_images(photos)[:2]
    output = tmp_path / "preds"
    output.mkdir()
    earlier = [Row(f"photos/{name}", classes=[1, 2, 3], labels=["a", "b", "c"], probs=[0.5, 0.25, 0.125]) for name in names]
    pq.write_table(rows_to_arrow(earlier), output / "earlier.parquet")
    before = (output / "earlier.parquet").read_bytes()
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"photos/{name}\n" for name in names))
    common = ["--artifact", str(compiled.path("ti_imagepiece")), "--output", str(output), "--ray", "--resume", "--no-progress"]

    assert main(common + ["--input", str(listing), "--topk", "5"]) == 2
    assert "holds top-3 rows, this run asks for --topk 5" in capsys.readouterr().err

    def interrupt(progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_job, "_start_ray", lambda address: False)
    monkeypatch.setattr(ray_job, "_set_ray_data_output", interrupt)
    listing.write_text("".join(f"./photos/{name}\n" for name in names))
    assert main(common + ["--input", str(listing), "--topk", "3"]) == 130
    error = capsys.readouterr().err
    assert "none of the 2 rows already in" in error and "interrupted; " in error and "before predicting" not in error
    assert [p.name for p in output.iterdir()] == ["earlier.parquet"] and (output / "earlier.parquet").read_bytes() == before

    def no_ray(address):
        raise AssertionError("Ray started with nothing to predict")

    monkeypatch.setattr(ray_job, "_start_ray", no_ray)  # every path has its row: done without Ray, output untouched
    listing.write_text("".join(f"photos/{name}\n" for name in names))
    assert main(common + ["--input", str(listing), "--topk", "3"]) == 0
    assert [p.name for p in output.iterdir()] == ["earlier.parquet"] and (output / "earlier.parquet").read_bytes() == before

    fresh = tmp_path / "fresh"  # made for the run, and gone again when it was interrupted
    monkeypatch.setattr(ray_job, "_start_ray", lambda address: False)
    assert main(["--artifact", str(compiled.path("ti_imagepiece")), "--input", str(listing), "--output", str(fresh), "--ray",
                 "--no-progress"]) == 130
    assert not fresh.exists()


def test_a_failed_actor_is_one_line_naming_its_cause_and_the_output_stays_as_it_was(compiled, tmp_path, monkeypatch, capsys):
    # No Ray: the error is built as Ray raises it where the artifact is missing on a worker's node (a 142-line report,
    # "please open an issue on the Ray project", the cause on its last line).
    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(rows_to_arrow([Row("old.jpg", error="truncated")]), output / "earlier.parquet")
    before = (output / "earlier.parquet").read_bytes()
    (tmp_path / "x.jpg").write_bytes(b"")
    cause = "ip_runtime._core.Error: '/node/x.so' does not exist or is not a file"

    def failed_job(*args):
        raise ray.exceptions.ActorDiedError(cause=ray.exceptions.RayTaskError(
            "PredictActor.__init__", f"Traceback (most recent call last):\n  File \"classifier.py\"\n{cause}", RuntimeError()))

    monkeypatch.setattr(ray_job, "_start_ray", lambda address: False)
    monkeypatch.setattr(ray_job, "_run_job", failed_job)
    status = main(["--artifact", str(compiled.path("ti_imagepiece")), "--input", str(tmp_path / "x.jpg"), "--output", str(output),
                   "--ray", "--no-progress"])
    error = capsys.readouterr().err
    assert status == 1 and len(error.strip().splitlines()) == 1, error
    assert f"the Ray job failed ({cause}); {output} is as it was" in error and "same paths on every node" in error
    assert [p.name for p in output.iterdir()] == ["earlier.parquet"] and (output / "earlier.parquet").read_bytes() == before
    task_error = ray.exceptions.RayTaskError("decode_batch", "traceback", ValueError("boom"))  # a task keeps its exception
    assert ray_job.failure_cause(task_error) == "ValueError: boom"
    # A model call that fails, as Ray Data wraps it: "UDF failed to process a data block", raised from the real error.
    from ray.data.exceptions import UserCodeException

    try:
        try:
            raise RuntimeError("CUDA error: out of memory")
        except RuntimeError as error:
            raise UserCodeException("UDF failed to process a data block.") from error
    except UserCodeException as wrapped:
        udf_error = ray.exceptions.RayTaskError("MapWorker.submit", traceback.format_exc(), wrapped).as_instanceof_cause()
    assert ray_job.failure_cause(udf_error) == "RuntimeError: CUDA error: out of memory"


@pytest.mark.parametrize("resources, cuda, lacking", [({"CPU": 0.0}, False, "no CPU"), ({}, False, "no CPU"),
                                                      ({"CPU": 8.0}, True, "no GPU"), ({"GPU": 1.0}, True, "no CPU")])
def test_a_cluster_without_the_cpu_or_gpu_the_actors_need_is_refused_not_waited_on(monkeypatch, resources, cuda, lacking):
    # Ray Data warns that the job "will hang unless more CPUs are freed up", then waits forever.
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    with pytest.raises(ValueError, match=f"the Ray cluster has {lacking}"):
        ray_job.check_cluster_resources(cuda)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    ray_job.check_cluster_resources(cuda)


def test_starting_ray_keeps_the_clis_sigterm_handler(monkeypatch):
    # ray.init installs its own SIGTERM handler, sys.exit(15) (ray/_private/worker.py, Ray 2.x): predict's (unwind,
    # clean up, say how many images are kept) must be the one in force while the job runs.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum)))
    with sigterm_unwinds():
        ours = signal.getsignal(signal.SIGTERM)
        assert ray_job._start_ray(None) is True
        assert signal.getsignal(signal.SIGTERM) is ours


def test_a_stop_while_the_output_is_committed_waits_for_the_commit_and_says_it_is_complete(compiled, tmp_path, monkeypatch, capsys):
    # No Ray: the job's staged files are made by hand. A Ctrl-C between the moves and the removal of the earlier files
    # once left every path with two rows, and a message that the folder was as before.
    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(rows_to_arrow([Row("old.jpg", error="truncated")]), output / "earlier.parquet")
    (output / f"{ray_job.STAGING_PREFIX}deadbeef").mkdir()  # a killed run's leftover
    (tmp_path / "x.jpg").write_bytes(b"")

    def staged_job(args, todo, metadata, output, staging, stats):
        staging.mkdir()
        pq.write_table(rows_to_arrow([Row(item.path, error="empty file") for item in todo]), staging / "new.parquet")
        stats.images = len(todo)
        return [staging / "new.parquet"]

    commit = ray_job._commit

    def interrupted_commit(*args):
        os.kill(os.getpid(), signal.SIGINT)  # arrives during the commit
        commit(*args)

    monkeypatch.setattr(ray_job, "_start_ray", lambda address: False)
    monkeypatch.setattr(ray_job, "_run_job", staged_job)
    monkeypatch.setattr(ray_job, "_commit", interrupted_commit)
    status = main(["--artifact", str(compiled.path("ti_imagepiece")), "--input", str(tmp_path / "x.jpg"), "--output", str(output),
                   "--ray", "--no-progress"])
    assert status == 130 and "interrupted after the output was complete" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["new.parquet"]  # no earlier rows, no stale staging folder


def test_ray_datas_failure_reports_stay_off_the_terminal_and_its_warnings_do_not():
    def record(name, level, traceback=None):
        return logging.LogRecord(name, level, __file__, 1, "message", None, traceback)

    operator = "ray.data._internal.execution.operators.actor_pool_map_operator"
    try:
        raise RuntimeError("the artifact is truncated or corrupt")
    except RuntimeError:
        died = sys.exc_info()
    assert not ray_job._not_ray_datas_failure_report(record("ray.data.exceptions", logging.ERROR))
    assert not ray_job._not_ray_datas_failure_report(record(operator, logging.ERROR))  # "actors died during initialization"
    assert not ray_job._not_ray_datas_failure_report(record(operator, logging.WARNING, died))  # each death, with its traceback
    assert ray_job._not_ray_datas_failure_report(record(operator, logging.WARNING))
    assert ray_job._not_ray_datas_failure_report(record("ray.data.dataset", logging.ERROR))


def test_ray_starts_locally_unless_an_address_or_ray_address_says_where_and_a_sigterm_while_it_starts_unwinds(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options.get("address")))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray_job, "check_reachable", lambda address, given_as=None: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_job._start_ray(None)  # "local": a `ray start` cluster on the machine is not joined (ray.init() would, then refuse num_cpus)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` runs its entrypoint
    ray_job._start_ray(None)
    ray_job._start_ray("local")  # Ray's own word for a new local Ray: was refused as "not host:port"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray_job._start_ray(None)
    assert calls == ["local", "10.0.0.1:6379", "local", "local"]

    def terminated_while_starting(**options):
        sys.exit(signal.SIGTERM)  # what Ray's own handler does while ray.init runs

    monkeypatch.setattr(ray, "init", terminated_while_starting)
    with pytest.raises(Terminated):
        ray_job._start_ray(None)
    assert calls[-1] == "shutdown", "its half-started processes are stopped"
