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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..environment import PEER_PACKAGES, machine_info, machine_slug
from ..files import atomic_write, atomic_write_text, check_writable_dir

RESULTS_ROOT = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


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
        self.stem = self._unused_stem(f"{mode}_{subject}_{self.created:%Y%m%d-%H%M%S}")
        self.saved: List[Path] = []

    def _unused_stem(self, stem: str) -> str:
        # A run of one mode that started in the second another one did had its names: it replaced that run's files.
        # (Two runs at once on one machine would measure each other anyway: the benchmarks want a quiet machine.)
        taken = lambda candidate: any(self.folder.glob(f"{glob.escape(candidate)}*"))  # noqa: E731
        return next(candidate for candidate in (stem, *(f"{stem}-{n}" for n in range(2, 10_000))) if not taken(candidate))

    @property
    def provenance(self) -> str:
        return provenance(self.machine)

    def path(self, suffix: str, variant: str = "") -> Path:
        return self.folder / f"{self.stem}{variant}{suffix}"

    def _path_to_write(self, suffix: str, variant: str = "") -> Path:
        check_writable_dir(self.folder, create=True)  # made with the first file, not when the run starts
        return self.path(suffix, variant)

    def text(self, body: str, suffix: str = ".txt") -> Path:
        """A text report (txt or markdown) under a provenance line."""
        header = f"<!-- {self.provenance} -->" if suffix == ".md" else f"# {self.provenance}"
        return self._keep(atomic_write_text(self._path_to_write(suffix), f"{header}\n{body.rstrip()}\n"))

    def json(self, payload: Dict) -> Path:
        record = {"machine": self.machine, "created": self.created.isoformat(timespec="seconds"), **payload}
        return self._keep(atomic_write_text(self._path_to_write(".json"), json.dumps(record, indent=2, default=str) + "\n"))

    def csv(self, rows: List[dict], columns: List[str]) -> Path:
        buffer = io.StringIO()
        buffer.write(f"# {self.provenance}\n")
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return self._keep(atomic_write_text(self._path_to_write(".csv"), buffer.getvalue()))

    def figure(self, draw: Callable[[Path], None], variant: str = "") -> Path:
        """A plot: `draw(path)` saves it (with `provenance` in its title)."""
        return self._keep(atomic_write(self._path_to_write(".png", variant), draw))

    def report(self, text: str, settings: Dict, **payload) -> None:
        """The usual pair, a text report and a JSON record of the settings and data; says where they went."""
        self.text(text)
        self.json({"settings": json_setting(settings), **payload})
        print(self.summary())

    def _keep(self, path: Path) -> Path:
        self.saved.append(path)
        return path

    def summary(self) -> str:
        return "saved " + ", ".join(str(path) for path in self.saved)
