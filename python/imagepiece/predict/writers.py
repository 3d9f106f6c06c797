"""Output files: CSV, JSON Lines or Parquet (by suffix), written atomically, resumable.

Formats (one row per input; lists are best first):
  .jsonl    {"path", "classes": [int], "labels": [str], "probs": [float], "error": str}
  .parquet  the same columns; classes list<int64>, labels list<string>, probs list<float32>
  .csv      flat for spreadsheets and pandas: path, class_1..k, label_1..k, prob_1..k, error

A run appends each finished batch to a journal beside the output (`.<name>.partial.jsonl`, flushed
per batch), and only at the end writes the output (temp file, fsync, rename): an interrupted run
leaves the previous output intact and its progress in the journal. `--resume` reads both, skips
every path that already has a prediction, retries paths that had an error row (a file may have been
fixed or become reachable), and the final output merges old and new rows in input order, followed
by old rows whose paths are no longer in the input (they are kept, not silently dropped).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from imagepiece.files import atomic_write

from .rows import Row, round_prob

FORMATS = (".csv", ".jsonl", ".parquet")


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"output {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; use {', '.join(FORMATS)}")
    return suffix


def rows_to_arrow(rows: Iterable[Row]):
    import pyarrow as pa

    rows = list(rows)
    return pa.table({
        "path": pa.array([r.path for r in rows], pa.string()),
        "classes": pa.array([r.classes for r in rows], pa.list_(pa.int64())),
        "labels": pa.array([r.labels for r in rows], pa.list_(pa.string())),
        "probs": pa.array([r.probs for r in rows], pa.list_(pa.float32())),
        "error": pa.array([r.error for r in rows], pa.string()),
    })


def rows_from_arrow(table) -> List[Row]:
    return [Row(r["path"], r["classes"] or [], r["labels"] or [], [round_prob(p) for p in r["probs"] or []], r["error"] or "")
            for r in table.to_pylist()]


def _row_to_json(row: Row) -> str:
    return json.dumps({"path": row.path, "classes": row.classes, "labels": row.labels, "probs": row.probs, "error": row.error},
                      ensure_ascii=False)


def _row_from_json(line: str) -> Row:
    data = json.loads(line)
    return Row(data["path"], data["classes"], data["labels"], data["probs"], data["error"])


def _write_csv(handle, rows: List[Row]) -> None:
    k = max((len(r.classes) for r in rows), default=0)
    writer = csv.writer(handle)
    writer.writerow(["path", *(f"{name}_{i}" for name in ("class", "label", "prob") for i in range(1, k + 1)), "error"])
    for row in rows:
        pad = [""] * (k - len(row.classes))
        writer.writerow([row.path, *row.classes, *pad, *row.labels, *pad, *(repr(p) for p in row.probs), *pad, row.error])


def _read_csv(handle) -> List[Row]:
    rows = []
    for record in csv.DictReader(handle):
        k = sum(1 for name in record if name.startswith("class_"))
        present = [i for i in range(1, k + 1) if record[f"class_{i}"] != ""]
        rows.append(Row(record["path"], [int(record[f"class_{i}"]) for i in present], [record[f"label_{i}"] for i in present],
                        [float(record[f"prob_{i}"]) for i in present], record["error"]))
    return rows


def read_rows(path: Path) -> List[Row]:
    """The rows of an output file written by `write_rows`."""
    suffix = output_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return rows_from_arrow(pq.read_table(path))
    with open(path, newline="", encoding="utf-8") as handle:
        if suffix == ".csv":
            return _read_csv(handle)
        return [_row_from_json(line) for line in handle if line.strip()]


def write_rows(path: Path, rows: List[Row]) -> None:
    """Write `rows` to `path` atomically: readers see the old file or the whole new one."""
    suffix = output_format(path)

    def write(staged: Path) -> None:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(rows_to_arrow(rows), staged)
            return
        with open(staged, "w", newline="", encoding="utf-8") as handle:
            if suffix == ".csv":
                _write_csv(handle, rows)
            else:
                handle.writelines(_row_to_json(row) + "\n" for row in rows)

    atomic_write(path, write)


class Journal:
    """Rows of a run in progress, appended as JSON lines; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def read(self) -> List[Row]:
        if not self.path.exists():
            return []
        rows = []
        # Lines split as bytes, decoded one by one: a crash can cut the last line inside a UTF-8 character, and
        # str.splitlines() would also split inside a path holding U+2028 (JSON leaves it unescaped).
        for line in self.path.read_bytes().split(b"\n"):
            try:
                rows.append(_row_from_json(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                break
        return rows

    def append(self, rows: List[Row]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.writelines(_row_to_json(row) + "\n" for row in rows)
        self._handle.flush()

    def replace_with(self, rows: List[Row]) -> None:
        """The journal holds exactly `rows`, swapped in whole: a kill, a SIGTERM or a full disk while they are
        written leaves the previous journal as it was, never a shorter one."""
        self.close()
        atomic_write(self.path, lambda staged: staged.write_text("".join(_row_to_json(row) + "\n" for row in rows), encoding="utf-8"))

    def close(self) -> None:
        """Close the file and keep it (an interrupted run: `--resume` reads it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def check_same_topk(rows: Iterable[Row], topk: Optional[int], path: Path) -> None:
    # The rows do not say which artifact made them; their number of classes at least shows a different --topk,
    # which would leave a file whose rows disagree.
    found = {len(row.classes) for row in rows if row.ok}
    if topk is not None and found and found != {topk}:
        raise ValueError(f"cannot resume: {str(path)!r} holds top-{'/'.join(map(str, sorted(found)))} rows, this run asks for "
                         f"--topk {topk}; resume with the same --topk and artifact, or write to a new output")


def warn_if_resume_matches_nothing(earlier_paths: Sequence[str], input_paths: Sequence[str], output: Path,
                                   warn: Callable[[str], None]) -> None:
    """Earlier rows that name none of this run's inputs most likely spell the same files differently (relative vs
    absolute, ./x vs x): --resume then silently predicts everything again beside the old rows, so say so."""
    if earlier_paths and input_paths and not set(input_paths).intersection(earlier_paths):
        warn(f"none of the {len(earlier_paths)} rows already in {output} names an input path as this run spells it "
             f"(e.g. {earlier_paths[0]!r} and {input_paths[0]!r}): all are predicted again")


class ResumableOutput:
    """The output of one run: what an earlier run already did (`--resume`), and the merge at the end."""

    def __init__(self, path: Path, resume: bool, topk: Optional[int] = None) -> None:
        self.path = Path(path)
        output_format(self.path)
        self.journal = Journal(self.path.with_name(f".{self.path.name}.partial.jsonl"))
        self.previous: Dict[str, Row] = {}
        if resume:
            try:
                earlier = read_rows(self.path) if self.path.exists() else []
            except Exception as error:  # pyarrow, csv and json each fail in their own way
                raise ValueError(f"cannot resume: {str(self.path)!r} is not a readable {self.path.suffix} output "
                                 f"({type(error).__name__}: {error})") from None
            # Rewrite the journal so that it holds every earlier row: a second interruption loses nothing.
            for row in earlier + self.journal.read():
                self.previous[row.path] = row
            check_same_topk(self.previous.values(), topk, self.path)
        if self.previous:
            self.journal.replace_with(list(self.previous.values()))
        else:
            self.journal.remove()
        self.new: Dict[str, Row] = {}

    def done(self, path: str) -> bool:
        row = self.previous.get(path)
        return row is not None and row.ok

    def add(self, rows: List[Row]) -> None:
        self.journal.append(rows)
        self.new.update((row.path, row) for row in rows)

    def finish(self, input_paths: List[str]) -> List[Row]:
        """Write the merged rows (input order, then earlier rows for paths no longer listed); return them."""
        merged = [self.new.get(path) or self.previous[path] for path in input_paths]
        listed = set(input_paths)
        merged += [row for path, row in self.previous.items() if path not in listed]
        write_rows(self.path, merged)
        self.journal.remove()
        return merged
