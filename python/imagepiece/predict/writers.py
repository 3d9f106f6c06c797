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
by old rows whose paths are no longer in the input (they are kept, not silently dropped). A run without
`--resume` replaces the output: it marks its journal so (`.<name>.replacing`), and resuming it reads only
the journal, never the rows it was replacing (another model's, say, or of images changed since).

Rows are streamed, never all held in memory: a run keeps one flag per earlier path, and the final
output is written from the journal through an index of its lines (one offset per path).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from itertools import chain, islice
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from imagepiece.files import atomic_write, remove_stale_staged, staged_name

from .rows import Row, round_prob

FORMATS = (".csv", ".jsonl", ".parquet")
PARQUET_ROWS_PER_GROUP = 16_384  # rows converted to Arrow at a time while writing or reading Parquet


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if not suffix:
        raise ValueError(f"output {str(path)!r} has no suffix: give a file name ending in {', '.join(FORMATS[:-1])} or {FORMATS[-1]} (the suffix "
                         "picks the format; standard output is not supported)")
    if suffix not in FORMATS:
        raise ValueError(f"output {str(path)!r}: unknown format {suffix!r}; use {', '.join(FORMATS)}")
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


def _write_csv(handle, rows: Iterable[Row], k: int) -> None:
    writer = csv.writer(handle)
    writer.writerow(["path", *(f"{name}_{i}" for name in ("class", "label", "prob") for i in range(1, k + 1)), "error"])
    for row in rows:
        pad = [""] * (k - len(row.classes))
        writer.writerow([row.path, *row.classes, *pad, *row.labels, *pad, *(repr(p) for p in row.probs), *pad, row.error])


def _read_csv(handle) -> Iterator[Row]:
    for record in csv.DictReader(handle):
        k = sum(1 for name in record if name.startswith("class_"))
        present = [i for i in range(1, k + 1) if record[f"class_{i}"] != ""]
        yield Row(record["path"], [int(record[f"class_{i}"]) for i in present], [record[f"label_{i}"] for i in present],
                  [float(record[f"prob_{i}"]) for i in present], record["error"])


def iter_rows(path: Path) -> Iterator[Row]:
    """The rows of an output file written by `write_rows`, one at a time."""
    suffix = output_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_ROWS_PER_GROUP):
            yield from rows_from_arrow(batch)
        return
    # -sig: an output re-saved by Excel ("CSV UTF-8") starts with a BOM, which would become part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if suffix == ".csv":
            yield from _read_csv(handle)
        else:
            yield from (_row_from_json(line) for line in handle if line.strip())


def read_rows(path: Path) -> List[Row]:
    """The rows of an output file written by `write_rows`."""
    return list(iter_rows(path))


def _chunks(rows: Iterable[Row], size: int) -> Iterator[List[Row]]:
    rows = iter(rows)
    while chunk := list(islice(rows, size)):
        yield chunk


def write_rows(path: Path, rows: Iterable[Row], k: Optional[int] = None) -> None:
    """Write `rows` to `path` atomically (readers see the old file or the whole new one), streaming them.
    A CSV has k columns of each kind for the widest row: give `k`, or the rows are listed first to find it."""
    suffix = output_format(path)
    if suffix == ".csv" and k is None:
        rows = list(rows)
        k = max((len(r.classes) for r in rows), default=0)

    def write(staged: Path) -> None:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            with pq.ParquetWriter(staged, rows_to_arrow([]).schema) as writer:
                for chunk in _chunks(rows, PARQUET_ROWS_PER_GROUP):
                    writer.write_table(rows_to_arrow(chunk))
            return
        with open(staged, "w", newline="", encoding="utf-8") as handle:
            if suffix == ".csv":
                _write_csv(handle, rows, k)
            else:
                handle.writelines(_row_to_json(row) + "\n" for row in rows)

    atomic_write(path, write)


class Journal:
    """Rows of a run in progress, appended as JSON lines; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def entries(self) -> Iterator[Tuple[int, Row]]:
        """(byte offset, row) of each whole line, up to the first that is not one (a crash mid-write)."""
        if not self.path.exists():
            return
        for offset, line in self._lines():
            row = _parse_line(line)
            if row is None:
                return
            yield offset, row

    def path_offsets(self) -> Dict[str, int]:
        """Where each path's last row starts. Only for a journal this run wrote and closed (whole lines only):
        it decodes just the path that opens each line."""
        return {_path_of(line): offset for offset, line in self._lines()}

    def _lines(self) -> Iterator[Tuple[int, bytes]]:
        # Lines split as bytes, decoded one by one: a crash can cut the last line inside a UTF-8 character, and
        # str.splitlines() would also split inside a path holding U+2028 (JSON leaves it unescaped).
        with open(self.path, "rb") as handle:
            offset = 0
            for line in handle:
                yield offset, line
                offset += len(line)

    def read(self) -> List[Row]:
        return [row for _, row in self.entries()]

    def append(self, rows: List[Row]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.writelines(_row_to_json(row) + "\n" for row in rows)
        self._handle.flush()

    def replace_with(self, rows: Iterable[Row]) -> None:
        """The journal holds exactly `rows`, swapped in whole: a kill, a SIGTERM or a full disk while they are
        written leaves the previous journal as it was, never a shorter one."""
        self.close()

        def write(staged: Path) -> None:
            with open(staged, "w", encoding="utf-8") as handle:
                handle.writelines(_row_to_json(row) + "\n" for row in rows)

        atomic_write(self.path, write)

    def close(self, after_failure: bool = False) -> None:
        """Close the file and keep it (an interrupted run: `--resume` reads it). `after_failure`: a write failed (a
        full disk), and flushing what is buffered may fail the same way; the journal then ends with a torn line,
        which `read` ignores."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except OSError:
                if not after_failure:
                    raise

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


_JSON = json.JSONDecoder()
_PATH_KEY = '{"path": '  # how _row_to_json begins every line


def _path_of(line: bytes) -> str:
    text = line.decode("utf-8")
    if not text.startswith(_PATH_KEY):
        raise ValueError(f"not a journal line: {text[:80]!r}")
    return _JSON.raw_decode(text, len(_PATH_KEY))[0]


def _parse_line(line: bytes) -> Optional[Row]:
    try:
        return _row_from_json(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None


def check_same_topk(rows: Iterable[Row], topk: Optional[int], path: Path) -> None:
    # The rows do not say which artifact made them; their number of classes at least shows a different --topk,
    # which would leave a file whose rows disagree.
    check_topk_found({len(row.classes) for row in rows if row.ok}, topk, path)


def check_topk_found(found: Set[int], topk: Optional[int], path: Path) -> None:
    """`found`: the numbers of classes the earlier prediction rows hold."""
    if topk is not None and found and found != {topk}:
        raise ValueError(f"cannot resume: {str(path)!r} holds top-{'/'.join(map(str, sorted(found)))} rows, this run asks for "
                         f"--topk {topk}; resume with the same --topk and artifact, or write to a new output")


def warn_if_resume_matches_nothing(earlier_paths: Sequence[str], input_paths: Sequence[str], output: Path,
                                   warn: Callable[[str], None]) -> None:
    """Earlier rows that name none of this run's inputs most likely spell the same files differently (relative vs
    absolute, ./x vs x): --resume then predicts everything again and, as it keeps rows of paths no longer listed,
    leaves the old rows beside the new ones, so say so."""
    if earlier_paths and input_paths and not set(input_paths).intersection(earlier_paths):
        warn(f"none of the {len(earlier_paths)} rows already in {output} names an input path as this run spells it "
             f"(e.g. {earlier_paths[0]!r} and {input_paths[0]!r}): all {len(input_paths)} inputs are predicted again and the "
             f"{len(earlier_paths)} earlier rows stay in the output too (a file named both ways then has two rows); run "
             "without --resume to replace them")


class ResumableOutput:
    """The output of one run: what an earlier run already did (`--resume`), and the merge at the end."""

    def __init__(self, path: Path, resume: bool, topk: Optional[int] = None) -> None:
        self.path = Path(path)
        output_format(self.path)
        remove_stale_staged(self.path)  # the run holds the output's lock: no other writer's copy is there
        self.journal = Journal(journal_path(self.path))
        # Present while an unfinished run replaces the output: its rows are not the ones a resume keeps.
        self.replacing = replacing_marker(self.path)
        self._keeps_output = resume and not self.replacing.exists()
        self._predicted: Dict[str, bool] = {}  # each earlier path: whether its latest row is a prediction
        # A CSV's columns of each kind: the run's top-k (a run of errors only still has them), or a wider earlier row's.
        self._widest = topk or 0
        if resume:
            # Rewrite the journal so that it holds every earlier row: a second interruption loses nothing.
            self.journal.replace_with(self._latest_earlier_rows(topk))
        else:
            self.journal.remove()
            self.replacing.write_text("the journal beside this file belongs to a run replacing the output\n")

    def _earlier_rows(self) -> Iterator[Row]:
        """The earlier output's rows (unless an interrupted run was replacing them), then the journal's (newer: a
        path's last row is the one that counts)."""
        try:
            yield from iter_rows(self.path) if self._keeps_output and self.path.exists() else ()
        except Exception as error:  # pyarrow, csv and json each fail in their own way
            raise ValueError(f"cannot resume: {str(self.path)!r} is not a readable {self.path.suffix} output "
                             f"({type(error).__name__}: {error})") from None
        yield from (row for _, row in self.journal.entries())

    def _latest_earlier_rows(self, topk: Optional[int]) -> Iterator[Row]:
        # Two passes, so that neither the rows nor a repeatedly interrupted run's duplicates pile up:
        # the first finds where each path's last row is, the second keeps only those.
        last_seen = {row.path: index for index, row in enumerate(self._earlier_rows())}
        self._predicted = dict.fromkeys(last_seen, False)  # in the order each path first came (the output's tail)
        for index, row in enumerate(self._earlier_rows()):
            if last_seen[row.path] == index:
                check_same_topk([row], topk, self.path)
                self._predicted[row.path] = row.ok
                self._widest = max(self._widest, len(row.classes))
                yield row

    @property
    def earlier_paths(self) -> List[str]:
        return list(self._predicted)

    def done(self, path: str) -> bool:
        return self._predicted.get(path, False)

    def add(self, rows: List[Row]) -> None:
        self.journal.append(rows)
        self._widest = max([self._widest, *(len(row.classes) for row in rows)])

    def finish(self, input_paths: List[str]) -> None:
        """Write the merged rows: input order, then earlier rows for paths no longer listed."""
        self.journal.close()
        where = self.journal.path_offsets() if self.journal.path.exists() else {}
        missing = next((path for path in input_paths if path not in where), None)
        if missing is not None:  # every input got a row (a prediction or an error): anything else is a bug
            raise RuntimeError(f"no row for input {missing!r}; the rows so far are kept in {self.journal.path}")
        listed = set(input_paths)
        ordered = chain(input_paths, (path for path in self._predicted if path not in listed))
        if not where:  # no input and nothing earlier: no journal was written
            write_rows(self.path, [], self._widest)
        else:
            with open(self.journal.path, "rb") as handle:
                write_rows(self.path, (_row_at(handle, where[path]) for path in ordered), self._widest)
        self.replacing.unlink(missing_ok=True)  # before the journal: the output now holds the replacing run's rows
        self.journal.remove()


def _hidden_beside(output: Path, ending: str) -> Path:
    return output.with_name(f".{output.name}{ending}")


def journal_path(output: Path) -> Path:
    return _hidden_beside(output, ".partial.jsonl")


def replacing_marker(output: Path) -> Path:
    return _hidden_beside(output, ".replacing")


def lock_path(output: Path) -> Path:
    """Held while a run writes `output` (a file, or --ray's folder, which may be "." or ".."): files.held_exclusively."""
    return _hidden_beside(Path(os.path.abspath(output)), ".lock")


def names_beside(output: Path) -> List[str]:
    """Every name a run writes beside `output`: the journal, the marker, the lock, and their staged copies."""
    journal = journal_path(output)
    return [journal.name, staged_name(journal), staged_name(output), replacing_marker(output).name, lock_path(output).name]


def _row_at(handle: BinaryIO, offset: int) -> Row:
    if handle.tell() != offset:  # rows mostly come in journal order: no seek, the read buffer stays
        handle.seek(offset)
    return _row_from_json(handle.readline().decode("utf-8"))
