import os
import shutil
import tempfile

# Before torch loads OpenMP: waiting threads sleep instead of spinning. The suite compiles artifacts in
# the background on the same 2 cores, and spinning threads beside busy processes run 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["failures_at_once"]

# CI has 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


def machine_room() -> str:
    """Memory and disk left: a suite whose compiles all fail at once has most likely run out of one of them."""
    with open("/proc/meminfo") as meminfo:
        available = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), 0)
    return (f"{available / 2**30:.1f} GiB memory available, "
            f"{shutil.disk_usage(tempfile.gettempdir()).free / 2**30:.1f} GiB free in {tempfile.gettempdir()}")


def pytest_report_header(config):
    from imagepiece.environment import cpu_model

    return f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; {machine_room()}"


def pytest_terminal_summary(terminalreporter, exitstatus):
    terminalreporter.write_line(f"machine at the end: {machine_room()}")


@pytest.fixture(scope="session")
def images():
    """A fixed batch of 2 random images (random weights, so content does not matter)."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Session-wide compiled artifacts (see tests/artifacts.py)."""
    from artifacts import CompiledArtifacts

    artifacts = CompiledArtifacts(tmp_path_factory.mktemp("artifacts"))
    yield artifacts
    artifacts.close()


@pytest.fixture(scope="session")
def classify_app(tmp_path_factory):
    """cpp/examples/classify, built against the installed package."""
    from cmake_projects import build_against_installed_package

    return build_against_installed_package("cpp/examples", tmp_path_factory.mktemp("classify-build"), "classify")
