"""C++ API promises that Python cannot reach (cpp/tests/contract_checks.cpp), built against the installed runtime."""
import os
import subprocess
from pathlib import Path

import pytest

import ip_runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def contract_checks(tmp_path_factory):
    build = tmp_path_factory.mktemp("contract-checks")
    env = dict(os.environ, PATH=f"{Path(os.sys.executable).parent}:{os.environ['PATH']}")  # the venv's cmake
    for command in (["cmake", "-S", str(ROOT / "cpp" / "tests"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={ip_runtime.cmake_prefix_path}"], ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    return build / "contract_checks"


@pytest.mark.parametrize("check", ["moved_from_runtime", "batcher_destroyed_by_a_cancellation_callback", "submit_without_a_callback",
                                   "options_name_the_device_in_effect"])
def test_cpp_contract(contract_checks, compiled, check):
    # A crash (a use after free, a null dereference) shows as a negative return code.
    result = subprocess.run([str(contract_checks), str(compiled.path("ti_imagepiece_dynamic")), check], capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stdout + result.stderr
