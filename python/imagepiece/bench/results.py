"""The one place benchmark results are written: benchmarks/results/<machine>/<mode>_<subject>_<time>.*

Every file names the machine and the software it was measured with: text files (txt, md, csv) open
with a provenance comment, JSON files carry a "machine" object, plots a provenance title. Files are
written atomically, so an interrupted run never leaves a half file among the records.
"""
from __future__ import annotations

import csv
import datetime
import glob
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..environment import PEER_PACKAGES, machine_info, machine_slug
from ..files import atomic_write, check_writable_dir

RESULTS_ROOT = Path(__file__).resolve().parents[3] / "benchmarks" / "results"

# Every file this process's run has written: a run stopped between its files (the csv written, the plot not yet)
# takes them back, so that a record is whole or absent.
_written_by_this_run: List[Path] = []


def begin_record() -> None:
    """A new run in this process (the CLI's main): the files of earlier, finished runs are theirs to keep."""
    _written_by_this_run.clear()


def remove_unfinished_record() -> List[Path]:
    """Removes the files this process's run has written so far (called when it is stopped); returns them."""
    removed = list(_written_by_this_run)
    for path in removed:
        path.unlink(missing_ok=True)
    _written_by_this_run.clear()
    return removed


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinity (a figure not measured: no GPU memory on the CPU, no eager baseline in the
    run) made None, recursively: JSON has no NaN, and strict readers (JavaScript's JSON.parse) refuse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_setting(value: Any) -> Any:
    """A command-line setting as JSON that readers can compare without parsing Python reprs: numbers,
    booleans, None and lists stay themselves; paths, dtypes and anything else become strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_setting(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_setting(item) for key, item in value.items()}
    return str(value)


def provenance(machine: dict) -> str:
    """One line: CPU, cores, threads, GPU and library versions."""
    gpu = machine.get("gpu") or ("no GPU used" if machine.get("device") == "cpu" else "no GPU")  # a CPU run on a GPU host
    peers = "".join(f", {name} {machine[name]}" for name in PEER_PACKAGES if machine.get(name))
    low_precision = "/".join(machine.get("cpu_low_precision", [])) or "no bf16/VNNI/AMX"
    return (f"{machine['cpu']} ({machine['cpu_cores']} cores, {low_precision}, {machine['torch_threads']} torch threads), "
            f"{gpu}; torch {machine['torch']}, CUDA {machine.get('cuda')}, timm {machine.get('timm')}{peers}")


def results_folder(root: Path, machine: dict) -> Path:
    """Where a run's files go: `root`/<machine>, or ValueError (one line) when nothing could be written there;
    nothing is made (the CLI checks it before a run, `ResultsWriter` makes it when it writes its first file)."""
    folder = Path(root) / machine_slug(machine)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        where = "" if existing == folder else f": {str(existing)!r} is"
        raise ValueError(f"results folder {str(folder)!r}{where or ' is'} a file, not a folder")
    check_writable_dir(existing)
    return folder


class ResultsWriter:
    """The files of one benchmark run.

    Args:
        root: results root; a folder named after the machine is made below it when the first file is written
            (an interrupted run leaves no empty folder).
        mode: the benchmark mode ("suite", "compile", ...), first part of every file name.
        subject: what was measured, e.g. "deit_small_patch16_224_cpu".
        machine: `environment.machine_info(device)` if given, else made here for `device`.
        device: what the run measured on (--device): a CPU run is filed under the CPU, a CUDA run under its GPU.
    """

    def __init__(self, root: Path, mode: str, subject: str, machine: Optional[dict] = None, device: Optional[str] = None) -> None:
        self.machine = machine or machine_info(device)
        self.created = datetime.datetime.now()
        self.folder = results_folder(root, self.machine)
        self.wanted_stem = f"{mode}_{subject}_{self.created:%Y%m%d-%H%M%S}"
        self.stem: Optional[str] = None  # claimed by the run's first file (`_write`)
        self.saved: List[Path] = []

    def _unused_stem(self) -> str:
        taken = lambda candidate: any(self.folder.glob(f"{glob.escape(candidate)}*"))  # noqa: E731
        stems = (self.wanted_stem, *(f"{self.wanted_stem}-{n}" for n in range(2, 10_000)))
        return next(candidate for candidate in stems if not taken(candidate))

    def _write(self, suffix: str, write: Callable[[Path], None], variant: str = "") -> Path:
        """Write one file of the run, never over an existing one.

        Two runs of a mode that start in the same second want the same names. The first file a run
        writes claims its stem: it is linked in place only if no file has that name yet, and a run that
        finds it taken moves on to `<stem>-2`, ... (both runs write their files in the same order, so
        they meet at the first one). A later file of a claimed stem that exists all the same is an error,
        never a silent replacement of another run's record.
        """
        check_writable_dir(self.folder, create=True)  # made with the first file, not when the run starts
        while True:
            stem = self.stem or self._unused_stem()
            try:
                path = atomic_write(self.folder / f"{stem}{variant}{suffix}", write, replace=False)
            except FileExistsError:
                if self.stem is None:
                    continue
                raise RuntimeError(f"another run wrote {self.folder / f'{stem}{variant}{suffix}'} under this run's name; "
                                   "this run's file was not saved") from None
            self.stem = stem
            self.saved.append(path)
            _written_by_this_run.append(path)
            return path

    @property
    def provenance(self) -> str:
        return provenance(self.machine)

    def text(self, body: str, suffix: str = ".txt") -> Path:
        """A text report (txt or markdown) under a provenance line."""
        header = f"<!-- {self.provenance} -->" if suffix == ".md" else f"# {self.provenance}"
        return self._write(suffix, lambda staged: staged.write_text(f"{header}\n{body.rstrip()}\n"))

    def json(self, payload: Dict) -> Path:
        record = {"machine": self.machine, "created": self.created.isoformat(timespec="seconds"), **payload}
        text = json.dumps(finite_or_none(record), indent=2, default=str, allow_nan=False)
        return self._write(".json", lambda staged: staged.write_text(text + "\n"))

    def csv(self, rows: List[dict], columns: List[str]) -> Path:
        buffer = io.StringIO()
        buffer.write(f"# {self.provenance}\n")
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(({key: "" if value is None else value for key, value in finite_or_none(row).items()} for row in rows))
        return self._write(".csv", lambda staged: staged.write_text(buffer.getvalue()))

    def figure(self, draw: Callable[[Path], None], variant: str = "") -> Path:
        """A plot: `draw(path)` saves it (with `provenance` in its title)."""
        return self._write(".png", draw, variant)

    def report(self, text: str, settings: Dict, **payload) -> None:
        """The usual pair, a text report and a JSON record of the settings and data; says where they went."""
        self.text(text)
        self.json({"settings": json_setting(settings), **payload})
        print(self.summary())

    def summary(self) -> str:
        return "saved " + ", ".join(str(path) for path in self.saved)
