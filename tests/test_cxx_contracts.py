"""C++ API promises that Python cannot reach (cpp/tests/contract_checks.cpp), built against the installed runtime."""
import subprocess

import pytest

from cmake_projects import build_against_installed_package


@pytest.fixture(scope="module")
def contract_checks(tmp_path_factory):
    return build_against_installed_package("cpp/tests", tmp_path_factory.mktemp("contract-checks"), "contract_checks")


@pytest.mark.parametrize("check", ["moved_from_runtime", "batcher_keeps_a_moved_or_destroyed_runtimes_model",
                                   "batcher_destroyed_by_a_cancellation_callback",
                                   "batcher_destroyed_by_a_callback_under_the_completions_lock",
                                   "batcher_destroyed_by_a_callback_during_shutdown", "submit_without_a_callback",
                                   "options_name_the_device_in_effect"])
def test_cpp_contract(contract_checks, compiled, check):
    # A crash (a use after free, a null dereference) shows as a negative return code.
    result = subprocess.run([str(contract_checks), str(compiled.path("ti_imagepiece_dynamic")), check], capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stdout + result.stderr
