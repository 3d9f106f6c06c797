"""The benchmark CLI (`python -m imagepiece.bench`, scripts/benchmark.py): complete, well-formed,
self-consistent results from small runs (not a timing test: no figure is compared with a speed)."""
import argparse
import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagepiece.bench.report import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
FAKE_CPP_BENCH = str(Path(__file__).with_name("fake_cpp_bench.sh"))  # stands in for a built bench_runtime


def bench(*args, script=False):
    entry = [str(ROOT / "scripts" / "benchmark.py")] if script else ["-m", "imagepiece.bench"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], capture_output=True, text=True)


def written(root):
    (folder,) = root.iterdir()  # one folder, named after the machine
    return {path.suffix: path for path in folder.iterdir()}


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = bench("suite", "--quick", "--out", out)
    # The end of stderr, where the reason is: its start is progress bars (a CI log shows a failure's first lines).
    assert result.returncode == 0, result.stderr[-3000:]
    return written(out)


def test_quick_suite_writes_every_file_with_its_provenance(quick_suite):
    assert set(quick_suite) == {".csv", ".json", ".md", ".png"}
    assert quick_suite[".json"].name.startswith("suite_deit_tiny_patch16_224_cpu_fp32_quick_")
    for suffix in (".csv", ".md"):
        first = quick_suite[suffix].read_text().splitlines()[0]
        assert "torch 2." in first and "cores" in first, suffix
    report = json.loads(quick_suite[".json"].read_text(), parse_constant=refuse_non_json)  # strict readers refuse NaN
    assert {"cpu", "torch", "cuda", "gpu", "timm"} <= set(report["machine"])
    settings = report["settings"]  # JSON values a reader can compare, not Python reprs
    assert settings["quick"] is True and settings["batch"] == [2] and settings["dtype"] == ["fp32"]
    assert isinstance(settings["cpp_bench"], str)
    assert quick_suite[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def refuse_non_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_quick_suite_rows_are_complete_and_consistent(quick_suite):
    lines = quick_suite[".csv"].read_text().splitlines()
    rows = list(csv.DictReader(lines[1:]))
    assert list(rows[0]) == COLUMNS
    assert {(r["variant"], r["path"]) for r in rows} == {(v, p) for v in ("plain", "imagepiece") for p in ("eager", "aoti", "ip_runtime")}
    for row in rows:
        for column in ("p50_ms", "p90_ms", "min_ms", "img_per_s", "gflops_per_image", "mean_tokens", "vs_plain", "vs_eager_plain"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, (column, row)
        assert row["peak_mem_mib"] == ""  # the CPU has no per-call peak (every row showed the process's): no figure, not "nan"
        assert float(row["min_ms"]) <= float(row["p50_ms"]) <= float(row["p90_ms"])
        assert float(row["img_per_s"]) == pytest.approx(2 / float(row["p50_ms"]) * 1e3)
        assert len(row["tokens_per_block"].split()) == 12
    p50 = {(r["variant"], r["path"]): float(r["p50_ms"]) for r in rows}
    for row in rows:  # every ratio is the quotient of two medians of the same run
        assert float(row["vs_plain"]) == pytest.approx(p50[("plain", row["path"])] / p50[(row["variant"], row["path"])], rel=1e-6)
        assert float(row["vs_eager_plain"]) == pytest.approx(p50[("plain", "eager")] / p50[(row["variant"], row["path"])], rel=1e-6)
    flops = {r["variant"]: float(r["gflops_per_image"]) for r in rows}
    assert flops["imagepiece"] < 0.6 * flops["plain"]  # 56% of the tokens
    assert "| ImagePiece | ip_runtime | fp32 | 2 |" in quick_suite[".md"].read_text()


def test_quick_suite_reports_the_compile_times_it_records(quick_suite):
    recorded = json.loads(quick_suite[".json"].read_text())["compile_seconds"]
    assert {(r["variant"], r["path"], r["what"]) for r in recorded} == {
        (v, "aoti", f"fp32: {what}") for v in ("plain", "imagepiece") for what in ("torch.export", "AOTInductor compile")}
    assert all(r["seconds"] > 0 for r in recorded)
    markdown = quick_suite[".md"].read_text()
    for r in recorded:
        assert f"| {r['variant']} | aoti | {r['what']} | {r['seconds']:.1f} |" in markdown


def test_overhead_mode_compares_the_runtime_with_the_runner(tmp_path):
    result = bench("overhead", "--arch", "deit_tiny_patch16_224", "--preset", "plain", "--batch", "2", "--rounds", "3", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    files = written(tmp_path)
    assert set(files) == {".txt", ".json"}
    stats = json.loads(files[".json"].read_text())["stats"]
    assert set(stats) == {f"batch 2 {name}" for name in ("AOTI runner (direct)", "imagepiece.export.load", "ip_runtime.run",
                                                           "ip_runtime.run into buffer", "eager")}
    assert all(s["samples"] >= 3 and 0 < s["min_ms"] <= s["p50_ms"] for s in stats.values())
    assert "+0.0% vs the runner" in files[".txt"].read_text()  # the runner against itself


@pytest.mark.parametrize(
    "args, message",
    [
        (["suite", "--variants", "dynamicvit"], "invalid choice: 'dynamicvit'"),
        (["suite", "--paths", "onnxruntime"], "invalid choice: 'onnxruntime'"),
        (["suite", "--batch", "0"], "--batch sizes must be >= 1"),
        (["suite", "--paths", "ip_runtime_graphs"], "cannot run on cpu"),
        (["suite", "--dtype", "fp16"], "fp16 is not supported on cpu"),
        (["suite", "--repeats", "0"], "--repeats must be >= 1"),
        (["suite", "--paths", "cpp", "--cpp-bench", "/nonexistent/bench_runtime"], "no google-benchmark binary at"),
        (["suite", "--paths", "cpp", "--cpp-bench", "/"], "no google-benchmark binary at"),
        (["suite", "--paths", "cpp", "--cpp-bench", "/bin/true"], "is not cpp/bench's bench_runtime"),  # found before compiling
        (["suite", "--paths", "cpp", "--batch", "3", "--cpp-bench", FAKE_CPP_BENCH], "times batch sizes 1, 2, 4, 8"),
        (["suite", "--paths", "cpp", "--dtype", "bf16", "--cpp-bench", FAKE_CPP_BENCH], "runs only in a --dtype fp32 run"),
        (["suite", "--device", "tpu"], "--device must be cpu or cuda"),
        (["compile", "--device", "cudafoo"], "--device must be cpu or cuda"),
        (["suite", "--device", "cpu:1"], "--device must be cpu or cuda"),
        (["compile", "--batch", "0"], "--batch sizes and --repeats must be >= 1"),
        (["overhead", "--rounds", "0"], "--batch sizes and --rounds must be >= 1"),
        (["profile", "--preset", "plain"], "invalid choice: 'plain'"),
        (["profile", "--threads", "0"], "--threads must be >= 1"),
        (["profile", "--top-kernels", "-1"], "--top-kernels must be >= 0"),
        (["profile", "--dtype", "fp16"], "fp16 is not supported on cpu"),
        (["suite", "--dtype", "bf16", "--paths", "ort"], "runs only in a --dtype fp32 run"),
        # bf16 with only fp32-run paths: refused before timing, not a crash in the bf16 plot after it
        (["suite", "--dtype", "fp32", "bf16", "--paths", "cpp", "--cpp-bench", FAKE_CPP_BENCH, "--batch", "1"],
         "--dtype bf16: none of the chosen --paths runs in a bf16 run (cpp in fp32)"),
        (["suite", "--min-seconds", "nan"], "--min-seconds must be a finite number >= 0"),
        (["suite", "--min-seconds", "-1"], "--min-seconds must be a finite number >= 0"),
        (["contention", "--neighbours", "0", "100000"], "--neighbours 100000 is more busy processes"),
        (["precision", "--calibration", "/nonexistent/images"], "--calibration is for the int8 artifact: add ip_runtime_int8"),
        (["precision", "--images", "0"], "--images and --batch must be >= 1"),
        (["precision", "--batch", "0"], "--images and --batch must be >= 1"),
        (["contention", "--artifact", "/nonexistent/model.so"], "is not a file"),
        (["contention", "--artifact", __file__], "is not an artifact"),
        (["contention", "--neighbours", "-1"], "--neighbours >= 0"),
        (["contention", "--threads", "2"], "through --settings; drop --threads"),
        (["precision", "--contenders", "ip_runtime_int8", "--calibration", "/nonexistent/images"], "is not a folder"),
        (["tuning", "--repeats", "0"], "--batch and --repeats must be >= 1"),
        (["tuning", "--tunings", "O3"], "invalid choice: 'O3'"),
        (["serve", "--concurrency", "0"], "--concurrency, --requests, --rounds and --decode-threads must be >= 1"),
        (["serve", "--artifact", __file__], "is not an artifact"),
        (["serve", "--concurrency", "8", "--requests", "2"], "--requests 2 is fewer than --concurrency 8"),
        (["e2e", "--artifact", "/nonexistent/model.so"], "--artifact '/nonexistent/model.so' is not a file"),
        (["e2e", "--images", "0"], "must be >= 1"),
        (["e2e", "--ray-concurrency", "2"], "needs --ray"),
        (["e2e", "--image-size", "10000", "9000"], "90,000,000 pixels, over predict's limit of 89,478,485"),
        (["e2e", "--image-size", "100000", "1"], "a JPEG side holds at most 65500 pixels"),  # was Pillow's traceback
        (["e2e", "--images", "4", "--batch", "8"], "--images 4 is fewer than one --batch 8"),
        (["e2e", "--uint8", "--uint8-artifact", __file__], "not both"),
        (["e2e", "--artifact", __file__], "is not an artifact"),
        (["e2e", "--artifact", __file__, "--uint8-artifact", __file__], "is not an artifact"),
        (["suite", "--quick", "--arch", "deit_small_patch16_224"], "--quick sets --arch, --variants and --batch itself; drop --arch"),
        (["suite", "--quick", "--variants", "tome", "--batch", "4"], "drop --variants and --batch or --quick"),
    ],
)
def test_bad_arguments_are_refused_clearly(tmp_path, capsys, args, message):
    from imagepiece.bench import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_served_contender_lets_every_client_connect(tmp_path, monkeypatch):
    """Past the server's default --max-connections (1000) clients got 503s, and the row timed those, not serving."""
    from imagepiece.bench import serving

    started = []
    monkeypatch.setattr(serving.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    args = argparse.Namespace(max_batch=4, max_delay_ms=2, decode_threads=1, device="cpu", threads=None, concurrency=[1, 2000])
    serving.ServerProcess(Path("model.so"), args, 64, tmp_path / "server.log")
    [command] = started
    assert int(command[command.index("--max-connections") + 1]) >= 2000


@pytest.mark.parametrize("out, message", [("{file}", ": '{file}' is a file, not a folder"),
                                          ("{file}/results", ": '{file}' is a file, not a folder")])
def test_an_output_folder_that_is_a_file_is_named_as_one(tmp_path, capsys, out, message):
    from imagepiece.bench import cli

    (tmp_path / "results.json").write_text("{}")  # --out is the results folder, not a file
    with pytest.raises(SystemExit):
        cli.main(["compile", "--out", out.format(file=tmp_path / "results.json")])
    assert message.format(file=tmp_path / "results.json") in capsys.readouterr().err


def test_the_results_folder_is_not_made_before_the_run(tmp_path, capsys):
    from imagepiece.bench import cli

    args = cli.parse_args(["reevaluation", "--threads", "10000", "--out", str(tmp_path / "new" / "results")])
    assert args.threads == 10000 and "is more than the" in capsys.readouterr().err  # allowed, with a warning
    assert list(tmp_path.iterdir()) == []  # a run stopped before its first file leaves no folder


@pytest.mark.parametrize("script", [False, True], ids=["python -m imagepiece.bench", "scripts/benchmark.py"])
def test_both_entry_points_refuse_bad_requests_without_a_traceback(script):
    result = bench(script=script)
    assert result.returncode == 2 and "the following arguments are required: MODE" in result.stderr
    result = bench("compile", "--arch", "deit_tiny_patch16_224", "--out", "/sys/kernel/results", script=script)
    assert result.returncode == 2 and "not writable" in result.stderr and "Traceback" not in result.stderr


def test_reevaluation_mode_counts_changed_decisions_at_the_pruning_blocks(tmp_path):
    from imagepiece.bench import cli

    assert cli.main(["reevaluation", "--arch", "deit_tiny_patch16_224", "--images", "4", "--batch", "2",
                     "--weights", "sharpened", "--out", str(tmp_path)]) == 0
    files = written(tmp_path)
    blocks = json.loads(files[".json"].read_text())["blocks"]["sharpened"]
    assert set(blocks) == {"3", "6", "9"}
    assert all(0 <= b["mean"] <= b["max"] <= 1 and b["images"] == 4 for b in blocks.values())
    assert sum(b["images_changed"] for b in blocks.values()) > 0  # peaked attention: the two modes do differ


def test_precision_mode_reports_decisions_and_deviation_beside_plain(tmp_path):
    from imagepiece.bench import cli
    from imagepiece.environment import bf16_support

    contenders = ["fp32_noise"] + (["eager_bf16"] if bf16_support().native else [])
    assert cli.main(["precision", "--arch", "deit_tiny_patch16_224", "--images", "4", "--batch", "2",
                     "--contenders", *contenders, "--out", str(tmp_path)]) == 0
    results = json.loads(written(tmp_path)[".json"].read_text())["results"]["sharpened"]
    assert set(results) == set(contenders)
    for contender in contenders:
        plain, ours = results[contender]["plain"], results[contender]["imagepiece"]
        assert plain["same_tokens_per_block"] == [1.0] * 12  # plain DeiT decides nothing
        assert all(0 <= share <= 1 for share in ours["same_tokens_per_block"] + ours["identical_images_per_block"])
        assert 0 <= ours["top1_agree"] <= ours["images"] == 4 and ours["max_abs_logit_diff"] >= ours["median_abs_logit_diff"] >= 0


def test_suite_runs_the_peers_in_the_same_loop_at_the_precision_they_state(tmp_path):
    pytest.importorskip("onnxruntime", reason="the peers are optional extras: pip install 'imagepiece[peers]'")
    pytest.importorskip("openvino", reason="the peers are optional extras: pip install 'imagepiece[peers]'")
    from imagepiece.bench import cli

    assert cli.main(["suite", "--arch", "deit_tiny_patch16_224", "--variants", "plain", "--batch", "2", "--repeats", "1",
                     "--paths", "eager", "ort", "openvino_fp32", "--out", str(tmp_path)]) == 0
    files = written(tmp_path)
    rows = list(csv.DictReader(files[".csv"].read_text().splitlines()[1:]))
    assert {(r["path"], r["precision"]) for r in rows} == {("eager", "fp32"), ("ort", "fp32"), ("openvino_fp32", "fp32")}
    eager = float(next(r["p50_ms"] for r in rows if r["path"] == "eager"))
    for row in rows:  # same-run ratios to timm eager
        assert float(row["vs_eager_plain"]) == pytest.approx(eager / float(row["p50_ms"]), rel=1e-6)
    assert "onnxruntime" in json.loads(files[".json"].read_text())["machine"]  # the peers' versions are recorded


def test_suite_defaults_leave_out_an_unbuilt_cpp_path_and_quick_keeps_given_repeats(tmp_path, capsys):
    from imagepiece.bench.cli import parse_args

    args = parse_args(["suite", "--cpp-bench", str(tmp_path / "not_built")])
    assert "cpp" not in args.paths and "ip_runtime" in args.paths and args.repeats == 10
    assert "the 'cpp' path is left out: no google-benchmark binary" in capsys.readouterr().err
    assert parse_args(["suite", "--quick", "--repeats", "10"]).repeats == 10 and parse_args(["suite", "--quick"]).repeats == 3
    built = ["--cpp-bench", FAKE_CPP_BENCH]  # stands in for a built binary
    assert "cpp" in parse_args(["suite", *built]).paths and "cpp" not in parse_args(["suite", "--dtype", "bf16", *built]).paths


def test_suite_without_matplotlib_says_before_timing_that_it_writes_no_figures(monkeypatch, capsys):
    from imagepiece.bench.cli import parse_args

    assert parse_args(["suite", "--quick"]).plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: not found, not importable
    assert not parse_args(["suite", "--quick"]).plot
    assert "no figures: matplotlib is not installed (pip install 'imagepiece[scripts]')" in capsys.readouterr().err


def test_tuning_mode_compiles_each_setting_and_checks_its_logits(tmp_path, monkeypatch):
    from imagepiece.bench import cli

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "callers-cache"))
    # fp32 compiles SDPA by default: the matmul kernel is the setting under test.
    assert cli.main(["tuning", "--arch", "deit_tiny_patch16_224", "--preset", "plain", "--batch", "2", "--tunings", "matmul-attention",
                     "--repeats", "1", "--out", str(tmp_path / "results")]) == 0
    record = json.loads(written(tmp_path / "results")[".json"].read_text())
    assert set(record["stats"]) == {"matmul-attention", "eager fp32"} and record["compile_seconds"]["matmul-attention"] > 0
    assert record["attention"] == {"matmul-attention": "matmul"}  # what the artifact's metadata says it holds
    assert record["max_abs_logit_diff"]["matmul-attention"] < 1e-3  # plain DeiT: no decision to flip, only rounding
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "callers-cache")  # its cold caches were temporary


def test_serve_mode_loads_the_batcher_beside_batch_one_runs(compiled, tmp_path, capsys):
    from imagepiece.bench import cli

    with pytest.raises(SystemExit) as exit_:  # batch-1 runs and the batcher need a dynamic-batch artifact
        cli.main(["serve", "--artifact", str(compiled.path("ti_imagepiece")), "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "must take every batch in 1..16" in capsys.readouterr().err
    assert cli.main(["serve", "--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--no-http", "--concurrency", "1", "4",
                     "--requests", "8", "--rounds", "2", "--max-batch", "4", "--out", str(tmp_path)]) == 0
    record = json.loads(written(tmp_path)[".json"].read_text())
    rows = {row["name"]: row for row in record["contenders"]}
    assert set(rows) == {"sequential run()", "batcher 1", "batcher 4"}
    assert all(row["requests"] == 16 and row["errors"] == 0 and row["p99_ms"] >= row["p50_ms"] > 0 for row in rows.values())
    assert rows["batcher 1"]["mean_batch"] == 1 and 1 <= rows["batcher 4"]["mean_batch"] <= 4
    assert len(rows["batcher 4"]["img_per_s_rounds"]) == 2 and rows["batcher 4"]["vs_sequential"] > 0


def test_contention_mode_times_each_openmp_setting_beside_busy_neighbours(compiled, tmp_path):
    from imagepiece.bench import cli

    # No --arch/--preset: the results are named after the artifact's model, not after their defaults. An artifact
    # that takes uint8 pixels: the timed child feeds each artifact the images it takes.
    assert cli.main(["contention", "--artifact", str(compiled.path("ti_imagepiece_uint8")), "--batch", "2",
                     "--neighbours", "0", "1", "--settings", "default", "passive", "--rounds", "1", "--calls", "2",
                     "--out", str(tmp_path)]) == 0
    assert written(tmp_path)[".json"].name.startswith("contention_deit_tiny_patch16_224_imagepiece_b2_")
    stats = json.loads(written(tmp_path)[".json"].read_text())["stats"]
    assert set(stats) == {f"{s} | {n} neighbours" for s in ("default", "passive") for n in (0, 1)}
    assert all(row["samples"] == 2 and row["p50_ms"] > 0 for row in stats.values())


def test_contention_settings_reach_libgomp_as_named_after_ip_runtime_sets_its_own_default():
    # `import ip_runtime` makes a process PASSIVE where no OpenMP variable is set: "default" and "1 thread" must
    # still spin (else "1 thread" would be "passive, 1 thread" twice over).
    from imagepiece.bench.contention import SETTINGS, child_environment

    probe = ("import ip_runtime, os; print(*(os.environ.get(name) for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', "
             "'OMP_NUM_THREADS')))")
    seen = {name: subprocess.run([sys.executable, "-c", probe], env=child_environment(SETTINGS[name]), capture_output=True,
                                 text=True, check=True).stdout.split() for name in SETTINGS}
    assert seen == {"default": ["None", "300000", "None"], "passive": ["PASSIVE", "None", "None"],
                    "1 thread": ["None", "300000", "1"], "passive, 1 thread": ["PASSIVE", "None", "1"]}


@pytest.mark.parametrize("output, message", [
    ("Fatal error: can't fill 256 bytes in section .lrodata: 'No space left on device'",
     "suite failed: could not read or write a file: No space left on device"),
    ("g++: fatal error: Killed signal terminated program cc1plus",
     "suite failed: the C++ compiler was killed (the kernel does so when memory runs out)"),
])
def test_a_compile_the_machine_cannot_finish_ends_in_one_line(tmp_path, capsys, monkeypatch, output, message):
    """A full disk or a compiler killed for memory, as Inductor raises them (its traceback hid the reason under
    its own frames); any other exception keeps its traceback."""
    from torch._inductor.exc import CppCompileError, InductorError

    from imagepiece.bench import cli, suite

    def run_raising(error: BaseException):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(suite, "run", run_raising(InductorError(CppCompileError(["g++"], output), None)))
    assert cli.main(["suite", "--quick", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"python -m imagepiece.bench: error: {message}; its results were not written\n"
    assert list(tmp_path.iterdir()) == []
    for bug in (ZeroDivisionError(), OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))):  # not the machine's
        monkeypatch.setattr(suite, "run", run_raising(bug))
        with pytest.raises(type(bug)):
            cli.main(["suite", "--quick", "--out", str(tmp_path)])


def test_sigterm_stops_a_mode_and_its_child_processes_with_one_line(compiled, tmp_path):
    """SIGTERM (a scheduler's, `kill PID`) unwinds the mode as Ctrl-C does: the busy neighbour and the measuring
    child are stopped, and the benchmark says so in one line."""
    process = subprocess.Popen([sys.executable, "-m", "imagepiece.bench", "contention", "--artifact", str(compiled.path("ti_plain")),
                                "--batch", "2", "--neighbours", "1", "--settings", "default", "--rounds", "1", "--calls", "1000000",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 120
    while len(children.read_text().split()) < 2:  # the neighbour, then the measuring child
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    pids = children.read_text().split()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("contention terminated (SIGTERM); its child processes and temporary files are "
                                                 "gone, its results were not written")
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def test_artifact_options_are_checked_against_the_artifact_and_name_the_results(compiled, tmp_path, capsys):
    from imagepiece.bench import cli

    static = str(compiled.path("ti_imagepiece"))  # DeiT-Ti ImagePiece, float input, static batch 2
    for args, message in [(["contention", "--artifact", static, "--batch", "8"], "--batch 8 is outside the batch range 2..2"),
                          (["e2e", "--artifact", static], "--batch 8 is outside the batch range 2..2"),  # not clamped to 2
                          (["e2e", "--artifact", static, "--batch", "2", "--uint8-artifact", static],
                           "--uint8-artifact must take uint8_nhwc input"),
                          # --uint8 would compile --arch/--preset's twin (DeiT-S), not the artifact's model
                          (["e2e", "--artifact", static, "--batch", "2", "--uint8"], "beside --artifact give --uint8-artifact"),
                          (["e2e", "--artifact", str(compiled.path("ti_plain")), "--batch", "2", "--uint8-artifact",
                            str(compiled.path("ti_imagepiece_uint8"))], "--uint8-artifact holds another model than --artifact (they differ in method, config)"),
                          (["e2e", "--uint8-artifact", str(compiled.path("ti_imagepiece_uint8")), "--batch", "2"],
                           "--uint8-artifact needs --artifact")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main([*args, "--out", str(tmp_path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
    assert list(tmp_path.iterdir()) == []
    args = cli.parse_args(["serve", "--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--max-batch", "4", "--preset", "plain",
                           "--out", str(tmp_path)])
    assert (args.arch, args.preset) == ("deit_tiny_patch16_224", "imagepiece")


def test_artifact_load_mode_times_loads_in_fresh_processes_and_traces_rss(compiled, tmp_path):
    from imagepiece.bench import cli

    so, pt2 = compiled.path("ti_tome"), compiled.path("ti_tome_pt2")
    assert cli.main(["artifact-load", "--so", str(so), "--pt2", str(pt2), "--repeats", "1", "--cycles", "2",
                     "--old-pt2-cycles", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    files = written(tmp_path)
    record = json.loads(files[".json"].read_text())
    assert [record["cycles"][suffix]["threads"] for suffix in (".so", ".pt2")] == [1, 1]  # --threads reaches the children
    assert set(record["load_seconds"]) == {f"{suffix} {kind}" for suffix in (".so", ".pt2") for kind in ("before", "after", "digest")}
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in record["load_seconds"].values())
    assert [len(record["cycles"][suffix]["rss_mib"]) for suffix in (".so", ".pt2")] == [2, 2]  # after warm-up, after the last cycle
    assert "digest alone" in files[".txt"].read_text()


def test_artifact_load_mode_refuses_what_it_cannot_measure(compiled, tmp_path, capsys):
    from imagepiece.bench import cli

    with pytest.raises(SystemExit):  # two load paths of two models: their times would not compare
        cli.main(["artifact-load", "--so", str(compiled.path("ti_imagepiece")), "--pt2", str(compiled.path("ti_tome_pt2")),
                  "--out", str(tmp_path / "results")])
    assert "--so and --pt2 hold different models (method, config)" in capsys.readouterr().err

    result = bench("artifact-load", "--so", tmp_path / "missing.so", "--out", tmp_path)
    assert result.returncode == 2 and "--so must be an existing .so file" in result.stderr
    (tmp_path / "fake.pt2").write_text("not a package")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["artifact-load", "--pt2", str(tmp_path / "fake.pt2"), "--out", str(tmp_path / "results")])
    assert exit_.value.code == 2 and "--pt2: " in capsys.readouterr().err and not (tmp_path / "results").exists()
    (tmp_path / "a_file").write_text("")
    for workdir, message in [(tmp_path / "a_file", "is not a folder"), (tmp_path / "a_file" / "sub", "is not a folder")]:
        with pytest.raises(SystemExit):  # checked before anything is compiled or made
            cli.main(["artifact-load", "--workdir", str(workdir), "--out", str(tmp_path / "results")])
        assert message in capsys.readouterr().err
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # as a folder in /tmp that anyone made: an artifact planted there would be loaded
    with pytest.raises(SystemExit):
        cli.main(["artifact-load", "--workdir", str(shared), "--out", str(tmp_path / "results")])
    assert "is not yours alone" in capsys.readouterr().err


def test_artifact_load_compiles_the_missing_artifact_for_the_given_ones_model(compiled, tmp_path, monkeypatch):
    """The twin of one given artifact is compiled from its metadata: its config, precision, attention kernel, batch
    range and input, not just its arch and method. One compiled from a checkpoint has no reproducible twin."""
    from imagepiece import export
    from imagepiece.artifact import read_metadata
    from imagepiece.bench import artifact_load
    from imagepiece.bench.cli import parse_args

    with pytest.raises(SystemExit) as exit_:  # the fixtures are compiled from a (random) checkpoint file
        parse_args(["artifact-load", "--pt2", str(compiled.path("ti_tome_pt2")), "--out", str(tmp_path / "results")])
    assert exit_.value.code == 2 and not (tmp_path / "results").exists()

    metadata = read_metadata(compiled.path("ti_imagepiece_dynamic"))
    config = {**metadata["config"], "p": 0.4, "merge_ratio": 0.15, "keep_rate": 0.7}  # imagepiece_hyper
    given = {**metadata, "config": config, "precision": "bf16", "dtype": "bf16", "attention": "matmul",
             "checkpoint": {"sha256": "random", "file": None}}
    assert artifact_load.twin_problem(given) is None
    assert "checkpoint" in artifact_load.twin_problem(metadata)
    calls = []
    monkeypatch.setattr(export, "compile_artifact", lambda model, out, **options: calls.append((model, out, options)))
    artifact_load.compiled(artifact_load.twin_settings(given), ".so", tmp_path)
    ((model, out, options),) = calls
    assert (model.arch, model.num_classes) == ("deit_tiny_patch16_224", 1000)
    assert json.loads(json.dumps(model.reduction_config.to_dict())) == config
    assert options == {"dtype": "bf16", "batch": None, "max_batch": 64, "input_format": "float_nchw", "attention": "matmul",
                       "calibration_images": None}
    assert out.suffix == ".so" and out.parent == tmp_path


def test_artifact_load_refuses_one_artifact_from_a_checkpoint_with_one_line(compiled, tmp_path, capsys):
    from imagepiece.bench import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["artifact-load", "--so", str(compiled.path("ti_tome")), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--so was compiled from the checkpoint" in err and "give both --so and --pt2" in err
    assert list(tmp_path.iterdir()) == []


def test_e2e_mode_writes_files_to_rows_beside_model_only_for_both_input_formats(compiled, tmp_path):
    """The end-to-end benchmark through the CLI (issue 12): its fields, not its speed."""
    from imagepiece.bench import cli

    floats, pixels = compiled.path("ti_imagepiece"), compiled.path("ti_imagepiece_uint8")
    assert cli.main(["e2e", "--artifact", str(floats), "--uint8-artifact", str(pixels), "--images", "4", "--batch", "2",
                     "--workers", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    files = written(tmp_path)
    assert set(files) == {".txt", ".json"} and files[".json"].name.startswith("predict_e2e_deit_tiny_patch16_224_imagepiece_fp32_b2_")
    record = json.loads(files[".json"].read_text())
    result = record["result"]
    assert (result["artifact"], result["batch"], result["images"], result["image_size"]) == (str(floats), 2, 4, [500, 375])
    assert result["median_run"]["errors"] == 0 and 0 < result["decode_share"] < 1
    assert result["ratio"] == result["single_process_img_per_s"][0] / result["model_only_img_per_s"][0]
    assert result["uint8"]["artifact"] == str(pixels) and result["uint8"]["input_format"] == "uint8_nhwc"
    assert len(result["uint8"]["single_process_img_per_s"]) == 1 and "ray" not in result
    assert {"cpu", "torch"} <= set(record["machine"]) and record["settings"]["rounds"] == 1
    assert record["settings"]["arch"] == "deit_tiny_patch16_224"  # the artifact's, not --arch's default (DeiT-S)
    text = files[".txt"].read_text()
    assert text.startswith("# ") and "\n# predict end-to-end, deit_tiny_patch16_224 imagepiece fp32 (float_nchw fp32 input), batch 2" in text
    assert "single-process / model-only" in text and "uint8-input artifact" in text
    assert "goal" not in text and "goal_met" not in result  # the goal is about DeiT-S at batch 8, not this run


def test_e2e_mode_reports_no_throughput_when_images_fail(compiled, tmp_path, monkeypatch, capsys):
    """Error rows are not predictions: a run in which an image fails gives no img/s (it once reported 2109%)."""
    from imagepiece.bench import cli
    from imagepiece.predict import bench as predict_bench

    make_jpegs = predict_bench.synthetic_jpegs

    def one_truncated(folder, count, size, seed=0):
        items = make_jpegs(folder, count, size, seed)
        Path(items[-1].location).write_bytes(b"\xff\xd8\xff not a whole JPEG")
        return items

    monkeypatch.setattr(predict_bench, "synthetic_jpegs", one_truncated)
    assert cli.main(["e2e", "--artifact", str(compiled.path("ti_imagepiece")), "--images", "4", "--batch", "2", "--workers", "1",
                     "--rounds", "1", "--image-size", "40", "30", "--out", str(tmp_path)]) == 1
    assert "1 of 4 images gave error rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_two_runs_named_in_the_same_second_keep_both_records(tmp_path, monkeypatch):
    import datetime

    from imagepiece.bench import results

    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 27, 3, 56, 5)

    monkeypatch.setattr(results.datetime, "datetime", FrozenClock)
    machine = {"cpu": "Test CPU", "cpu_cores": 2, "torch_threads": 2, "torch": "2.14.1", "gpu": None}
    written = []
    for index in range(3):  # back to back, as a script runs them
        writer = results.ResultsWriter(tmp_path, "reevaluation", "deit_tiny_1img", machine=machine)
        writer.report(f"run {index}", {"run": index})
        written.append(writer.saved[0])
    assert [path.name for path in written] == ["reevaluation_deit_tiny_1img_20261127-035605.txt",
                                               "reevaluation_deit_tiny_1img_20261127-035605-2.txt",
                                               "reevaluation_deit_tiny_1img_20261127-035605-3.txt"]
    assert [path.read_text().splitlines()[1] for path in written] == ["run 0", "run 1", "run 2"]
    # At the same time: both runs looked for a free name before either wrote, and their files interleave.
    looked = set()
    unused_stem = results.ResultsWriter._unused_stem

    def looked_before_the_other_wrote(writer):
        if id(writer) in looked:
            return unused_stem(writer)
        looked.add(id(writer))
        return writer.wanted_stem

    monkeypatch.setattr(results.ResultsWriter, "_unused_stem", looked_before_the_other_wrote)
    first, second = (results.ResultsWriter(tmp_path, "precision", "deit_tiny_1img", machine=machine) for _ in range(2))
    first.text("first"), second.text("second"), second.json({"run": "second"}), first.json({"run": "first"})
    assert [path.name for path in first.saved] == ["precision_deit_tiny_1img_20261127-035605.txt", "precision_deit_tiny_1img_20261127-035605.json"]
    assert [path.name for path in second.saved] == ["precision_deit_tiny_1img_20261127-035605-2.txt",
                                                    "precision_deit_tiny_1img_20261127-035605-2.json"]
    for writer, run in ((first, "first"), (second, "second")):
        assert writer.saved[0].read_text().splitlines()[1] == run and json.loads(writer.saved[1].read_text())["run"] == run
    assert not list(tmp_path.rglob(".*"))  # no staged file left behind


def test_flop_count_includes_the_cpu_attention_kernel():
    # torch's counter had no formula for the CPU's flash attention: attention went uncounted (DeiT-S 8.48 instead of 9.20).
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from imagepiece import create_model
    from imagepiece.bench.measure import gflops_per_image

    model = create_model("deit_tiny_patch16_224", "plain")
    counted = gflops_per_image(model, (3, 224, 224), torch.device("cpu"), torch.float32)
    with sdpa_kernel(SDPBackend.MATH):  # attention as two matmuls, which the counter knows
        as_matmuls = gflops_per_image(model, (3, 224, 224), torch.device("cpu"), torch.float32)
    assert counted == pytest.approx(as_matmuls, rel=1e-9) and counted > 2.4


def test_profile_parts_are_medians_so_one_stalled_call_does_not_move_them():
    from imagepiece.bench.profiling import median_times

    runs = [{"aten::linear": 10.0, "cpp_fused_add_0": 2.0}, {"aten::linear": 11.0, "cpp_fused_add_0": 50.0},
            {"aten::linear": 12.0}]  # run 2: the host stalled in a kernel; run 3: that kernel did not record
    parts = median_times(runs)
    assert parts["linear"] == 11.0 and parts["generated kernels"] == 2.0
    assert parts["total"] == 12.0  # the median of the three runs' totals (12, 61, 12), not a sum of medians
    assert median_times(runs, key=lambda event: event)["cpp_fused_add_0"] == 2.0


def test_profile_groups_gpu_kernels_and_reports_launches_per_call():
    """GPU kernel names as torch.profiler reports them for AOTI artifacts (cuBLAS/CUTLASS GEMMs, flash attention,
    CUB sorts, Triton kernels) fall into the same parts as the CPU's events; launches get their own row."""
    import argparse

    from imagepiece.bench.profiling import format_report, group_of, median_times

    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "linear", "nvjet_tst_128x64_64x8_h_bz_TNT": "linear",
             "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16>(Params)": "linear",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>(Flash_fwd_params)": "attention (SDPA)",
             "void at::native::(anonymous namespace)::fmha_cutlassF_bf16_aligned_64x64_rf_sm80(Params)": "attention (SDPA)",
             "void cub::DeviceRadixSortOnesweepKernel<Policy, false, float, long>(...)": "sort",
             "triton_per_fused_add_native_layer_norm_3": "generated kernels", "triton_poi_fused_gather_12": "generated kernels",
             "void at::native::elementwise_kernel<128, 4>(...)": "other (allocation, views, copies, wrapper)",
             "aoti_torch_cpu_bmm_out": "batched matmul (bmm)",
             # the patchify is no GEMM: "mkl" (oneMKL's GEMMs) also matched oneDNN's "mkldnn" convolution
             "aoti_torch_cpu_mkldnn__convolution_pointwise": "convolution (patchify)", "aoti_torch_cpu__linear_pointwise": "linear",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution (patchify)",
             "graph_0_cpp_fused_convolution_0": "generated kernels"}
    assert {name: group_of(name) for name in names} == names
    samples = {"plain": [{"sm90_xmma_gemm_a": 2.0, "triton_poi_fused_0": 1.0}] * 3,
               "imagepiece": [{"sm90_xmma_gemm_a": 1.0, "triton_poi_fused_0": 1.5, "void cub::DeviceRadixSortOnesweepKernel": 0.5}] * 3}
    args = argparse.Namespace(arch="deit_small_patch16_224", preset="imagepiece", batch=1, runs=3, top_kernels=0, device="cuda", dtype="bf16")
    parts = {name: median_times(runs) for name, runs in samples.items()}
    lines = format_report(args, {"plain": 9.2, "imagepiece": 4.7}, parts, samples,
                          {"plain": [80, 81, 80], "imagepiece": [410, 400, 405]}).splitlines()
    assert "cuda bf16" in lines[0] and "GPU kernel time" in lines[0]
    assert next(line for line in lines if line.startswith("kernel launches per call")).split()[-3:] == ["80", "405", "0.20x"]
    assert next(line for line in lines if line.startswith("sort")).split()[1:] == ["0.00", "0.50", "-"]  # a part plain DeiT lacks: no ratio


def test_profile_mode_measures_real_artifacts_and_lists_their_slowest_events(compiled):
    """The profile's measuring and report on two compiled artifacts. The CLI compiles its own with Inductor's kernel
    profiling on, so that each GEMM and generated kernel records itself; these record only their ATen calls."""
    import argparse

    from imagepiece.bench.profiling import format_report, median_times, profile_interleaved

    paths = {"plain": compiled.path("ti_plain"), "imagepiece": compiled.path("ti_imagepiece")}
    samples, launches = profile_interleaved(paths, batch=2, runs=2)
    assert [len(runs) for runs in samples.values()] == [2, 2] and all(run for runs in samples.values() for run in runs)
    assert launches == {}  # kernel launches are counted on a GPU only
    args = argparse.Namespace(arch="deit_tiny_patch16_224", preset="imagepiece", batch=2, runs=2, top_kernels=3, device="cpu", dtype="fp32")
    parts = {name: median_times(runs) for name, runs in samples.items()}
    lines = format_report(args, {"plain": 1.26, "imagepiece": 0.66}, parts, samples).splitlines()
    assert "ratio 1.91x" in lines[1]
    total = next(line for line in lines if line.startswith("total")).split()
    assert float(total[1]) > 0 and float(total[2]) > 0
    for preset in ("plain", "imagepiece"):
        start = lines.index(f"{preset}: top 3 events by median self ms")
        listed = [float(line.split()[0]) for line in lines[start + 1:start + 4]]
        assert listed == sorted(listed, reverse=True) and listed[0] > 0


def test_suite_plot_refuses_no_rows_and_skips_nothing_else(tmp_path):
    from imagepiece.bench import report

    with pytest.raises(ValueError, match="no rows to plot"):
        report.plot([], tmp_path / "empty.png", {})
    assert not (tmp_path / "empty.png").exists()


def test_precision_pads_a_short_last_chunk_to_a_compiled_contenders_static_batch(monkeypatch):
    """--images 3 --batch 2: a static batch-2 artifact gets the last image padded to 2, and only its logits back."""
    import argparse

    import torch

    from imagepiece import create_model
    from imagepiece.bench import precision

    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", "plain")
    seen = []

    def static_batch_of_two(contender, copied, folder, batch, calibration):
        def run(images):
            seen.append(images.shape[0])
            if images.shape[0] != batch:
                raise RuntimeError(f"batch {images.shape[0]} is outside the artifact's batch range (exactly {batch})")
            with torch.inference_mode():
                return copied(images)
        return run

    monkeypatch.setattr(precision, "compiled_runner", static_batch_of_two)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(seed=0, calibration=None)
    result = precision.measure(model, "ip_runtime_int8", images, 2, Path("unused"), args)
    assert seen == [2, 2] and result["images"] == 3 and result["top1_agree"] == 3  # the same model: no deviation
    assert result["max_abs_logit_diff"] < 1e-4


def test_precision_calibration_folder_is_checked_before_the_run(tmp_path, capsys):
    from imagepiece.bench import cli

    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("no image")
    (other / "broken.jpg").write_bytes(b"not a jpeg")
    one = tmp_path / "one"
    one.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(one / "a.png")
    for folder, batch, message in [(empty, 1, "holds no image files"), (other, 1, "broken.jpg' cannot be used"),
                                   (one, 8, "holds 1 image file(s); calibrating a batch-8 artifact needs at least 8")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["precision", "--contenders", "ip_runtime_int8", "--calibration", str(folder), "--batch", str(batch),
                      "--out", str(tmp_path / "results")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and "error: --calibration: " in err and message in err, err
        assert not (tmp_path / "results").exists()


def test_repeated_list_values_are_measured_once(tmp_path):
    """A value given twice would be timed twice, overwrite its own row or collide with its own folder."""
    from imagepiece.bench.cli import parse_args

    out = ["--out", str(tmp_path)]
    assert parse_args(["serve", "--concurrency", "2", "2", "4", *out]).concurrency == [2, 4]
    assert parse_args(["reevaluation", "--weights", "sharpened", "timm-init", "sharpened", *out]).weights == ["sharpened", "timm-init"]
    assert parse_args(["compile", "--batch", "8", "1", "8", *out]).batch == [8, 1]
    assert parse_args(["overhead", "--batch", "1", "1", *out]).batch == [1]
    assert parse_args(["tuning", "--tunings", "default", "march-native", "default", *out]).tunings == ["default", "march-native"]
    args = parse_args(["contention", "--neighbours", "1", "0", "1", "--settings", "passive", "passive", *out])
    assert (args.neighbours, args.settings) == ([1, 0], ["passive"])
    args = parse_args(["precision", "--contenders", "fp32_noise", "fp32_noise", "--weights", "sharpened", "sharpened", *out])
    assert (args.contenders, args.weights) == (["fp32_noise"], ["sharpened"])
    assert list(tmp_path.iterdir()) == []  # the machine's folder is made with the first file, not by a check


def test_serve_feeds_each_artifact_the_images_it_takes(compiled):
    """A uint8-input artifact gets uint8 [H, W, C] pixels (it had fp32 images cast by a dtype it has none of)."""
    import ip_runtime
    import torch

    from imagepiece.bench.serving import request_images

    runtime = ip_runtime.Runtime(str(compiled.path("ti_imagepiece_uint8")), device="cpu")
    images = request_images(runtime.info, 3)
    assert len(images) == 3 and all(image.dtype == torch.uint8 and image.shape == (224, 224, 3) for image in images)
    assert runtime.run(torch.stack(images[:2])).shape == (2, 1000)
    assert all(torch.equal(a, b) for a, b in zip(images, request_images(runtime.info, 3)))  # the same every run
    floats = request_images({"input_format": "float_nchw", "dtype": "bf16", "input_shape": [3, 224, 224]}, 1)
    assert floats[0].dtype == torch.bfloat16 and floats[0].shape == (3, 224, 224)


def test_artifact_results_are_named_after_the_preset_the_config_matches():
    """imagepiece_hyper and imagepiece_sum artifacts share the method "imagepiece": the config tells them apart, and
    only the default setting gets the e2e goal's verdict."""
    import argparse

    from imagepiece.bench.artifact_option import CUSTOM, name_after_artifact, preset_of
    from imagepiece.config import PRESETS, ReductionConfig
    from imagepiece.predict.bench import goal_applies

    def metadata(preset=None, arch="deit_small_patch16_224", precision="fp32", **fields):
        config = ReductionConfig(**{**PRESETS[preset or "imagepiece"], **fields}, depth=12, num_patches=196).to_dict()
        return {"arch": arch, "method": config["method"], "config": json.loads(json.dumps(config)), "dtype": "fp32",
                "precision": precision}

    assert {name: preset_of(metadata(name)) for name in PRESETS} == {name: name for name in PRESETS}
    assert preset_of(metadata("imagepiece", keep_rate=0.75)) == CUSTOM
    args = argparse.Namespace(arch="deit_small_patch16_224", preset="imagepiece")
    name_after_artifact(args, metadata("imagepiece_sum", arch="deit_tiny_patch16_224"))
    assert (args.arch, args.preset) == ("deit_tiny_patch16_224", "imagepiece_sum")
    assert goal_applies(metadata("imagepiece"), 8)
    assert not any([goal_applies(metadata("imagepiece_hyper"), 8), goal_applies(metadata("imagepiece", keep_rate=0.75), 8),
                    goal_applies(metadata("imagepiece", precision="int8"), 8), goal_applies(metadata("imagepiece"), 4)])


def test_cold_inductor_cache_moves_the_precompiled_headers_too(tmp_path):
    import functools

    from torch._inductor import codecache

    from imagepiece.bench.tuning import inductor_cache

    before = (codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR)
    calls = []
    remembered = functools.cache(lambda header: calls.append(header) or f"{codecache._HEADER_DIR}/{header}")
    original, codecache._precompile_header = codecache._precompile_header, remembered
    try:
        remembered("warm.h")  # a header built before the cold compile, in the user's cache
        with inductor_cache(tmp_path / "cold"):
            assert codecache._HEADER_DIR == str(tmp_path / "cold" / "precompiled_headers")
            assert codecache._HEADER_LOCK_DIR == str(tmp_path / "cold" / "precompiled_headers" / "locks")
            assert remembered("warm.h").startswith(str(tmp_path / "cold"))  # built afresh, not the remembered one
        assert (codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR) == before
        assert remembered("warm.h").startswith(before[0]) and len(calls) == 3  # not the deleted folder's
    finally:
        codecache._precompile_header = original


def test_a_cpu_run_is_filed_under_the_cpu_and_a_cuda_run_under_its_gpu(tmp_path, monkeypatch):
    import torch

    from imagepiece import environment
    from imagepiece.bench import results

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA H{100 + (device or 0)}")
    cpu = environment.machine_info("cpu")
    assert cpu["gpu"] is None and environment.machine_slug(cpu).endswith(f"-{os.cpu_count()}core")
    assert environment.machine_info("cuda:1")["gpu"] == "NVIDIA H101" and environment.machine_info("cuda:0")["gpu"] == "NVIDIA H100"
    writer = results.ResultsWriter(tmp_path, "suite", "deit_tiny_cpu", device="cpu")
    assert writer.folder.name == environment.machine_slug(cpu) and "no GPU used" in writer.provenance
    assert results.ResultsWriter(tmp_path, "suite", "deit_tiny_cuda", device="cuda:1").folder.name == "nvidia-h101"
    assert list(tmp_path.iterdir()) == []  # no folder until a file is written
    writer.text("a result")
    assert [path.name for path in tmp_path.iterdir()] == [writer.folder.name]


def test_a_file_in_the_machines_place_is_refused_before_the_run(tmp_path, capsys):
    from imagepiece.bench import cli
    from imagepiece.environment import machine_info, machine_slug

    blocking = tmp_path / machine_slug(machine_info("cpu"))
    blocking.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reevaluation", "--arch", "deit_tiny_patch16_224", "--images", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].endswith(f"results folder {str(blocking)!r} is a file, not a folder")


def test_a_run_stopped_between_its_files_leaves_none_of_them(tmp_path, monkeypatch, capsys):
    """A record is whole or absent: Ctrl-C after the csv and before the plot takes the csv back."""
    from imagepiece.bench import cli, results

    def writes_then_stopped(args):
        results.ResultsWriter(args.out, "reevaluation", "stopped", device="cpu").text("the first of the run's files")
        raise KeyboardInterrupt

    earlier = results.ResultsWriter(tmp_path, "reevaluation", "finished", device="cpu").text("an earlier run's record")
    monkeypatch.setattr(cli.MODES["reevaluation"], "run", writes_then_stopped)
    assert cli.main(["reevaluation", "--out", str(tmp_path)]) == 130
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == [earlier]  # another run's record stays
    assert "reevaluation interrupted; its child processes and temporary files are gone, its results were not written" in \
        capsys.readouterr().err
