"""A pytest plugin: with IMAGEPIECE_TEST_FAILURES_AT_ONCE=1, print each failure the moment it happens.

pytest prints failures in its final summary, which a crashing test (SIGSEGV in native code) never lets
it reach: on the H100 two failed tests' messages were lost that way, and a GPU lease rarely has time for
a rerun. scripts/gpu_check.sh sets the variable; conftest.py loads the plugin.
"""
import os
import sys

ENABLED = os.environ.get("IMAGEPIECE_TEST_FAILURES_AT_ONCE") == "1"


def pytest_runtest_logreport(report):
    if ENABLED and report.failed:
        sys.stderr.write(f"\n==== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
