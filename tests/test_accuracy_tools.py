"""scripts/finetune.py, evaluate.py and visualize.py on tiny synthetic data (no ImageNet here)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ip_runtime

from imagepiece import create_model
from imagepiece.config import PRESETS
from imagepiece.pieces import panel_origin, piece_maps
from imagepiece.termination import Terminated, _raise_terminated
from image_files import huge_png
from inputs import write_image_folder
from script_runs import ROOT, call_script, load_script, run_script

ARCH = "deit_tiny_patch16_224"
# Small, deterministic and fast: no mixup/augmentation, so a handful of steps must lower the loss.
TRAIN = ["--arch", ARCH, "--lr", "1e-3", "--batch-size", "8", "--mixup", "0", "--cutmix", "0", "--smoothing", "0",
         "--auto-augment", "none", "--re-prob", "0", "--epochs", "3", "--workers", "0", "--save-every", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root / "train", per_class=8, seed=0)
    write_image_folder(root / "val", per_class=6, seed=1)
    return root


@pytest.fixture(scope="module")
def finetuned(dataset, tmp_path_factory):
    """A 4-class DeiT-Ti ImagePiece trained for 8 steps: (run folder, checkpoint)."""
    run = tmp_path_factory.mktemp("run")
    result = run_script("finetune", "--data", dataset, "--output", run, "--max-steps", "8", *TRAIN)
    assert result.returncode == 0, result.stderr
    return run, run / "last.pth"


def step_losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_few_steps_reduce_the_loss(finetuned):
    losses = step_losses(finetuned[0])
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2, losses


def test_resumed_training_continues_exactly_where_it_stopped(dataset, finetuned, tmp_path):
    first = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "5", *TRAIN)
    assert first.returncode == 0, first.stderr
    with open(tmp_path / "log.jsonl", "a") as log:  # as if killed after two more steps than it saved, mid-line
        log.write('{"step": 6, "loss": 9.0}\n{"step": 7, "loss": 9.0}\n{"step": 8, "lo')
    second = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "8", *TRAIN)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step 5" in second.stdout
    assert [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r] == list(range(1, 9))
    straight, resumed = torch.load(finetuned[1]), torch.load(tmp_path / "last.pth")
    assert straight["global_step"] == resumed["global_step"] == 8
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert not list(tmp_path.glob(".*.partial*"))  # no staged file left behind


def test_a_resumed_epoch_logs_the_mean_loss_of_all_its_steps(dataset, tmp_path):
    # 4 steps per epoch: the first run stops after step 6, in the second epoch; the resumed one ends that epoch.
    assert run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "6", *TRAIN).returncode == 0
    resumed = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "9", *TRAIN)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    second_epoch = [r["loss"] for r in records if "loss" in r and r["epoch"] == 1]
    summary = [r for r in records if "train_loss" in r and r["step"] == 8]
    assert len(second_epoch) == 4 and len(summary) == 1, records
    assert summary[0]["train_loss"] == pytest.approx(sum(second_epoch) / 4)


# Mixup: batches of an even size, the last partial one dropped; 2 images a batch, so one that does not decode
# leaves an odd one, and the batch is consumed without a step.
MIXUP_PAIRS = [*TRAIN[:-6], "--mixup", "0.8", "--batch-size", "2", "--epochs", "2", "--workers", "0", "--save-every", "1000"]


def test_a_resumed_run_skips_the_same_batches_as_an_uninterrupted_one(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for image in (data / "train" / "class_002").glob("*.png"):  # 8 of 32: batches without a step early in the epoch
        image.write_bytes(b"not an image")
    straight = run_script("finetune", "--data", data, "--output", tmp_path / "straight", "--max-steps", "8", *MIXUP_PAIRS)
    first = run_script("finetune", "--data", data, "--output", tmp_path / "resumed", "--max-steps", "4", *MIXUP_PAIRS)
    assert straight.returncode == first.returncode == 0, straight.stderr + first.stderr
    assert "class_002" in first.stdout + first.stderr, "a batch before step 4 was skipped"
    second = run_script("finetune", "--data", data, "--output", tmp_path / "resumed", "--max-steps", "8", *MIXUP_PAIRS)
    assert second.returncode == 0, second.stderr
    straight, resumed = torch.load(tmp_path / "straight" / "last.pth"), torch.load(tmp_path / "resumed" / "last.pth")
    assert straight["global_step"] == resumed["global_step"] == 8 == straight["step_in_epoch"]  # still the first epoch
    assert straight["batches_in_epoch"] == resumed["batches_in_epoch"] > 8
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_a_run_stopped_at_an_epochs_last_step_resumes_into_the_next_epoch(dataset, tmp_path):
    # 32 images in pairs with 6 a batch: 5 steps an epoch, 2 images left over that make no batch.
    flags = [*MIXUP_PAIRS[:-8], "--batch-size", "6", "--epochs", "2", "--workers", "0", "--save-every", "1000"]
    first = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "5", *flags)
    # --max-steps at the epoch's last step: the epoch ends (validated, best.pth) before the run stops
    assert first.returncode == 0 and "after epoch 1 of 2" in first.stdout and (tmp_path / "best.pth").exists(), first.stdout
    resumed = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", "6", *flags)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val_top1" in r] == [1]  # the first epoch's end, logged once
    assert torch.load(tmp_path / "last.pth")["epoch"] == 1 and [r["step"] for r in records if "loss" in r][-1] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_resumes(dataset, tmp_path):
    # Its RNG states must be restored from CPU tensors, whatever device the run trains on.
    for steps in ("1", "2"):
        result = run_script("finetune", "--data", dataset, "--output", tmp_path, "--max-steps", steps, *TRAIN, "--device", "cuda")
        assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and torch.load(tmp_path / "last.pth")["global_step"] == 2


def test_a_fresh_run_is_refused_where_an_earlier_run_left_its_best_checkpoint(dataset, finetuned, tmp_path, capsys):
    # e.g. last.pth deleted to save disk: starting over there would cut the log and replace best.pth at its first epoch
    torch.save({**torch.load(finetuned[0] / "best.pth"), "epoch": 2}, tmp_path / "best.pth")  # a run past its first epoch
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "step": 4, "val_top1": 50.0}\n')
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--max-steps", "1", *TRAIN)
    assert result.returncode == 2 and "holds best.pth of an earlier run but no last.pth" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pth", "log.jsonl"]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
    # This command's own first epoch, killed between saving best.pth and last.pth: it starts over.
    first_epoch = {**torch.load(tmp_path / "best.pth"), "epoch": 1}
    torch.save(first_epoch, tmp_path / "best.pth")
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--max-steps", "1", *TRAIN)
    assert result.returncode == 0 and (tmp_path / "last.pth").exists(), result.stderr


def test_a_class_folder_name_that_is_not_utf8_is_refused_before_training(dataset, tmp_path, capsys):
    # The names are recorded in checkpoints and then in an artifact's UTF-8 metadata: refused before, not after, the work.
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for split in ("train", "val"):
        os.rename(bytes(data / split / "class_000"), bytes(data / split) + b"/class_\xff")
    result = call_script("finetune", capsys, "--data", data, "--output", tmp_path / "run", *TRAIN)
    assert result.returncode == 2 and "class folder b'class_\\xff' is not a UTF-8 name" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    # A checkpoint that recorded one (an older fine-tune) is refused by the compile before it exports anything.
    from imagepiece.export import _fine_tuned_class_names
    from imagepiece.weights import CheckpointError

    torch.save({"arch": ARCH, "lcb": None, "num_classes": 2, "classes": ["a", "class_\udcff"]}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="records the class folder b'class_\\\\xff', which is not a UTF-8 name"):
        _fine_tuned_class_names(tmp_path / "old.pth", 2)


def test_rerunning_a_finished_max_steps_run_trains_nothing(dataset, finetuned, tmp_path, capsys):
    run, _ = finetuned  # stopped at --max-steps 8
    before = torch.load(run / "last.pth")["global_step"]
    again = call_script("finetune", capsys, "--data", dataset, "--output", run, "--max-steps", "8", *TRAIN)
    assert again.returncode == 0 and "nothing to train" in again.stdout, again.stdout + again.stderr
    assert torch.load(run / "last.pth")["global_step"] == before == 8


@pytest.fixture(scope="module")
def artifact(finetuned, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifact") / "my models"
    folder.mkdir()
    # A relative --out, as the README writes it (Inductor compiles in its own folder: a relative path once broke there),
    # in a folder with a space in its name (Inductor's compiler command line is split unquoted: that broke too).
    # Only --checkpoint names the model: its arch, preset, LCB and head are what the fine-tune recorded.
    result = run_script("aot_compile", "--checkpoint", finetuned[1], "--device", "cpu", "--batch", "4", "--out", "ti 4class.so",
                        cwd=folder)
    assert result.returncode == 0, result.stderr
    assert f"model: {ARCH}.imagepiece (imagepiece) with checkpoint" in result.stdout and "warning" not in result.stderr
    assert [path.name for path in folder.iterdir()] == ["ti 4class.so"], "no temporary folder left beside it"
    return folder / "ti 4class.so"


def test_the_cpp_example_shows_as_many_classes_as_a_small_head_has(artifact, classify_app):
    result = subprocess.run([str(classify_app), str(artifact), "--repeats", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shown = [re.findall(r" (\d+) \(", line) for line in result.stdout.splitlines() if line.startswith("image ")]
    assert len(shown) == 4 and all(sorted(classes) == ["0", "1", "2", "3"] for classes in shown), result.stdout


def test_predict_names_a_fine_tuned_heads_classes_after_its_class_folders(dataset, artifact, tmp_path, capsys):
    from imagepiece.artifact import read_metadata
    from imagepiece.predict.cli import main as predict
    from imagepiece.predict.writers import read_rows

    # aot_compile copied them from the fine-tune's checkpoint, in label order.
    assert read_metadata(artifact)["class_names"] == ["class_000", "class_001", "class_002", "class_003"]
    assert ip_runtime.Runtime(str(artifact)).info["metadata"]["class_names"] == read_metadata(artifact)["class_names"]  # Ray, serve
    images = sorted((dataset / "val" / "class_002").iterdir())[:2]
    # No --topk: the default 5 becomes the head's 4 classes (it once refused the run: "--topk 5 is more than ...").
    assert predict(["--artifact", str(artifact), "--input", str(images[0].parent), "--output", str(tmp_path / "p.csv"),
                    "--no-progress"]) == 0
    assert "no --labels" not in capsys.readouterr().err
    rows = read_rows(tmp_path / "p.csv")
    assert rows and all(row.labels == [f"class_{index:03d}" for index in row.classes] and len(row.classes) == 4 for row in rows)
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")  # --labels still wins
    assert predict(["--artifact", str(artifact), "--input", str(images[0]), "--output", str(tmp_path / "q.csv"), "--topk", "1",
                    "--labels", str(tmp_path / "labels.txt"), "--no-progress"]) == 0
    assert read_rows(tmp_path / "q.csv")[0].labels == ["abcd"[read_rows(tmp_path / "q.csv")[0].classes[0]]]


def test_evaluate_gives_the_same_numbers_eager_and_through_the_runtime(dataset, finetuned, artifact, tmp_path):
    # 22 images in batches of 4: the static-batch artifact must pad the last batch of 2.
    common = ["--data", dataset / "val", "--limit", "22", "--workers", "0", "--device", "cpu"]
    eager = run_script("evaluate", *common, "--arch", ARCH, "--preset", "imagepiece", "--lcb", "residual", "--num-classes", "4",
                       "--checkpoint", finetuned[1], "--batch", "4", "--json", tmp_path / "eager.json")
    compiled = run_script("evaluate", *common, "--artifact", artifact, "--json", tmp_path / "compiled.json")
    assert eager.returncode == 0, eager.stderr
    assert compiled.returncode == 0, compiled.stderr
    eager_result, compiled_result = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("eager", "compiled"))
    assert eager_result["images"] == compiled_result["images"] == 22
    assert (eager_result["top1"], eager_result["top5"]) == (compiled_result["top1"], compiled_result["top5"])
    assert eager_result["top5"] == 100.0 and eager_result["top_k"] == 4  # 4 classes: top-5 holds every class
    assert "top-5 (all 4 classes) 100.00%" in eager.stdout
    assert "ip_runtime" in compiled_result["model"] and compiled_result["preprocessing"]["interpolation"] == "bicubic"
    assert eager_result["settings"]["limit"] == 22 and eager_result["settings"]["lcb"] == "residual"
    assert eager_result["settings"]["checkpoint"] == str(finetuned[1]) and compiled_result["settings"]["artifact"] == str(artifact)
    assert eager_result["files"] == compiled_result["files"] == 24


def test_evaluate_names_and_skips_a_corrupt_file_instead_of_scoring_its_neighbour(dataset, finetuned, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(dataset / "val", val)
    corrupt = sorted((val / "class_001").iterdir())[0]
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    result = call_script("evaluate", capsys, "--data", val, "--arch", ARCH, "--preset", "imagepiece", "--lcb", "residual",
                         "--num-classes", "4", "--checkpoint", finetuned[1], "--workers", "0", "--device", "cpu",
                         "--json", tmp_path / "result.json")
    assert result.returncode == 0, result.stderr
    assert f"skipped {corrupt}" in result.stderr and "1 unreadable files skipped" in result.stdout
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["images"] == 23 and [entry["path"] for entry in saved["unreadable"]] == [str(corrupt)]


@pytest.mark.parametrize("model", ["checkpoint", "artifact"])
def test_evaluate_refuses_a_fine_tune_of_other_class_folders(dataset, finetuned, artifact, tmp_path, capsys, model):
    val = tmp_path / "val"
    shutil.copytree(dataset / "val", val)
    (val / "class_001").rename(val / "zebra")  # the same count: its head would score them by position
    given = ["--artifact", artifact] if model == "artifact" else ["--arch", ARCH, "--lcb", "residual", "--num-classes", "4",
                                                                  "--checkpoint", finetuned[1]]
    result = call_script("evaluate", capsys, "--data", val, *given, "--workers", "0", "--device", "cpu")
    assert result.returncode == 2 and "fine-tuned on other class folders" in result.stderr and "'zebra'" in result.stderr, result.stderr


@pytest.mark.parametrize("model", ["artifact", "artifact without class names", "eager"])
def test_evaluate_names_a_hidden_folder_that_timm_counts_as_a_class(dataset, artifact, tmp_path, capsys, monkeypatch, model):
    val = tmp_path / "val"
    shutil.copytree(dataset / "val", val)
    (val / ".ipynb_checkpoints").mkdir()  # a notebook's autosave: timm makes a fifth class of it
    shutil.copy(val / "class_000" / "0.png", val / ".ipynb_checkpoints" / "0-checkpoint.png")
    if model == "artifact without class names":  # e.g. compiled from a checkpoint of another trainer
        evaluate = load_script("evaluate")
        recorded = evaluate.read_metadata
        monkeypatch.setattr(evaluate, "read_metadata", lambda path: {**recorded(path), "class_names": None})
    given = ["--arch", ARCH, "--num-classes", "4"] if model == "eager" else ["--artifact", artifact]
    result = call_script("evaluate", capsys, "--data", val, *given, "--workers", "0", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    if model == "artifact":  # the class folders it was trained on: the difference names the folder
        assert "only here: ['.ipynb_checkpoints']" in result.stderr, result.stderr
    else:
        assert "has 5 classes, including hidden folder(s) '.ipynb_checkpoints'" in result.stderr, result.stderr
        # --num-classes is refused beside --artifact: the advice for an artifact is another artifact
        assert ("--num-classes" in result.stderr) == (model == "eager") and ("aot_compile.py" in result.stderr) == (model != "eager")


def test_evaluate_refuses_a_json_inside_the_data_folder(tmp_path, capsys):
    write_image_folder(tmp_path / "val", classes=2, per_class=2, size=16)
    image = tmp_path / "val" / "class_000" / "0.png"
    pixels = image.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path / "val" / "class_000")  # the same folder under a name outside --data
    for json_path in (image, tmp_path / "link" / "0.png", tmp_path / "val" / "result.json"):
        result = call_script("evaluate", capsys, "--data", tmp_path / "val", "--arch", ARCH, "--num-classes", "2", "--workers", "0",
                             "--device", "cpu", "--json", json_path)
        assert result.returncode == 2 and result.stdout == "", result.stdout  # before any work
        assert result.stderr == (f"evaluate.py: error: output {str(json_path)!r} lies inside the --data folder {str(tmp_path / 'val')!r}: "
                                 "writing it would change that input; write it elsewhere\n")
    assert image.read_bytes() == pixels and not (tmp_path / "val" / "result.json").exists()


def test_evaluate_applies_max_pixels_in_its_loader_workers(tmp_path, capsys):
    # The worker decodes in another process: a limit set only in this one would let every image through.
    write_image_folder(tmp_path / "val", classes=2, per_class=2, size=64)
    result = call_script("evaluate", capsys, "--data", tmp_path / "val", "--arch", ARCH, "--num-classes", "2", "--workers", "1",
                         "--device", "cpu", "--max-pixels", "1000")
    assert result.returncode == 1 and "none of the 4 files decoded" in result.stderr, result.stderr
    assert result.stderr.count("image is 64x64 = 4,096 pixels, over the limit of 1,000: refused before decoding "
                               "(decompression-bomb guard; --max-pixels raises it)") == 4, result.stderr


@pytest.mark.parametrize("stop, status, said", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")])
@pytest.mark.parametrize("script", ["evaluate", "visualize"])
def test_a_stop_while_the_model_is_built_is_one_line(dataset, tmp_path, capsys, monkeypatch, script, stop, status, said):
    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(load_script(script), "create_model", stopped)
    given = (["--data", dataset / "val", "--num-classes", "4", "--workers", "0", "--device", "cpu", "--json", tmp_path / "r.json"]
             if script == "evaluate" else ["--synthetic", "--out", tmp_path / "r.png"])
    result = call_script(script, capsys, "--arch", ARCH, *given)
    assert result.returncode == status and result.stderr == f"{script}.py: {said}; nothing written\n", result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, required", [("evaluate", ["--data", "val"]), ("visualize", ["--synthetic", "--out", "x.png"]),
                                              ("finetune", ["--data", "data", "--output", "run"])])
def test_a_usage_error_is_one_line(capsys, script, required):
    for args, said in ((["--no-such-flag"], "the following arguments are required:"),
                       ([*required, "--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        result = call_script(script, capsys, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage:" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"{script}.py: error: {said}") and "(see --help)" in result.stderr, result.stderr


def test_evaluate_stopped_by_sigterm_to_its_process_group_says_one_line(tmp_path):
    """Docker (tini -g), systemd and scancel signal the whole group: the loader's workers get SIGTERM too."""
    write_image_folder(tmp_path / "val", classes=4, per_class=100, size=64)  # 200 batches of 2: still evaluating when killed
    stdout, stderr = (open(tmp_path / name, "w+") for name in ("stdout", "stderr"))
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--data", str(tmp_path / "val"), "--arch", ARCH,
               "--num-classes", "4", "--workers", "2", "--batch", "2", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        # Until a batch has been evaluated: the workers are past their start-up, and decoding.
        deadline = time.monotonic() + 600
        while (not re.search(r"\b[1-9]\d*/400 \[", (tmp_path / "stderr").read_text()) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert process.poll() is None, f"finished before it was stopped: {(tmp_path / 'stderr').read_text()}"
        os.killpg(process.pid, signal.SIGTERM)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        stdout.close()
        stderr.close()
    said = (tmp_path / "stderr").read_text()
    assert status == 143 and said.endswith("evaluate.py: terminated; nothing written\n") and "Traceback" not in said, said
    deadline = time.monotonic() + 30
    with pytest.raises(ProcessLookupError):  # no worker outlives it (one that ignored SIGTERM once did, and held its exit)
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.1)


def test_a_sigterm_stop_hears_no_more_of_its_childrens_deaths():
    """PyTorch's SIGCHLD handler raised the loader's workers' deaths (of the same group SIGTERM) over the stop."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGCHLD)}
    signal.signal(signal.SIGCHLD, lambda signum, frame: pytest.fail("a child's death was still heard"))
    try:
        with pytest.raises(Terminated):
            _raise_terminated(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_evaluate_and_visualize_use_the_fine_tunes_token_reduction_and_warn_when_told_otherwise(dataset, finetuned, tmp_path, capsys):
    saved = torch.load(finetuned[1], weights_only=True)
    assert saved["preset"] == "imagepiece" and saved["reduction"]["method"] == "imagepiece"
    # An older fine-tune recorded only its preset: ToMe here.
    torch.save({**{k: v for k, v in saved.items() if k != "reduction"}, "preset": "tome"}, tmp_path / "tome.pth")
    common = ["--data", dataset / "val", "--limit", "4", "--batch", "4", "--workers", "0", "--device", "cpu", "--arch", ARCH,
              "--lcb", "residual", "--num-classes", "4"]
    result = call_script("evaluate", capsys, *common, "--checkpoint", tmp_path / "tome.pth")
    assert result.returncode == 0 and f"eager {ARCH} tome" in result.stdout and "warning" not in result.stderr, result.stderr
    # Without the model flags: each is the fine-tune's (DeiT-Ti, LCB residual, 4 classes), not DeiT-S's.
    result = call_script("evaluate", capsys, *common[:common.index("--arch")], "--checkpoint", tmp_path / "tome.pth")
    assert result.returncode == 0 and f"eager {ARCH} tome" in result.stdout and "(4 classes)" in result.stdout, result.stderr
    result = call_script("visualize", capsys, "--synthetic", "--checkpoint", tmp_path / "tome.pth", "--blocks", "0",
                         "--out", tmp_path / "recorded.png")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    result = call_script("evaluate", capsys, *common, "--checkpoint", finetuned[1], "--preset", "evit")
    assert result.returncode == 0, result.stderr
    assert ("was fine-tuned with imagepiece token reduction (--preset imagepiece); this model has method 'evit' "
            "(trained: 'imagepiece'), keep_rate 0.7 (trained: 0.8)") in result.stderr
    result = call_script("visualize", capsys, "--synthetic", "--arch", ARCH, "--checkpoint", tmp_path / "tome.pth", "--lcb", "residual",
                         "--num-classes", "4", "--preset", "imagepiece_hyper", "--blocks", "0", "--out", tmp_path / "pieces.png")
    assert result.returncode == 0 and "was fine-tuned with tome token reduction (--preset tome); this model has method" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/val"], "does not exist"),
        (["--data", "{empty}"], "holds no images"),
        (["--data", "{val}"], "has 4 classes but the model head has 1000"),
        (["--data", "{val}", "--artifact", "{artifact}", "--interpolation", "bilinear"], "compiled for other preprocessing"),
        (["--data", "{val}", "--artifact", "{root}/missing.so"], "does not exist"),
        (["--data", "{val}", "--json", "/sys/kernel/result.json"], "not writable"),
        (["--data", "{val}", "--batch", "0"], "--batch and --limit must be >= 1"),
        (["--data", "{val}", "--json", "{root}"], "is a folder; give a file name"),
        (["--data", "{val}", "--artifact", "{artifact}", "--json", "{artifact}"], "is the --artifact file: writing it would replace"),
        (["--data", "{val}", "--crop-pct", "0"], "--crop-pct must be in [0.05, 1]"),
        (["--data", "{val}", "--crop-pct", "nan"], "--crop-pct must be in [0.05, 1]"),
        (["--data", "{val}", "--crop-pct", "0.0001"], "--crop-pct must be in [0.05, 1]"),  # every image would fail to resize
        (["--data", "{val}", "--std", "0.2", "0", "0.2"], "--std finite and > 0"),
        (["--data", "{val}", "--std", "1e-300", "1", "1"], "--std finite and > 0, in float32"),  # 0 in float32
        (["--data", "{val}", "--mean", "1e308", "0", "0"], "--mean must be finite"),  # inf in float32
        (["--data", "{val}", "--device", "bogus"], "is not a device"),
        (["--data", "{val}", "--device", "meta"], "is not available here"),
        (["--data", "{val}", "--num-classes", "0"], "--num-classes must be >= 1"),
        (["--data", "{val}", "--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
        (["--data", "{val}", "--artifact", "{artifact}", "--num-classes", "4"], "an --artifact has its model, weights and head inside"),
        (["--data", "{val}", "--artifact", "{artifact}", "--preset", "tome", "--lcb", "stem"], "--preset, --lcb describe the eager model"),
    ],
)
def test_evaluate_bad_input(dataset, artifact, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fields = {"empty": tmp_path / "empty", "val": dataset / "val", "artifact": artifact, "root": tmp_path}
    eager = [] if "--artifact" in args else ["--arch", ARCH]
    result = call_script("evaluate", capsys, *eager, "--workers", "0", *[a.format(**fields) for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent", "--output", "{tmp}/run"], "does not exist"),
        (["--data", "{data}", "--output", "/sys/kernel/run", "--batch-size", "8"], "not writable"),
        (["--data", "{data}", "--output", "{tmp}/run", "--batch-size", "64"], "fewer than one batch"),
        (["--data", "{data}", "--output", "{tmp}/run", "--batch-size", "7"], "even --batch-size"),
        (["--data", "{data}", "--output", "{tmp}/run", "--lr", "inf"], "lr must be finite"),
        (["--data", "{data}", "--output", "{tmp}/run", "--lr", "1e39"], "lr must be finite numbers within float32's range"),
        (["--data", "{data}", "--output", "{tmp}/run", "--weight-decay", "nan"], "weight_decay must be finite"),
        (["--data", "{data}", "--output", "{tmp}/run", "--smoothing", "1.5"], "smoothing in [0, 1)"),
        (["--data", "{data}", "--output", "{tmp}/run", "--drop-path", "2"], "drop_path in [0, 1)"),
        (["--data", "{data}", "--output", "{tmp}/run", "--min-lr", "1"], "min_lr <= lr 2e-05"),  # the cosine would climb
        (["--data", "{data}", "--output", "{tmp}/run", "--recipe", "deit", "--batch-size", "8"],
         "(lr 7.81e-06 is the recipe's 0.0005 x --batch-size 8 / 512: pass --lr or --min-lr)"),  # below DeiT's min_lr 1e-5
        (["--data", "{data}", "--output", "{tmp}/run", "--warmup-epochs", "3", "--epochs", "3"], "warmup_epochs < epochs 3"),
        (["--data", "{data}", "--output", "{tmp}/run", "--save-every", "0"], "--save-every and --max-steps must be >= 1"),
        (["--data", "{data}", "--output", "{tmp}/run", "--max-steps", "0"], "--save-every and --max-steps must be >= 1"),
        (["--data", "{data}", "--output", "{tmp}/run", "--workers", "-1"], "--workers >= 0"),
        (["--data", "{data}", "--output", "{tmp}/run", "--auto-augment", "bogus"], "is not a timm auto-augment policy"),
        (["--data", "{data}", "--output", "{tmp}/run", "--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--data", "{data}", "--output", "{tmp}/run", "--device", "bogus"], "is not a device"),
        (["--data", "{data}", "--output", "{tmp}/run", "--device", "meta"], "is not available here"),
    ],
)
def test_finetune_bad_input(dataset, tmp_path, capsys, args, message):
    result = call_script("finetune", capsys, "--arch", ARCH, "--workers", "0", *[a.format(data=dataset, tmp=tmp_path) for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # a refused command leaves no empty run folder


def test_finetune_refuses_val_classes_that_are_not_train_classes(tmp_path, capsys):
    write_image_folder(tmp_path / "train", classes=2, per_class=2, size=16)
    write_image_folder(tmp_path / "val", classes=2, per_class=2, size=16)
    (tmp_path / "val" / "class_001").rename(tmp_path / "val" / "zebra")  # same count: labels would map by position
    result = call_script("finetune", capsys, "--arch", ARCH, "--workers", "0", "--data", tmp_path, "--output", tmp_path / "run")
    assert result.returncode == 2 and "same class folders" in result.stderr and "zebra" in result.stderr, result.stderr


@pytest.mark.parametrize("change, message", [
    (["--lr", "1e-2"], "(recipe lr: the run has"),  # the saved optimizer and schedule would silently keep the old lr
    (["--seed", "3"], "seed: the run has 0, this command 3"),
    (["--preset", "tome"], "preset: the run has 'imagepiece', this command 'tome'"),
])
def test_finetune_resumes_only_the_run_its_flags_describe(dataset, finetuned, tmp_path, capsys, change, message):
    shutil.copy(finetuned[0] / "last.pth", tmp_path / "last.pth")
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--max-steps", "9", *TRAIN, *change)
    assert result.returncode == 2 and message in result.stderr and "belongs to a run with other settings" in result.stderr, result.stderr
    assert "batch_size" not in result.stderr  # the field that differs, not every field of the recipe


@pytest.mark.parametrize("damage", ["truncated", "a best.pth"])
def test_finetune_cannot_resume_from_a_damaged_last_pth_and_says_so(dataset, finetuned, tmp_path, capsys, damage):
    saved = (finetuned[0] / "last.pth").read_bytes()
    if damage == "truncated":
        (tmp_path / "last.pth").write_bytes(saved[:len(saved) // 3])
    else:  # weights and settings, but no optimizer state
        torch.save({"model": torch.load(finetuned[0] / "last.pth")["model"]}, tmp_path / "last.pth")
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--max-steps", "9", *TRAIN)
    assert result.returncode == 2 and "cannot resume from" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_finetune_starts_from_its_own_checkpoint_of_these_classes(dataset, finetuned, tmp_path, capsys):
    # Its 4-class head fits as it is; a 1000-class model would refuse it (and name a flag finetune.py does not have).
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--checkpoint", finetuned[1], "--max-steps", "1",
                         *TRAIN)
    assert result.returncode == 0 and "stopped at step 1" in result.stdout, result.stderr


def test_finetune_starts_from_another_trainers_checkpoint_with_its_head_size(dataset, tmp_path, capsys):
    # A timm DeiT fine-tuned on these 4 classes elsewhere: its head fits the data, not a 1000-class model.
    import timm

    torch.save(timm.create_model(ARCH, num_classes=4).state_dict(), tmp_path / "timm_4_classes.pth")
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path / "run", "--checkpoint", tmp_path / "timm_4_classes.pth",
                         "--max-steps", "1", *TRAIN)
    assert result.returncode == 0 and "stopped at step 1" in result.stdout, result.stderr


def test_finetune_starts_from_a_backbone_without_a_head(dataset, tmp_path, capsys):
    # A self-supervised DeiT or a num_classes=0 export: no head.* keys at all (timm loads it and makes a new head).
    import timm

    backbone = {key: value for key, value in timm.create_model(ARCH).state_dict().items() if not key.startswith("head.")}
    torch.save(backbone, tmp_path / "headless.pth")
    result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path / "run", "--checkpoint", tmp_path / "headless.pth",
                         "--max-steps", "1", *TRAIN)
    assert result.returncode == 0 and "stopped at step 1" in result.stdout, result.stderr
    saved = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=True)["model"]
    assert saved["head.weight"].shape == (4, 192)
    # Loaded, then one AdamW step at lr 1e-3 (each weight moves by about lr at most; a fresh init is ~0.02 away).
    assert (saved["pos_embed"] - backbone["pos_embed"]).abs().max() < 2e-3


def test_a_second_finetune_on_the_same_output_is_refused_while_the_first_runs(dataset, tmp_path, capsys):
    from imagepiece.files import held_exclusively

    with held_exclusively(tmp_path / load_script("finetune").LOCK_NAME, "the first run"):  # as the first run holds it
        result = call_script("finetune", capsys, "--data", dataset, "--output", tmp_path, "--max-steps", "1", *TRAIN)
    assert result.returncode == 2 and f"--output {tmp_path} is being written by another run (pid {os.getpid()})" in result.stderr
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_finetune_stops_when_no_image_of_a_split_decodes(dataset, tmp_path, capsys, split):
    # Neither zero steps nor a top-1 over zero images may end as "done" with a best.pth.
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for image in (data / split).rglob("*.png"):
        image.write_bytes(b"not an image")
    result = call_script("finetune", capsys, "--data", data, "--output", tmp_path / "run", *TRAIN[:-6], "--epochs", "1", "--workers", "0",
                         "--save-every", "1000")
    assert result.returncode == 1, result.stderr
    assert f"no {'training' if split == 'train' else 'validation'} image" in result.stderr and "done" not in result.stdout
    assert not (tmp_path / "run" / "best.pth").exists()
    if split == "train":
        assert "nothing was saved" in result.stderr  # no last.pth to point at


def test_visualize_draws_the_piece_maps(tmp_path):
    """The picture shows exactly the pieces and pruned patches of the model's piece maps.

    A flat-colour photo makes every piece one flat tint, so the panels can be read back: patches of
    one piece share a colour, different pieces differ, pruned patches are one grey, and outlines run
    exactly along piece borders. Run in this process, so the maps compared come from the same
    computation (a near-tie could otherwise break differently in another process).
    """
    torch.manual_seed(0)
    model = create_model(ARCH, "imagepiece")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    Image.new("RGB", (320, 240), (30, 120, 200)).save(tmp_path / "flat.png")
    visualize, blocks, out = load_script("visualize"), [0, 3, 11], tmp_path / "pieces.png"
    argv = ["--image", tmp_path / "flat.png", "--arch", ARCH, "--checkpoint", tmp_path / "weights.pth", "--out", out]
    assert visualize.main([str(a) for a in argv] + ["--blocks", *map(str, blocks)]) == 0
    images, _ = visualize.load_image(tmp_path / "flat.png", model)
    maps = piece_maps(model, images, blocks)
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for index, block in enumerate(blocks, start=1):
        left, top = panel_origin(index, 224)
        panel = picture[top : top + 224, left : left + 224]
        owner, pruned = maps[block].owner.numpy(), maps[block].pruned.numpy()
        centres = panel[8::16, 8::16]  # each patch's centre pixel, off its outline
        same_colour = np.abs(centres[:, :, None, None] - centres[None, None]).max(-1) <= 2  # [14, 14, 14, 14]
        kept = ~pruned
        same_piece = (owner[:, :, None, None] == owner[None, None]) & kept[:, :, None, None] & kept[None, None]
        both_pruned = pruned[:, :, None, None] & pruned[None, None]
        assert (same_colour == (same_piece | both_pruned)).all(), f"block {block}: colours do not follow the pieces"
        assert len({tuple(c) for c in centres[kept]}) == maps[block].num_pieces
        # Outlines: the first pixel row / column of a patch is black exactly where its piece changes.
        for row in range(1, 14):
            black = (panel[16 * row, 8::16] == 0).all(-1)
            assert (black == (owner[row] != owner[row - 1])).all(), f"block {block}: wrong outline above row {row}"
        for col in range(1, 14):
            black = (panel[8::16, 16 * col] == 0).all(-1)
            assert (black == (owner[:, col] != owner[:, col - 1])).all(), f"block {block}: wrong outline left of column {col}"
    assert maps[3].pruned.sum() >= model.token_schedule()[3].pruned and not maps[0].pruned.any()


def test_visualize_a_synthetic_scene(tmp_path):
    result = run_script("visualize", "--synthetic", "--arch", ARCH, "--blocks", "0", "6", "--out", tmp_path / "pieces.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "pieces.png") as picture:
        assert picture.size == (panel_origin(3, 224)[0], panel_origin(0, 224)[1] + 224 + 8)  # input + 2 panels
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:2]] == ["block 0", "block 6"]


def test_visualize_a_fine_tuned_checkpoint_of_other_classes(finetuned, tmp_path, capsys):
    # best.pth of a 4-class fine-tune: its head fits only with --num-classes 4 (and its LCB with --lcb residual).
    result = call_script("visualize", capsys, "--synthetic", "--arch", ARCH, "--checkpoint", finetuned[1], "--lcb", "residual",
                         "--num-classes", "4", "--blocks", "0", "--out", tmp_path / "pieces.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pieces.png").is_file()


def test_visualize_says_when_an_lcb_stem_is_untrained(tmp_path, capsys):
    import timm

    torch.save(timm.create_model(ARCH).state_dict(), tmp_path / "deit.pth")  # a plain DeiT: no stem weights
    result = call_script("visualize", capsys, "--synthetic", "--arch", ARCH, "--checkpoint", tmp_path / "deit.pth", "--lcb", "stem",
                         "--blocks", "0", "--out", tmp_path / "pieces.png")
    assert result.returncode == 0 and "visualize.py: warning: LCB 'stem' left untrained" in result.stderr, result.stderr
    assert "UserWarning" not in result.stderr and (tmp_path / "pieces.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{tmp}/missing.jpg", "--out", "{tmp}/x.png"], "file not found"),
        (["--synthetic", "--out", "{tmp}/x.jpg"], "the picture is a PNG; name it *.png"),
        (["--image", "{tmp}/notes.jpg", "--out", "{tmp}/x.png"], "not an image"),
        (["--image", "{tmp}/deep.png", "--out", "{tmp}/x.png"], "unsupported 16-bit image"),
        (["--image", "{tmp}/strip.png", "--out", "{tmp}/x.png"], "extreme aspect ratio"),  # resized first: 18 GB
        # No advice to raise the limit: visualize has no --max-pixels.
        (["--image", "{tmp}/bomb.png", "--out", "{tmp}/x.png"], "refused before decoding (decompression-bomb guard)"),
        (["--synthetic", "--blocks", "12", "--out", "{tmp}/x.png"], "outside 0..11"),
        (["--synthetic", "--out", "/nonexistent/x.png"], "does not exist"),
        (["--synthetic", "--num-classes", "0", "--out", "{tmp}/x.png"], "--num-classes must be >= 1"),
        (["--synthetic", "--out", "{tmp}"], "is a folder; give a file name"),
        (["--image", "{tmp}", "--out", "{tmp}/x.png"], "is a directory, not an image file"),
        (["--image", "{tmp}/photo.png", "--out", "{tmp}/photo.png"], "is the --image file: writing it would replace that input"),
    ],
)
def test_visualize_bad_input(tmp_path, capsys, args, message):
    (tmp_path / "notes.jpg").write_text("not a picture")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")  # Pillow's RGB would clip it to white
    Image.new("RGB", (100_000, 1)).save(tmp_path / "strip.png")
    (tmp_path / "bomb.png").write_bytes(huge_png(10_000, 10_000))
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    result = call_script("visualize", capsys, "--arch", ARCH, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_deit_randaugment_runs_with_this_pillow():
    """DeiT's RandAugment asks posterize for 0 bits now and then; Pillow >= 13 raises on it (see data.py)."""
    from timm.data import auto_augment

    from imagepiece.data import train_transform

    transform = train_transform({"interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}, "rand-m9-mstd0.5-inc1", 0.25)
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    for _ in range(500):
        assert transform(image).shape == (3, 224, 224)
    # The fix lives in that transform only: timm's own table of ops is untouched.
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize


def test_random_erasing_fills_with_noise_as_deit_does():
    from timm.data.random_erasing import RandomErasing

    from imagepiece.data import train_transform

    transform = train_transform({"interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}, None, 0.25)
    erasing = [op for op in transform.transforms if isinstance(op, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].mode == "pixel" and erasing[0].probability == 0.25


def test_aot_compile_builds_the_model_a_fine_tune_recorded_unless_told_otherwise(tmp_path):
    aot_compile = load_script("aot_compile")
    recorded = {"arch": ARCH, "lcb": "residual", "num_classes": 4, "preset": "imagepiece_hyper"}

    def request(*flags):
        return aot_compile.model_request(aot_compile.parse_args([*flags, "--out", str(tmp_path / "x.so")]), recorded)

    hyper = dict(PRESETS["imagepiece_hyper"])
    assert request() == (ARCH, {**hyper, "lcb": "residual", "num_classes": 4})
    assert request("--keep-rate", "0.6") == (ARCH, {**hyper, "keep_rate": 0.6, "lcb": "residual", "num_classes": 4})
    assert request("--method", "evit", "--lcb", "none") == (ARCH, {"method": "evit", "lcb": None, "num_classes": 4})
    assert request("--model", "deit_small_patch16_224.tome") == ("deit_small_patch16_224", {"method": "tome", "lcb": "residual",
                                                                                             "num_classes": 4})
    assert request("--preset", "imagepiece_sum", "--num-classes", "7")[1] == {"method": "imagepiece", "reevaluation": "sum",
                                                                             "lcb": "residual", "num_classes": 7}
    with pytest.raises(ValueError, match="--preset tome is method 'tome', not 'evit'; drop one of them"):
        request("--preset", "tome", "--method", "evit")
    with pytest.raises(ValueError, match="--p has no effect with method 'tome'"):
        request("--preset", "tome", "--p", "0.5")
    nothing_recorded = aot_compile.model_request(aot_compile.parse_args(["--out", str(tmp_path / "x.so")]), {})
    assert nothing_recorded == ("deit_small_patch16_224", {"method": "imagepiece", "lcb": None, "num_classes": 1000})


def test_a_fine_tuned_checkpoint_loaded_without_its_settings_says_how_to_load_it_from_python(finetuned):
    """The hint's create_model(...) is Python that works: the config spelling of --lcb, the recorded preset."""
    import imagepiece

    with pytest.raises(imagepiece.CheckpointError) as error:
        create_model(ARCH, checkpoint=finetuned[1])  # 1000 classes, no LCB: not what it was trained as
    advice = re.search(r"from Python (create_model\(.*checkpoint=\.\.\..*\))$", str(error.value)).group(1)
    model = eval(advice.replace("checkpoint=...", "checkpoint=path"), {"create_model": create_model, "imagepiece": imagepiece,
                                                                          "path": finetuned[1]})
    assert model.num_classes == 4 and model.reduction_config.lcb == "residual"
