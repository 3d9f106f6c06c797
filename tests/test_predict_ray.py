"""imagepiece-predict --ray on a local 2-CPU Ray: the same rows as the single-process path, and --resume."""
import logging
import shutil

import pyarrow.parquet as pq
import pytest
import ray

from image_files import write_bad_images, write_good_images
from imagepiece.predict.cli import main
from imagepiece.predict.ray_job import resume_plan
from imagepiece.predict.rows import Row
from imagepiece.predict.sources import InputItem
from imagepiece.predict.writers import read_rows, rows_from_arrow

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


def test_ray_rows_equal_single_process_rows_and_resume_adds_only_new_ones(compiled, tmp_path, local_ray, capfd):
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
    assert main(common + ["--output", str(output), "--ray", "--concurrency", "1"]) == 0
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


def test_resume_replaces_only_error_rows_of_paths_listed_again():
    # No Ray needed: which rows a --ray --resume redoes, and which earlier error rows it then drops.
    earlier = [Row("done.jpg", classes=[1], labels=["a"], probs=[0.9]), Row("broken.jpg", error="truncated"),
               Row("unlisted.jpg", error="truncated")]
    items = [InputItem("done.jpg", "/x/done.jpg"), InputItem("broken.jpg", "/x/broken.jpg"), InputItem("new.jpg", "/x/new.jpg")]
    todo, retried = resume_plan(earlier, items)
    assert [item.path for item in todo] == ["broken.jpg", "new.jpg"]
    assert retried == {"broken.jpg"}, "an error row of a path no longer listed is kept, as in the single-process path"
