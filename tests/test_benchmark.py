"""scripts/benchmark.py: the --quick run produces complete, well-formed results (not a timing test)."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from imagepiece.bench.report import COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def benchmark(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *map(str, args)], capture_output=True, text=True)


def test_quick_run_writes_every_column(tmp_path):
    result = benchmark("--quick", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = tmp_path.iterdir()
    stems = {p.suffix: p for p in folder.iterdir()}
    assert set(stems) == {".csv", ".json", ".md", ".png"}

    lines = stems[".csv"].read_text().splitlines()
    assert lines[0].startswith("# ") and "torch" in lines[0]  # machine and versions ride along
    rows = list(csv.DictReader(lines[1:]))
    assert list(rows[0]) == COLUMNS
    assert {(r["variant"], r["path"]) for r in rows} == {(v, p) for v in ("deit", "imagepiece") for p in ("eager", "aoti", "ip_runtime")}
    for row in rows:
        for column in ("p50_ms", "p90_ms", "img_per_s", "gflops_per_image", "mean_tokens", "vs_plain", "peak_mem_mib"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, (column, row)
        assert float(row["p90_ms"]) >= float(row["p50_ms"])
        assert len(row["tokens_per_block"].split()) == 12
    plain = [r for r in rows if r["variant"] == "deit"]
    assert all(float(r["vs_plain"]) == 1.0 for r in plain)
    ours = next(r for r in rows if r["variant"] == "imagepiece")
    assert float(ours["gflops_per_image"]) < 0.6 * float(plain[0]["gflops_per_image"])  # 56% of the tokens

    report = json.loads(stems[".json"].read_text())
    assert {"cpu", "torch", "cuda", "gpu"} <= set(report["machine"]) and len(report["rows"]) == len(rows)
    assert "| ImagePiece | ip_runtime | 2 |" in stems[".md"].read_text()
    assert stems[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "dynamicvit"], "invalid choice: 'dynamicvit'"),
        (["--paths", "onnxruntime"], "invalid choice: 'onnxruntime'"),
        (["--batch", "0"], "--batch sizes must be >= 1"),
        (["--paths", "ip_runtime_graphs"], "cannot run on cpu"),
        (["--dtype", "fp16"], "fp16 is not supported on cpu"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--paths", "cpp", "--cpp-bench", "/nonexistent/bench_runtime"], "needs the google-benchmark binary"),
    ],
)
def test_bad_arguments_are_refused_clearly(tmp_path, args, message):
    result = benchmark(*args, "--out", tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
