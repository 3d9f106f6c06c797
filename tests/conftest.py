import os

# Before torch loads OpenMP: waiting threads sleep instead of spinning. The suite compiles artifacts in
# the background on the same 2 cores, and spinning threads beside busy processes run 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["failures_at_once"]

# CI has 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


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
