"""imagepiece-predict (single process): sources, decoding, timm-equal preprocessing, eager-equal
predictions, one error row per bad file, batching/padding, output formats, --resume, CLI errors."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from diagnostics import decision_margins
from image_files import POSTSCRIPT, photo, write_bad_images, write_good_images
from imagepiece.predict import Classifier, list_inputs, predict_items
from imagepiece.predict.cli import main
from imagepiece.predict.decode import ImageError, decode_rgb, decode_rgb_bytes
from imagepiece.predict.labels import class_names
from imagepiece.input_format import random_pixels
from imagepiece.predict.preprocess import Preprocess, normalise, pixels_of
from imagepiece.predict.rows import Row
from imagepiece.predict.writers import Journal, ResumableOutput, read_rows, write_rows

# The bomb fixtures are meant to trip Pillow's warning; predict refuses them itself (error rows).
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
ROOT = Path(__file__).resolve().parent.parent
TIE_FREE = 1e-5  # as in test_parity: decision gaps above this cannot flip between eager and compiled
DEIT = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic", "crop_pct": 0.875,
        "crop_mode": "center"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(root, good image names, {bad name: phrase its error must contain}) plus files a walk skips."""
    root = tmp_path_factory.mktemp("photos")
    good = write_good_images(root)
    bad = write_bad_images(root)
    (root / "README.txt").write_text("not listed: no image suffix")
    Image.fromarray(photo(32, 32, seed=9)).save(root / ".hidden.jpg")
    return root, good, bad


def rows_by_path(path):
    rows = read_rows(path)
    return {row.path: row for row in rows}, rows


def eager_probs(model, pixels, preprocessing):
    images = normalise(torch.from_numpy(pixels), preprocessing["mean"], preprocessing["std"])
    with torch.inference_mode():
        probs = model(images).softmax(dim=1)
    return probs, decision_margins(model, images)


def assert_rows_match_eager(rows, root, names, eager, preprocessing, topk=5):
    """Each row is the eager model's top-k on the same decoded pixels (tie-free images exactly)."""
    prepare = Preprocess(preprocessing)
    pixels = np.stack([prepare(decode_rgb(str(root / name))) for name in names])
    probs, margins = eager_probs(eager, pixels, preprocessing)
    tie_free = 0
    for name, expected, margin in zip(names, probs, margins):
        row = rows[str(root / name)]
        assert row.error == "" and len(row.classes) == len(row.probs) == len(row.labels) == topk, row
        assert row.classes[0] == int(expected.argmax()), name
        assert row.probs == sorted(row.probs, reverse=True)
        if margin > TIE_FREE:
            tie_free += 1
            torch.testing.assert_close(torch.tensor(row.probs), expected[row.classes], rtol=1e-3, atol=1e-7)
            assert row.probs[-1] >= float(expected.topk(topk).values[-1]) * (1 - 1e-3), "not the top-k"
    assert tie_free >= len(names) // 3, f"only {tie_free} of {len(names)} images tie-free: test inputs degenerate"


@pytest.mark.parametrize("preprocessing", [
    DEIT,
    {**DEIT, "interpolation": "bilinear", "crop_pct": 1.0},
    {**DEIT, "crop_pct": 0.9, "crop_mode": "squash"},
    {**DEIT, "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "border"},
], ids=["deit", "bilinear-full", "squash", "border"])
def test_preprocessing_equals_timm_eval_transform_on_image_files(folder, preprocessing):
    root, good, _ = folder
    ours = Preprocess(preprocessing)
    timm_eval = create_transform(input_size=(3, 224, 224), is_training=False, **preprocessing)
    for name in good:
        pixels = ours(decode_rgb(str(root / name)))
        assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
        mine = normalise(torch.from_numpy(pixels)[None], preprocessing["mean"], preprocessing["std"])[0]
        with Image.open(root / name) as image:
            theirs = timm_eval(image.convert("RGB"))
        assert (mine - theirs).abs().max() <= 1e-6, name


@pytest.mark.parametrize("mean, std", [(DEIT["mean"], DEIT["std"]), ((0.5,) * 3, (0.5,) * 3), ((0.0,) * 3, (1.0,) * 3)])
def test_pixels_of_undoes_normalise_exactly(mean, std):
    """What evaluate.py hands an artifact that takes pixels, from timm's normalised images."""
    pixels = random_pixels(4, seed=5)
    assert torch.equal(pixels_of(normalise(pixels, mean, std), mean, std), pixels)


def test_folder_rows_equal_eager_and_each_bad_file_is_one_error_row(compiled, folder, tmp_path, capsys):
    root, good, bad = folder
    name = "ti_imagepiece_dynamic"
    output = tmp_path / "preds.jsonl"
    assert main(["--artifact", str(compiled.path(name)), "--input", str(root), "--output", str(output), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"{len(good) + len(bad)} images ({len(bad)} errors)" in summary and "img/s" in summary and "decode" in summary

    rows, ordered = rows_by_path(output)
    listed = [item.path for item in list_inputs(str(root))]
    assert [row.path for row in ordered] == listed, "one row per input, in input (sorted walk) order"
    assert sorted(listed) == sorted(str(root / n) for n in good + list(bad)), "README.txt and hidden files are not inputs"
    for bad_name, phrase in bad.items():
        row = rows[str(root / bad_name)]
        assert phrase in row.error and not row.classes and not row.probs, row
    names = class_names({"num_classes": 1000})
    assert all(row.labels == [names[c] for c in row.classes] for row in ordered)
    assert_rows_match_eager(rows, root, good, compiled.eager(name), compiled_preprocessing(compiled, name))


def compiled_preprocessing(compiled, name):
    from imagepiece.artifact import read_metadata

    return read_metadata(compiled.path(name))["preprocessing"]


def test_static_batch_artifact_pads_its_last_batch(compiled, folder):
    root, good, bad = folder
    name = "ti_imagepiece"  # static batch 2: an odd number of good images leaves a last batch of 1
    classifier = Classifier(str(compiled.path(name)), topk=3)
    assert classifier.batch == 2 and len(good) % 2 == 1
    items = list_inputs(str(root))
    batches = list(predict_items(items, classifier, class_names({"num_classes": 1000}), workers=2))
    rows = {row.path: row for batch in batches for row in batch}
    assert len(rows) == len(items) == sum(len(batch) for batch in batches)
    assert_rows_match_eager(rows, root, good, compiled.eager(name), compiled_preprocessing(compiled, name), topk=3)


def test_uint8_input_artifact_gives_the_float_artifacts_rows(compiled, folder):
    """The same model compiled to take uint8 pixels: predict hands it the pixels as they are (no
    normalise on the host) and gets the float artifact's rows: same top-k on tie-free images, and
    both equal to eager on the same decoded pixels."""
    root, good, bad = folder
    items = list_inputs(str(root))
    rows = {}
    for name in ("ti_imagepiece", "ti_imagepiece_uint8"):
        classifier = Classifier(str(compiled.path(name)), topk=5)
        assert classifier.takes_pixels == (name == "ti_imagepiece_uint8")
        rows[name] = {row.path: row for batch in predict_items(items, classifier, class_names({"num_classes": 1000}), workers=2) for row in batch}
    floats, pixels = rows["ti_imagepiece"], rows["ti_imagepiece_uint8"]
    assert list(pixels) == list(floats) and all(pixels[p].error == floats[p].error for p in floats)
    preprocessing = compiled_preprocessing(compiled, "ti_imagepiece")
    assert compiled_preprocessing(compiled, "ti_imagepiece_uint8") == preprocessing
    assert_rows_match_eager(pixels, root, good, compiled.eager("ti_imagepiece"), preprocessing)
    prepare = Preprocess(preprocessing)
    _, margins = eager_probs(compiled.eager("ti_imagepiece"), np.stack([prepare(decode_rgb(str(root / n))) for n in good]), preprocessing)
    for name, margin in zip(good, margins):
        mine, theirs = pixels[str(root / name)], floats[str(root / name)]
        assert mine.classes[0] == theirs.classes[0], name
        if margin > TIE_FREE:
            assert mine.classes == theirs.classes, name
            np.testing.assert_allclose(mine.probs, theirs.probs, rtol=1e-3, atol=1e-6)


def test_sources_list_folders_globs_lists_and_table_columns(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, good, bad = folder
    walked = [item.path for item in list_inputs(str(root))]
    by_folder = {}
    for name in good + list(bad):
        by_folder.setdefault(os.path.dirname(name), []).append(str(root / name))
    assert walked == [path for folder_name in sorted(by_folder) for path in sorted(by_folder[folder_name])], \
        "each folder's files in sorted order, then its sub-folders; no README.txt, no hidden files"

    assert [i.path for i in list_inputs(str(root / "nested" / "*.png"))] == sorted(str(root / n) for n in good if n.startswith("nested/rgb"))

    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{root / 'rgb_0.jpg'}\n\nrelative.jpg\n")
    items = list_inputs(str(listing))
    assert [(i.path, i.location) for i in items] == [(str(root / "rgb_0.jpg"),) * 2, ("relative.jpg", str(tmp_path / "relative.jpg"))]

    table = pa.table({"id": [1, 2], "file": [str(root / "gray.png"), "x.jpg"]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert [i.path for i in list_inputs(str(tmp_path / "t.parquet"), column="file")] == [str(root / "gray.png"), "x.jpg"]
    with pytest.raises(ValueError, match="name the one holding image paths with --column"):
        list_inputs(str(tmp_path / "t.parquet"))
    (tmp_path / "t.csv").write_text("path,label\nrgb_1.jpg,cat\n")
    assert [i.location for i in list_inputs(str(tmp_path / "t.csv"))] == [str(tmp_path / "rgb_1.jpg")]
    with pytest.raises(ValueError, match="no column 'nope'"):
        list_inputs(str(tmp_path / "t.csv"), column="nope")
    assert [i.path for i in list_inputs(str(root / "gray.png"))] == [str(root / "gray.png")]
    (tmp_path / "t.jsonl").write_text('{"path": "rgb_1.jpg"}\n')  # was read as a list: one row per JSON line
    with pytest.raises(ValueError, match="is JSON, which predict does not read: give a .csv or .parquet table"):
        list_inputs(str(tmp_path / "t.jsonl"))


def test_odd_names_loops_byte_order_marks_and_unlisted_folders(folder, tmp_path, monkeypatch):
    root, _, _ = folder
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(root / "rgb_0.jpg", photos / "sub" / "a.jpg")
    (photos / "sub" / "up").symlink_to("..")  # a loop: glob's "**" used to list a.jpg again and again
    (photos / "sub" / "up2").symlink_to("..")  # two of them: without end
    # A name that is not UTF-8: its row spells the bad byte, every writer takes it, and it still opens.
    bad_name = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(root / "rgb_0.jpg", photos / bad_name)
    walked = list_inputs(str(photos))
    assert [item.path for item in walked] == [str(photos / "caf\\xe9.jpg"), str(photos / "sub" / "a.jpg")]
    decode_rgb(walked[0].location)
    for suffix in (".csv", ".jsonl", ".parquet"):
        write_rows(tmp_path / f"rows{suffix}", [Row(walked[0].path, error="x")])
        assert read_rows(tmp_path / f"rows{suffix}")[0].path == walked[0].path
    globbed = [item.path for item in list_inputs(str(photos / "**" / "*.jpg"))]
    assert globbed == [item.path for item in walked]

    # Hidden names: a wildcard matches none (macOS's ._a.jpg, a .thumbs folder), a fixed part of the pattern may be one.
    cache = tmp_path / ".cache" / "photos"
    (cache / ".thumbs").mkdir(parents=True)
    for name in ("a.jpg", "._a.jpg", ".thumbs/t.jpg"):
        shutil.copy(root / "rgb_0.jpg", cache / name)
    assert [item.path for item in list_inputs(str(cache / "**" / "*.jpg"))] == [str(cache / "a.jpg")]
    assert [item.path for item in list_inputs(str(cache / "**" / ".thumbs" / "*.jpg"))] == [str(cache / ".thumbs" / "t.jpg")]
    # A folder walk lists only the formats the decoder opens: a .pdf, .psd or .eps beside the photos is no row.
    for name in ("doc.pdf", "layers.psd", "figure.eps"):
        (photos / "sub" / name).write_bytes(b"%PDF-1.4")
    assert [item.path for item in list_inputs(str(photos))] == [item.path for item in walked]

    # ls *.jpg > files.csv: no header line, and its first path would silently become the column's name.
    (tmp_path / "headerless.csv").write_text("photos/sub/a.jpg\nphotos/sub/b.jpg\n")
    with pytest.raises(ValueError, match="looks like a list of paths without a header line: its first line, 'photos/sub/a.jpg'"):
        list_inputs(str(tmp_path / "headerless.csv"))

    # Excel's "CSV UTF-8" and some editors start a file with a byte order mark.
    (tmp_path / "bom.csv").write_text("path,label\nphotos/sub/a.jpg,cat\n", encoding="utf-8-sig")
    (tmp_path / "bom.txt").write_text("photos/sub/a.jpg\n", encoding="utf-8-sig")
    for listing in ("bom.csv", "bom.txt"):
        assert [item.path for item in list_inputs(str(tmp_path / listing))] == ["photos/sub/a.jpg"]

    # A photo saved without a suffix is one image, not a path list.
    shutil.copy(root / "rgb_0.jpg", tmp_path / "photo")
    assert [item.path for item in list_inputs(str(tmp_path / "photo"))] == [str(tmp_path / "photo")]

    # A sub-folder that cannot be listed (root lists anything, so the refusal is simulated) is reported.
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    warnings = []
    assert [item.path for item in list_inputs(str(photos), warn=warnings.append)] == [walked[0].path]
    assert warnings == [f"cannot list folder {str(photos / 'sub')!r} (Permission denied): its images are left out"]
    with pytest.raises(ValueError, match=r"cannot list folder .* \(Permission denied\)"):
        list_inputs(str(photos / "sub"))


def test_a_name_spelling_an_escape_and_a_name_holding_that_byte_get_a_row_each(compiled, folder, tmp_path):
    # Both were once spelled a\\xff.jpg, and the output, keyed by that path, gave both rows the second file's result.
    root, _, _ = folder
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(root / "rgb_0.jpg", photos / "a\\xff.jpg")
    (photos / os.fsdecode(b"a\xff.jpg")).write_bytes(b"")
    output = tmp_path / "preds.jsonl"
    assert main(["--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--input", str(photos), "--output", str(output),
                 "--no-progress"]) == 0
    literal, byte = read_rows(output)
    assert (literal.path, byte.path) == (str(photos / "a\\\\xff.jpg"), str(photos / "a\\xff.jpg"))
    assert literal.ok and byte.error == "empty file (0 bytes)"


def test_deep_trees_trailing_globstars_odd_table_columns_and_labels_with_a_bom(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _, _ = folder
    levels = [tmp_path / "deep"]  # deeper than Python's recursion limit: os.walk recursed into a RecursionError
    for _ in range(1100):
        levels.append(levels[-1] / "d")
    for level in levels:  # made and removed one by one: pathlib's mkdir and shutil.rmtree recurse too
        level.mkdir()
    shutil.copy(root / "rgb_0.jpg", levels[-1] / "x.jpg")
    try:
        assert [item.location for item in list_inputs(str(tmp_path / "deep"))] == [str(levels[-1] / "x.jpg")]
    finally:
        (levels[-1] / "x.jpg").unlink()
        for level in reversed(levels):
            level.rmdir()

    # pathlib's trailing "**" lists folders only; glob.glob's lists every file below.
    walked = {item.path for item in list_inputs(str(root))}
    assert walked <= {item.path for item in list_inputs(str(root / "**"))}

    pq.write_table(pa.table({"path": pa.array([os.fsencode(str(root / "rgb_0.jpg"))])}), tmp_path / "binary.parquet")
    assert [item.location for item in list_inputs(str(tmp_path / "binary.parquet"))] == [str(root / "rgb_0.jpg")]
    # A binary cell that is not UTF-8 (a Linux file name): its row spells the byte, as a folder walk's does (the
    # bare surrogate once stopped every writer, and the run).
    pq.write_table(pa.table({"path": pa.array([b"caf\xe9.jpg"])}), tmp_path / "latin.parquet")
    [odd] = list_inputs(str(tmp_path / "latin.parquet"))
    assert (odd.path, odd.location) == ("caf\\xe9.jpg", str(tmp_path / os.fsdecode(b"caf\xe9.jpg")))
    write_rows(tmp_path / "odd.jsonl", [Row(odd.path, error="x")])
    pq.write_table(pa.table({"path": pa.array([[1], [2]])}), tmp_path / "lists.parquet")
    with pytest.raises(ValueError, match="holds list values, not text"):
        list_inputs(str(tmp_path / "lists.parquet"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="has no columns"):
        list_inputs(str(tmp_path / "empty.csv"))

    (tmp_path / "labels.txt").write_text("cat\ndog\n", encoding="utf-8-sig")  # a BOM would have joined "cat"
    assert class_names({"num_classes": 2}, tmp_path / "labels.txt") == ["cat", "dog"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\ndog\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' is not UTF-8 text"):
        class_names({"num_classes": 2}, tmp_path / "latin1.txt")


def test_tables_that_would_be_misread_are_refused_and_a_parquet_dataset_folder_is_one_table(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _, _ = folder
    (tmp_path / "twice.csv").write_text(f"path,path\n{root / 'gray.png'},{root / 'rgb_0.jpg'}\n")  # DictReader kept the last
    with pytest.raises(ValueError, match="has 2 columns named 'path': which holds the image paths is ambiguous"):
        list_inputs(str(tmp_path / "twice.csv"))
    (tmp_path / "excel.csv").write_text(f"path;label\n{root / 'gray.png'};cat\n")  # was one column of missing files
    with pytest.raises(ValueError, match="looks semicolon-separated .* predict reads comma-separated CSV"):
        list_inputs(str(tmp_path / "excel.csv"))
    (tmp_path / "tabs.csv").write_text(f"path\tlabel\n{root / 'gray.png'}\tcat\n")
    with pytest.raises(ValueError, match="looks tab-separated"):
        list_inputs(str(tmp_path / "tabs.csv"))

    # Spark, Ray and pyarrow write a table as a folder of parts: it was walked for images ("holds no image files").
    dataset = tmp_path / "photos.parquet"
    dataset.mkdir()
    pq.write_table(pa.table({"path": ["gray.png", "rgb_0.jpg"]}), dataset / "part-0.parquet")
    pq.write_table(pa.table({"path": ["rgb_1.jpg"]}), dataset / "part-1.parquet")
    (dataset / "_SUCCESS").touch()
    items = list_inputs(str(dataset) + "/")
    assert [(i.path, i.location) for i in items] == [(n, str(tmp_path / n)) for n in ("gray.png", "rgb_0.jpg", "rgb_1.jpg")], \
        "its parts in order; relative paths resolve against the folder holding the dataset, as a file's do"
    categories = pa.array(["rgb_1.jpg"]).dictionary_encode()  # a pandas category column: text, as in a single file
    pq.write_table(pa.table({"path": categories}), dataset / "part-1b.parquet")
    assert [i.path for i in list_inputs(str(dataset))][-1] == "rgb_1.jpg"
    pq.write_table(pa.table({"path": [7]}), dataset / "part-2.parquet")  # read as the first part's text: "7"
    with pytest.raises(ValueError, match="its path column holds int64 values in .*part-2.parquet', not text"):
        list_inputs(str(dataset))
    (tmp_path / "empty.parquet").mkdir()
    with pytest.raises(ValueError, match="is a folder named like a Parquet table, but holds no Parquet files"):
        list_inputs(str(tmp_path / "empty.parquet"))
    (tmp_path / "named.csv").write_text(f"my;path\n{root / 'gray.png'}\n")  # a column whose name holds a ";", named
    assert [i.path for i in list_inputs(str(tmp_path / "named.csv"), column="my;path")] == [str(root / "gray.png")]
    (tmp_path / "headless.csv").write_text(f"dir;1/a.jpg\n{root / 'gray.png'}\n")
    with pytest.raises(ValueError, match="looks like a list of paths without a header line"):
        list_inputs(str(tmp_path / "headless.csv"))
    # An unbalanced quote made the rest of the file one made-up path: three images left out, unsaid.
    (tmp_path / "stray.csv").write_text(f'path\n{root / "gray.png"}\n"oops.jpg\n{root / "rgb_0.jpg"}\n{root / "rgb_1.jpg"}\n')
    with pytest.raises(ValueError, match="is not well-formed CSV after line 2 .*unexpected end of data"):
        list_inputs(str(tmp_path / "stray.csv"))


def test_a_parquet_datasets_parts_are_each_read_by_their_own_schema(folder, tmp_path):
    """The dataset's schema is its first part's: the column was picked from that part alone, a part without it
    read as empty paths, and an all-null first part refused the text after it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = tmp_path / "photos.parquet"
    dataset.mkdir()
    pq.write_table(pa.table({"path": pa.array([None, None], pa.null())}), dataset / "part-0.parquet")  # pandas: all None
    pq.write_table(pa.table({"path": ["gray.png"], "label": ["cat"]}), dataset / "part-1.parquet")
    assert [i.path for i in list_inputs(str(dataset))] == ["", "", "gray.png"]
    pq.write_table(pa.table({"caption": ["a cat"]}), dataset / "part-2.parquet")
    with pytest.raises(ValueError, match="its part .*part-2.parquet' has no column 'path' \\(columns: caption\\)"):
        list_inputs(str(dataset))
    (dataset / "part-2.parquet").unlink()
    pq.write_table(pa.table({"caption": ["a cat"]}), dataset / "part-00.parquet")  # first in order, without the column
    with pytest.raises(ValueError, match="part-00.parquet' has no column 'path'"):
        list_inputs(str(dataset), column="path")  # was: "has no column 'path' (columns: caption)", the first part's


def test_an_output_inside_the_input_parquet_dataset_is_refused(tmp_path):
    from imagepiece.predict.cli import check_output

    dataset = tmp_path / "in.parquet"
    dataset.mkdir()
    for name in ("part-0.parquet", "preds.csv"):  # every file there would be read as a part next time
        with pytest.raises(ValueError, match="lies inside the input Parquet dataset .*the next run would read the predictions"):
            check_output(dataset / name, ray=False, input_spec=str(dataset))
    check_output(tmp_path / "preds.csv", ray=False, input_spec=str(dataset))
    images = tmp_path / "photos"
    images.mkdir()
    check_output(images / "preds.csv", ray=False, input_spec=str(images))  # an image folder reads only images


def test_resume_swaps_in_the_merged_journal_whole(tmp_path, monkeypatch):
    """--resume rewrites its journal with every earlier row; a stop (or a full disk) while it does so must leave
    the old journal, not a shorter one."""
    from imagepiece.predict import writers

    output = tmp_path / "p.jsonl"
    journal = Journal(tmp_path / ".p.jsonl.partial.jsonl")
    journal.append([Row(f"{index}.jpg", error="x") for index in range(100)])
    journal.close()
    before = journal.path.read_bytes()
    calls = {"n": 0}
    to_json = writers._row_to_json

    def stopped_midway(row):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return to_json(row)

    monkeypatch.setattr(writers, "_row_to_json", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        ResumableOutput(output, resume=True)
    assert journal.path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [journal.path.name]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_resume_streams_the_latest_row_of_each_path_and_never_piles_up_duplicates(tmp_path, monkeypatch, suffix):
    from imagepiece.predict import writers

    monkeypatch.setattr(writers, "PARQUET_ROWS_PER_GROUP", 2)  # several row groups to write and read back
    output = tmp_path / f"p{suffix}"
    write_rows(output, [Row("gone.jpg", [1], ["b"], [0.5]), Row("a.jpg", error="truncated"), Row("b.jpg", [2], ["c"], [0.25])])
    for attempt in range(3):  # three interrupted resumes, each retrying a.jpg in vain
        run = ResumableOutput(output, resume=True, topk=1)
        assert run.done("b.jpg") and not run.done("a.jpg") and not run.done("c.jpg")
        run.add([Row("a.jpg", error=f"still truncated {attempt}")])
        run.journal.close()
    assert len(run.journal.read()) == 4, "the 3 earlier rows and the newest retry, not one more per interruption"
    run = ResumableOutput(output, resume=True, topk=1)
    assert run.earlier_paths == ["gone.jpg", "a.jpg", "b.jpg"]  # as they first came
    run.add([Row("a.jpg", [0], ["a"], [0.75]), Row("c.jpg", [3], ["d"], [0.125])])
    run.finish(["c.jpg", "a.jpg", "b.jpg"])
    assert read_rows(output) == [Row("c.jpg", [3], ["d"], [0.125]), Row("a.jpg", [0], ["a"], [0.75]),
                                 Row("b.jpg", [2], ["c"], [0.25]), Row("gone.jpg", [1], ["b"], [0.5])]
    assert not run.journal.path.exists()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(output).num_row_groups == 2


def test_resuming_an_interrupted_replacing_run_keeps_none_of_the_rows_it_was_replacing(tmp_path):
    """A run without --resume over an older output (another model's), stopped, then resumed as it says: the result
    used to keep the older rows for every path the stopped run had not reached, silently mixing two models."""
    output = tmp_path / "p.csv"
    write_rows(output, [Row(f"{name}.jpg", [9], ["old"], [0.5]) for name in "abc"] + [Row("gone.jpg", [9], ["old"], [0.5])])
    replacing = ResumableOutput(output, resume=False, topk=1)
    replacing.add([Row("a.jpg", [1], ["new"], [0.25])])
    replacing.journal.close()  # stopped here
    resumed = ResumableOutput(output, resume=True, topk=1)
    assert resumed.done("a.jpg") and not resumed.done("b.jpg") and resumed.earlier_paths == ["a.jpg"]
    again = ResumableOutput(output, resume=True, topk=1)  # stopped once more before any new row: still replacing
    assert again.earlier_paths == ["a.jpg"]
    again.add([Row("b.jpg", [2], ["new"], [0.25]), Row("c.jpg", [3], ["new"], [0.25])])
    again.finish(["a.jpg", "b.jpg", "c.jpg"])
    assert [(row.path, row.labels) for row in read_rows(output)] == [("a.jpg", ["new"]), ("b.jpg", ["new"]), ("c.jpg", ["new"])]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"], "journal and marker gone"
    kept = ResumableOutput(output, resume=True, topk=1)  # a finished output is resumed as it stands
    assert kept.earlier_paths == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_second_run_on_an_output_in_use_is_refused_and_names_the_first(tmp_path):
    from imagepiece.files import held_exclusively

    lock = tmp_path / ".p.csv.lock"
    with held_exclusively(lock, "output 'p.csv'"):
        assert lock.read_text() == f"{os.getpid()}\n"
        # Another process: flock locks belong to the open file, so this one's second open is refused as another's is.
        code = (f"from imagepiece.files import held_exclusively\nwith held_exclusively(__import__('pathlib').Path({str(lock)!r}), "
                "\"output 'p.csv'\"): pass")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and f"output 'p.csv' is being written by another run (pid {os.getpid()})" in result.stderr
    assert not lock.exists()
    with held_exclusively(lock, "output 'p.csv'"):  # free again
        pass


def test_where_the_file_system_has_no_locks_the_run_goes_on_unlocked_and_leaves_no_lock_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    from imagepiece.files import held_exclusively
    from imagepiece.predict.writers import lock_path

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with held_exclusively(tmp_path / ".p.csv.lock", "output 'p.csv'"):
        ran.append(True)
    assert ran and not list(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)  # --ray --output . (a folder): its lock sits beside it, not named "..lock" here
    assert lock_path(Path(".")) == tmp_path.parent / f".{tmp_path.name}.lock"


def test_an_output_name_too_long_for_the_files_beside_it_is_refused_before_the_run(compiled, folder, tmp_path, capsys):
    root, _, _ = folder
    name = "q" * 235 + ".csv"  # fits itself (255), not its staged copy or journal
    assert main(["--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--input", str(root), "--output", str(tmp_path / name)]) == 2
    assert "bytes too long: the run writes" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_fifos_and_strips_are_error_rows_not_hangs_or_gigabytes(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)  # opening it would wait for a writer
    with pytest.raises(ImageError, match="not a regular file"):
        decode_rgb(str(fifo))
    Image.new("L", (20_000, 1)).save(tmp_path / "strip.png")  # 20,000 pixels; resized before cropping: 1.3 billion
    with pytest.raises(ImageError, match="resizing it to 5120000x256 before the centre crop .* extreme aspect ratio"):
        Preprocess(DEIT)(decode_rgb(str(tmp_path / "strip.png")))


def test_a_journal_cut_inside_a_character_or_holding_u2028_keeps_its_whole_rows(tmp_path):
    journal = Journal(tmp_path / ".p.jsonl.partial.jsonl")
    rows = [Row("a\u2028b.jpg", error="x"), Row("über.jpg", error="y"), Row("zürich.jpg", error="z")]
    journal.append(rows)
    journal.close()
    assert journal.read() == rows  # str.splitlines() split the first row at U+2028 and dropped everything after it
    data = journal.path.read_bytes()
    journal.path.write_bytes(data[: data.rindex("ü".encode()) + 1])  # a crash mid-write, inside "ü"
    assert journal.read() == rows[:2]


def test_unreadable_entries_of_a_path_list_are_error_rows(compiled, folder, tmp_path):
    root, _, _ = folder
    locked = tmp_path / "locked.jpg"
    shutil.copy(root / "rgb_6.jpg", locked)  # 41x33: under the --max-pixels below
    locked.chmod(0)
    (tmp_path / "a_folder.jpg").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'rgb_1.jpg'}\nmissing.jpg\na_folder.jpg\nlocked.jpg\nhttps://example.com/cat.jpg\n")
    output = tmp_path / "preds.csv"
    assert main(["--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--input", str(listing), "--output", str(output),
                 "--no-progress", "--max-pixels", "40000"]) == 0
    rows, ordered = rows_by_path(output)
    assert [r.path for r in ordered] == [str(root / "rgb_1.jpg"), "missing.jpg", "a_folder.jpg", "locked.jpg",
                                         "https://example.com/cat.jpg"]
    assert "240x320 = 76,800 pixels, over the limit of 40,000: refused before decoding" in rows[str(root / "rgb_1.jpg")].error
    assert rows["missing.jpg"].error == "file not found"
    assert rows["a_folder.jpg"].error == "is a directory, not an image file"
    assert rows["https://example.com/cat.jpg"].error.startswith("a URL, not a file: URLs are not supported"), "not 'file not found'"
    if os.access(locked, os.R_OK):  # root reads anything: chmod cannot make it unreadable
        assert rows["locked.jpg"].ok
    else:
        assert "cannot read file (Permission denied)" == rows["locked.jpg"].error


@pytest.fixture(scope="module")
def few_files(folder, tmp_path_factory):
    """A path list of 10 inputs (2 of them bad) in their own folder, for output and resume tests."""
    root, good, _ = folder
    here = tmp_path_factory.mktemp("few")
    names = good[:8] + ["empty.jpg", "not_an_image.png"]
    for name in names:
        shutil.copy(root / name, here / Path(name).name)
    listing = here / "list.txt"
    listing.write_text("\n".join(Path(n).name for n in names) + "\n")
    return here, listing


def run_predict(compiled, listing, output, *extra):
    return main(["--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--input", str(listing), "--output", str(output),
                 "--no-progress", "--batch", "4", *extra])


def test_a_batch_the_artifact_cannot_run_is_said_not_silently_changed(compiled, few_files, tmp_path, capsys):
    _, listing = few_files
    assert run_predict(compiled, listing, tmp_path / "p.csv", "--batch", "500") == 0  # a dynamic 1..64 artifact
    assert "warning: --batch 500: the artifact runs batches of 64 (its range is 1..64)" in capsys.readouterr().err


def test_postscript_never_reaches_ghostscript(monkeypatch):
    """Pillow opens EPS by running Ghostscript on it: an upload must never reach a PostScript interpreter."""
    from PIL import EpsImagePlugin

    interpreted = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: interpreted.append(args))
    with pytest.raises(ImageError, match="not an image in an accepted format .no decoder of JPEG, PNG"):
        decode_rgb_bytes(POSTSCRIPT)
    assert interpreted == []


def test_sigterm_while_decoding_in_the_main_thread_stops_the_run_not_one_image(compiled, few_files, tmp_path, monkeypatch, capsys):
    # --workers 0 decodes in the main thread, where a decode failure becomes an error row: a SIGTERM arriving there
    # must still stop the run (it once became the row "cannot preprocess (Terminated: )" and the run went on).
    from imagepiece.predict import pipeline

    _, listing = few_files
    calls = {"n": 0}
    original = pipeline.decode_rgb

    def decode_then_terminate(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(pipeline, "decode_rgb", decode_then_terminate)
    output = tmp_path / "preds.csv"
    assert run_predict(compiled, listing, output, "--workers", "0") == 143
    assert "terminated after 0 images" in capsys.readouterr().err and not output.exists()
    assert calls["n"] == 3, "no image decoded after the stop"


def test_csv_jsonl_and_parquet_hold_the_same_rows(compiled, few_files, tmp_path):
    _, listing = few_files
    outputs = [tmp_path / f"preds{suffix}" for suffix in (".csv", ".jsonl", ".parquet")]
    for output in outputs:
        assert run_predict(compiled, listing, output, "--topk", "3") == 0
        assert not list(tmp_path.glob(".*")), "no temp or journal file left behind"
    csv_rows, jsonl_rows, parquet_rows = (read_rows(output) for output in outputs)
    assert len(csv_rows) == 10 and csv_rows == jsonl_rows == parquet_rows
    header = outputs[0].read_text().splitlines()[0]
    assert header == "path,class_1,class_2,class_3,label_1,label_2,label_3,prob_1,prob_2,prob_3,error"


def test_a_csv_of_errors_only_still_has_its_topk_columns(tmp_path):
    """A shard of unreadable files gave `path,error`: a reader's df["class_1"] failed, shards did not line up."""
    for paths in (["a.jpg"], []):
        output = ResumableOutput(tmp_path / "p.csv", resume=False, topk=2)
        output.add([Row(path, error="not an image") for path in paths])
        output.finish(paths)
        assert (tmp_path / "p.csv").read_text().splitlines()[0] == "path,class_1,class_2,label_1,label_2,prob_1,prob_2,error"


def test_a_run_removes_the_staged_copies_that_killed_runs_left_beside_its_output(tmp_path):
    """A SIGKILL while the output was written left its staged copy (the output's size) for good, one per kill."""
    from imagepiece.files import staged_name

    left = [tmp_path / staged_name(tmp_path / "p.csv") for _ in range(2)]
    others = [tmp_path / staged_name(tmp_path / "q.csv"), tmp_path / ".p.partial.csv", tmp_path / "p.csv"]
    for path in left + others:
        path.write_text("x")
    ResumableOutput(tmp_path / "p.csv", resume=True, topk=1)
    assert [path.exists() for path in left + others] == [False, False, True, True, True]


def test_resume_reads_an_output_csv_that_excel_saved_with_a_bom(tmp_path):
    output = ResumableOutput(tmp_path / "p.csv", resume=False, topk=1)
    output.add([Row("a.jpg", [3], ["cat"], [0.5], "")])
    output.finish(["a.jpg"])
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "p.csv").read_bytes())  # "CSV UTF-8"
    assert ResumableOutput(tmp_path / "p.csv", resume=True, topk=1).done("a.jpg")  # was KeyError: 'path'


def open_files():
    """Paths this process has open (Linux)."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since the listing (the listing's own descriptor)
            pass
    return paths


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails with ENOSPC")
def test_a_journal_closed_after_a_full_disk_does_not_fail_a_second_time():
    # The run's handler closes the journal to say where the predictions are: flushing the same buffer failed again,
    # and the user saw a bare "[Errno 28]" instead of how to resume.
    journal = Journal(Path("/dev/full"))
    with pytest.raises(OSError, match="No space left"):
        journal.append([Row("a.jpg", error="x")])
    journal.close(after_failure=True)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc (Linux)")
def test_an_interrupted_runs_journal_is_closed_and_kept(tmp_path):
    journal = Journal(tmp_path / ".preds.csv.partial.jsonl")
    journal.append([Row("a.jpg", error="truncated")])
    assert str(journal.path.resolve()) in open_files()
    journal.close()  # what predict does on Ctrl-C: the rows stay for --resume, the file is no longer open
    assert str(journal.path.resolve()) not in open_files()
    assert journal.read() == [Row("a.jpg", error="truncated")]
    journal.close()  # twice is harmless


def test_resume_skips_done_paths_and_finishes_an_interrupted_run(compiled, few_files, tmp_path, monkeypatch, capsys):
    here, listing = few_files
    output = tmp_path / "preds.csv"
    assert run_predict(compiled, listing, output) == 0
    clean = read_rows(output)

    # Stop a fresh run with SIGTERM (as a scheduler or `timeout` does; Ctrl-C takes the same path) after its first
    # batch: the old output stays, the batch is in the journal.
    calls = {"n": 0}
    original = Classifier.classify

    def terminated(self, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, pixels)

    monkeypatch.setattr(Classifier, "classify", terminated)
    output.unlink()
    capsys.readouterr()
    assert run_predict(compiled, listing, output) == 143
    journal = tmp_path / ".preds.csv.partial.jsonl"
    assert f"terminated after 4 images; they are kept in {journal}" in capsys.readouterr().err
    assert not output.exists() and len(journal.read_text().splitlines()) >= 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is gone after the run"

    # Stopped again while resuming: the count is this run's, the earlier run's rows are named apart.
    calls["n"] = 1  # its first batch is stopped
    assert run_predict(compiled, listing, output, "--resume") == 143
    assert re.search(r"terminated after 0 images \(besides the \d+ an earlier run did\); they are kept in",
                     capsys.readouterr().err)
    monkeypatch.setattr(Classifier, "classify", original)

    # A predicted file broken after the fact keeps its prediction: --resume does not decode it again.
    first = clean[0].path
    os.rename(here / first, here / "kept.bak")
    (here / first).write_bytes(b"broken now")
    try:
        capsys.readouterr()
        assert run_predict(compiled, listing, output, "--resume") == 0
        assert "already done" in capsys.readouterr().out
    finally:
        os.replace(here / "kept.bak", here / first)
    resumed = read_rows(output)
    assert [r.path for r in resumed] == [r.path for r in clean]
    assert [(r.classes, r.error) for r in resumed] == [(r.classes, r.error) for r in clean]
    assert not journal.exists()

    # An error row is retried on --resume; a file that became readable gets its prediction.
    shutil.copy(here / first, here / "empty.jpg")
    assert run_predict(compiled, listing, output, "--resume") == 0
    after = {r.path: r for r in read_rows(output)}
    assert after["empty.jpg"].ok and after["empty.jpg"].classes == after[first].classes
    assert after["not_an_image.png"].error.startswith("not an image in an accepted format (no decoder of JPEG, PNG")
    (here / "empty.jpg").write_bytes(b"")

    # Rows of another --topk would leave a file whose rows disagree; paths spelled differently match nothing.
    capsys.readouterr()
    assert run_predict(compiled, listing, output, "--resume", "--topk", "3") == 2
    assert "holds top-5 rows, this run asks for --topk 3" in capsys.readouterr().err
    respelled = here / "respelled.txt"
    respelled.write_text("".join(f"./{path}\n" for path in (r.path for r in clean)))
    assert run_predict(compiled, respelled, output, "--resume") == 0
    error = capsys.readouterr().err
    assert "none of the 10 rows already in" in error
    assert "all 10 inputs are predicted again and the 10 earlier rows stay in the output too" in error
    assert len(read_rows(output)) == 20, "what the warning says: each file has a row under either spelling"


@pytest.mark.parametrize("args, message", [
    (["--artifact", "{missing}", "--output", "{out}.csv"], "does not exist or is not a file"),
    (["--artifact", "{artifact}", "--output", "{out}.xlsx"], "unknown format '.xlsx'"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--input", "{empty}"], "holds no image files"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--input", "{out}/nope/*.jpg"], "matches no files"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--input", "{out}/nothing_here"], "does not exist"),
    (["--artifact", "{artifact}", "--output", "{out}/no/such/dir/p.csv"], "does not exist"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--topk", "0"], "--topk must be >= 1"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--address", "auto"], "only with --ray"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--topk", "1001"], "--topk 1001 is more than the artifact's 1000 classes"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--device", "foo"], "--device 'foo' is not a device"),
    (["--artifact", "{artifact}", "--output", "{out}.csv", "--device", "cpu:1"], "there is one CPU device"),
    (["--artifact", "{artifact}", "--output", "{table}", "--input", "{table}"], "is the input: it would be overwritten"),
    (["--artifact", "{artifact}", "--output", "{out}/ray_out", "--ray", "--workers", "2"], "with --ray, Ray decodes on its CPU workers"),
    # Refused before the artifact is read (it is missing here), so before Ray starts: Ray made a folder named r.csv.
    (["--artifact", "{missing}", "--output", "{out}/r.csv", "--ray"], "names a .csv file, but --ray writes a folder of Parquet files"),
    (["--artifact", "{artifact}", "--output", "-"], "--output -: predict writes no standard output"),
    (["--artifact", "{artifact}", "--output", "/dev/stdout"], "'/dev/stdout' has no suffix: give a file name ending in .csv"),
    # A link into a folder that does not exist: found before the run, not when its rows are written.
    (["--artifact", "{artifact}", "--output", "{out}/dangling.csv"], "/no/such/dir' does not exist"),
])
def test_bad_arguments_give_one_line_and_exit_2(compiled, folder, tmp_path, capsys, args, message):
    root, _, _ = folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "table.csv").write_text(f"path\n{root / 'rgb_0.jpg'}\n")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "no" / "such" / "dir" / "p.csv")
    values = {"missing": tmp_path / "none.so", "artifact": compiled.path("ti_imagepiece_dynamic"), "out": tmp_path,
              "empty": tmp_path / "empty", "table": tmp_path / "table.csv"}
    argv = [arg.format(**values) for arg in args]
    if "--input" not in argv:
        argv += ["--input", str(root)]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


@pytest.mark.parametrize("hidden, args, message", [
    ("pyarrow", ["--output", "{out}/p.parquet"], "Parquet input or output needs pyarrow"),
    ("pyarrow", ["--output", "{out}/p.csv", "--input", "{out}/t.parquet"], "Parquet input or output needs pyarrow"),
    ("ray", ["--output", "{out}/ray_out", "--ray"], "--ray needs ray[data]"),
])
def test_a_missing_optional_package_is_named_before_any_image_is_predicted(compiled, folder, tmp_path, capsys, monkeypatch,
                                                                           hidden, args, message):
    # None in sys.modules: importlib finds no such module and `import` fails, as where it is not installed.
    monkeypatch.setitem(sys.modules, hidden, None)
    root, _, _ = folder
    argv = ["--artifact", str(compiled.path("ti_imagepiece_dynamic")), "--input", str(root), *args]
    assert main([arg.format(out=tmp_path) for arg in argv]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and message in stderr and "pip install 'imagepiece[predict]'" in stderr, stderr
    assert not list(tmp_path.iterdir()), "refused before anything was written"


def test_script_shows_progress_and_a_summary(compiled, few_files, tmp_path):
    _, listing = few_files
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--artifact", str(compiled.path("ti_imagepiece")),
                             "--input", str(listing), "--output", str(tmp_path / "p.parquet"), "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "img/s" in result.stderr and "10/10" in result.stderr, "tqdm progress on stderr"
    assert "predicted 10 images (2 errors)" in result.stdout and "inference" in result.stdout
    assert len(read_rows(tmp_path / "p.parquet")) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_artifact_stages_batches_in_pinned_memory(compiled, folder):
    root, good, _ = folder
    classifier = Classifier(str(compiled.path("cuda_ti_imagepiece_dynamic")), topk=5, batch=8)
    assert classifier.device.type == "cuda" and classifier._staging.is_pinned()
    rows = {row.path: row for batch in predict_items(list_inputs(str(root)), classifier, class_names({"num_classes": 1000})) for row in batch}
    eager = compiled.eager("cuda_ti_imagepiece_dynamic")
    preprocessing = compiled_preprocessing(compiled, "cuda_ti_imagepiece_dynamic")
    prepare = Preprocess(preprocessing)
    pixels = torch.from_numpy(np.stack([prepare(decode_rgb(str(root / n))) for n in good])).cuda()
    with torch.inference_mode():
        probs = eager(normalise(pixels, preprocessing["mean"], preprocessing["std"])).softmax(1).cpu()
    for name, expected in zip(good, probs):
        assert rows[str(root / name)].classes[0] == int(expected.argmax())


def test_e2e_benchmark_measures_files_to_rows_beside_the_model(compiled, tmp_path):
    from imagepiece.predict.bench import e2e_benchmark, report

    result = e2e_benchmark(str(compiled.path("ti_imagepiece_dynamic")), images=8, size=(500, 375), batch=4, workers=1, rounds=1,
                           folder=tmp_path)
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 8 and result["median_run"]["errors"] == 0
    assert result["batch"] == 4 and result["model_only_median"] > 0 and result["single_process_median"] > 0
    assert result["ratio_of_medians"] == result["single_process_median"] / result["model_only_median"]
    assert result["ratio"] == result["ratio_per_round"][0] == result["single_process_img_per_s"][0] / result["model_only_img_per_s"][0]
    assert 0 < result["decode_share"] < 1 and result["machine"]["torch"] == torch.__version__
    assert "single-process / model-only" in report(result)


def test_e2e_benchmark_names_what_an_int8_artifact_computes_in(compiled, tmp_path):
    pytest.importorskip("torchao", reason="int8 artifacts need torchao: pip install 'imagepiece[int8]'")
    from imagepiece.predict.bench import e2e_benchmark, report

    result = e2e_benchmark(str(compiled.path("ti_imagepiece_int8")), images=2, batch=2, workers=1, rounds=1, folder=tmp_path)
    assert (result["precision"], result["input_format"], result["dtype"]) == ("int8", "float_nchw", "fp32")  # fp32 images
    assert report(result).startswith("# predict end-to-end, deit_tiny_patch16_224 imagepiece int8 (float_nchw fp32 input)")


def test_e2e_benchmark_measures_a_uint8_input_artifact_beside_the_float_one(compiled, tmp_path):
    from imagepiece.predict.bench import e2e_benchmark, report

    result = e2e_benchmark(str(compiled.path("ti_imagepiece")), images=4, batch=2, workers=1, rounds=2, folder=tmp_path,
                           uint8_artifact=str(compiled.path("ti_imagepiece_uint8")))
    pixels = result["uint8"]
    assert pixels["input_format"] == "uint8_nhwc" and pixels["batch"] == result["batch"] == 2
    assert len(pixels["model_only_img_per_s"]) == len(pixels["single_process_img_per_s"]) == 2
    assert pixels["single_process_vs_float_per_round"] == [p / f for p, f in zip(pixels["single_process_img_per_s"], result["single_process_img_per_s"])]
    assert pixels["ratio"] == pytest.approx(sum(pixels["ratio_per_round"]) / 2)  # the median of two rounds
    assert "uint8-input artifact" in report(result)
