"""Labelled image folders for evaluation and fine-tuning: every file counted once, as what it is.

timm's ImageDataset answers a file that does not decode with the *next* image and that image's label, and
its folder walk follows links; both gave accuracy figures over images that were not there. No model here:
a predictor that always says class 0 makes every count visible in the top-1.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imagepiece.data import DatasetError, Unreadable, collate_readable, eval_transform, image_folder, spread_subset
from imagepiece.evaluation import NonFiniteLogits, evaluate
from imagepiece.training import RECIPES, CheckpointWriteError, Trainer, TrainingDiverged, save_checkpoint
from inputs import write_image_folder


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def always_class_0(images):
    logits = torch.zeros(len(images), 2)
    logits[:, 0] = 1.0
    return logits


def loader(dataset, batch=2):
    return torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate_readable)


@pytest.fixture
def folder_with_bad_files(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=2, size=8)
    good = (tmp_path / "class_000" / "0.png").read_bytes()
    (tmp_path / "class_000" / "truncated.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "class_001" / "notes.jpg").write_text("not an image")
    (tmp_path / "class_001" / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "class_001" / "deep.png")  # RGB would clip to white
    return tmp_path


def test_undecodable_files_are_named_and_never_scored_as_another_image(folder_with_bad_files):
    dataset = image_folder(folder_with_bad_files, transform=to_tensor)
    assert len(dataset) == 8
    samples = [dataset[index] for index in range(len(dataset))]
    bad = sorted(os.path.basename(sample.path) for sample in samples if isinstance(sample, Unreadable))
    assert bad == ["deep.png", "empty.png", "notes.jpg", "truncated.png"]
    result = evaluate(always_class_0, loader(dataset), torch.device("cpu"))
    # 2 readable images of class 0 and 2 of class 1; timm's substitution scored 8, the bad ones as copies of neighbours.
    assert result["images"] == 4 and result["top1"] == 50.0
    assert sorted(os.path.basename(entry["path"]) for entry in result["unreadable"]) == bad
    assert all(entry["error"] for entry in result["unreadable"])


def test_a_batch_without_one_decodable_file_is_skipped(folder_with_bad_files):
    batch = collate_readable([Unreadable("a.jpg", "OSError: x"), Unreadable("b.jpg", "OSError: y")])
    assert batch.images is None and batch.targets is None and len(batch.unreadable) == 2
    only_bad = torch.utils.data.Subset(image_folder(folder_with_bad_files, transform=to_tensor), list(range(8)))
    assert evaluate(always_class_0, loader(only_bad, batch=1), torch.device("cpu"))["images"] == 4


def test_non_finite_logits_are_an_error_not_an_accuracy(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=2, size=8)
    dataset = image_folder(tmp_path, transform=to_tensor)
    with pytest.raises(NonFiniteLogits, match="not finite"):  # NaN ranks first in topk: class 0 would "win" every image
        evaluate(lambda images: torch.full((len(images), 2), float("nan")), loader(dataset), torch.device("cpu"))


def test_img_per_s_leaves_out_the_first_calls_one_time_costs(tmp_path, monkeypatch):
    # An artifact's first run took 1.4 s, later ones 0.04 s: a small evaluation reported a fifth of its speed.
    write_image_folder(tmp_path, classes=2, per_class=3, size=8)
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    costs = iter([5.0, 0.5, 0.5])

    def predict(images):
        clock[0] += next(costs)
        return always_class_0(images)

    result = evaluate(predict, loader(image_folder(tmp_path, transform=to_tensor)), torch.device("cpu"))
    assert result["images"] == 6 and result["model_seconds"] == 6.0
    assert result["img_per_s"] == 4 / 1.0 and result["top_k"] == 2


@pytest.mark.parametrize("link", ["loop", "sibling"])
def test_a_folder_reached_twice_through_a_link_is_refused(tmp_path, link):
    write_image_folder(tmp_path, classes=2, per_class=2, size=8)
    target = ".." if link == "loop" else "../class_001"  # a loop repeated every image 41 times; a sibling counts twice
    os.symlink(target, tmp_path / "class_000" / "linked")
    with pytest.raises(DatasetError, match="link to a folder already listed") as error:
        image_folder(tmp_path)
    assert f"{str(tmp_path / 'class_000' / 'linked')!r} is a link" in str(error.value)  # the link, whichever the walk met first


def test_images_outside_class_folders_are_refused(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=2, size=8)
    (tmp_path / "stray.png").write_bytes((tmp_path / "class_000" / "0.png").read_bytes())  # would become class ""
    with pytest.raises(DatasetError, match="holds images directly"):
        image_folder(tmp_path)


@pytest.mark.parametrize("layout", ["nested", "train_and_val"])
def test_images_deeper_than_class_folders_are_refused(tmp_path, layout):
    # timm labels an image by the folder it sits in: <class>/<sub>/<image> became class <sub>, and the folder
    # above train/ and val/ merged both into one set of classes.
    if layout == "nested":
        write_image_folder(tmp_path, classes=2, per_class=2, size=8)
        (tmp_path / "class_000" / "sub").mkdir()
        (tmp_path / "class_000" / "sub" / "x.png").write_bytes((tmp_path / "class_000" / "0.png").read_bytes())
    else:
        for split in ("train", "val"):
            write_image_folder(tmp_path / split, classes=2, per_class=2, size=8)
    with pytest.raises(DatasetError, match="not <class>/<image>: give the folder whose sub-folders are the classes"):
        image_folder(tmp_path)


def test_an_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path, classes=3, per_class=2, size=8)
    for image in (tmp_path / "class_001").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['class_001'\] hold no images"):
        image_folder(tmp_path)


def test_class_folders_that_timm_sorts_as_equal_get_the_same_labels_in_every_process(tmp_path):
    # timm's natural sort ignores case and leading zeros: these pairs tied and kept a set's order, which changes with
    # PYTHONHASHSEED, so a fine-tune and its evaluation could label "Cat" and "cat" the other way round.
    for name in ("Cat", "cat", "a01", "a1", "class10", "class2"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    show = ("import sys; from imagepiece.data import image_folder, class_names; d = image_folder(sys.argv[1]); "
            "print(class_names(d), sorted((os.path.basename(os.path.dirname(p)), t) for p, t in d.reader.samples))")
    seen = {subprocess.run([sys.executable, "-c", "import os; " + show, str(tmp_path)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(1, 7)}
    names = ["a01", "a1", "Cat", "cat", "class2", "class10"]
    assert seen == {f"{names} {sorted((name, label) for label, name in enumerate(names))}\n"}


def test_a_strip_that_the_eval_resize_would_blow_up_is_unreadable_not_a_crash(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=1, size=8)
    Image.new("RGB", (100_000, 1)).save(tmp_path / "class_001" / "strip.png")  # a few hundred bytes; resized: 18 GB
    dataset = image_folder(tmp_path, transform=eval_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
                                                                "crop_pct": 0.875, "crop_mode": "center"}))
    samples = [dataset[index] for index in range(len(dataset))]
    (strip,) = [sample for sample in samples if isinstance(sample, Unreadable)]
    assert strip.path.endswith("strip.png") and "extreme aspect ratio" in strip.error


def test_a_non_finite_loss_stops_training_before_the_step(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    recipe = RECIPES["finetune"].__class__(**{**RECIPES["finetune"].__dict__, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0})
    trainer = Trainer(model, recipe, num_classes=2, steps_per_epoch=1, device=torch.device("cpu"), amp=False)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="the step was not taken"):
        trainer.train_step(torch.full((2, 3, 2, 2), float("inf")), torch.tensor([0, 1]))
    assert trainer.global_step == 0 and all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"step": 1})

    def full_disk(state, staged):
        open(staged, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_limit_takes_images_from_every_class_not_the_first_folders(tmp_path):
    write_image_folder(tmp_path, classes=4, per_class=3, size=8)
    dataset = image_folder(tmp_path)
    subset = spread_subset(dataset, 4)
    assert len(subset) == 4
    assert sorted(target for _, target in (subset[index] for index in range(4))) == [0, 1, 2, 3]
    assert spread_subset(dataset, 12) is dataset and spread_subset(dataset, 50) is dataset
    with pytest.raises(ValueError, match="limit >= 1"):
        spread_subset(dataset, 0)
