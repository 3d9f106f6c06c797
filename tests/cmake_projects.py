"""The repository's C++ programs (cpp/examples, cpp/tests), each built as a user's separate CMake project
against the installed package."""
import os
import subprocess
import sys
from pathlib import Path

import ip_runtime

ROOT = Path(__file__).resolve().parent.parent


def build_against_installed_package(source: str, build: Path, target: str) -> Path:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the venv's cmake
    for command in (["cmake", "-S", str(ROOT / source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={ip_runtime.cmake_prefix_path}"], ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    return build / target
