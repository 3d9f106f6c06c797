"""Output files (imagepiece.files): written whole or not at all, and where the user pointed."""
import os

from imagepiece.files import atomic_write_text


def test_a_symlinked_output_writes_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "target.json").write_text("old")
    os.symlink("target.json", tmp_path / "link.json")
    atomic_write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link.json", "target.json"]


def test_an_output_that_is_a_device_is_written_not_replaced(tmp_path):
    os.symlink(os.devnull, tmp_path / "discard")  # as --json /dev/stdout would be: renaming over it replaced the device
    atomic_write_text(tmp_path / "discard", "result")
    assert (tmp_path / "discard").is_symlink() and os.path.realpath(tmp_path / "discard") == os.devnull
    assert not os.path.isfile(os.devnull)
