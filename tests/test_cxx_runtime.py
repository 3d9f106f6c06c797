"""Artifacts and the runtime share the process's C++ runtime; an artifact that carries its own copy still loads.

On the GPU machines (Ubuntu 24.04, g++ 13, torch 2.11) shared libraries came out with libstdc++ linked
in statically: AOTInductor's CUDA libraries crashed in std::regex's locale code in their constructor,
beside torch's shared libstdc++, and so did libimagepiece_runtime.so itself, reading the first artifact's
metadata (issue 15). Compiles and the CMake build now link it dynamically by name (the build through
cmake/SharedCxxRuntime.cmake), and compiles warn where they could not; both loaders put the process's
libstdc++ into the global symbol scope, so a library built elsewhere binds to it. The toolchain is
reproduced here with a g++ wrapper that adds -static-libstdc++ to every shared link, and the crash with
a small library that uses std::regex.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import imagepiece
import ip_runtime
from imagepiece.artifact import open_artifact
from imagepiece.artifact_containers import ContainerError, needed_libraries
from imagepiece.export import _check_shared_cxx_runtime, compile_artifact
from imagepiece.private_copy import SealedFile

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries and libstdc++"),
              pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]

REGEX_LIBRARY = r"""
#include <regex>
#include <string>
extern "C" int parse_device(const char* text) {  // what AOTI's parse_device_str does first
  std::regex device("(cuda|cpu)(:([0-9]+))?");
  std::smatch match;
  std::string input(text);
  return std::regex_match(input, match, device) ? 1 : 0;
}
"""


STATIC_LINKING_GXX = """#!/bin/bash
for arg in "$@"; do [[ $arg == -shared ]] && exec {gxx} "$@" -static-libstdc++; done
exec {gxx} "$@"
"""
ROOT = Path(__file__).resolve().parent.parent

CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.21)
project(SharedCxxRuntimeCheck LANGUAGES CXX)
include("{root}/cmake/SharedCxxRuntime.cmake")
add_library(regex_device SHARED regex_device.cpp)
if(LINK_SHARED_CXX_RUNTIME)
  imagepiece_link_shared_cxx_runtime(regex_device)
endif()
"""


@pytest.fixture
def static_linking_gxx(tmp_path) -> Path:
    """A g++ that adds -static-libstdc++ to every shared-library link, as the GPU machines' builds did."""
    wrapper = tmp_path / "bin" / "g++"  # named g++ so that Inductor and CMake treat it as GCC
    wrapper.parent.mkdir()
    wrapper.write_text(STATIC_LINKING_GXX.format(gxx=shutil.which("g++")))
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def static_cxx_library(tmp_path_factory) -> Path:
    """A shared library with libstdc++ linked in statically."""
    compiler = shutil.which("g++")
    folder = tmp_path_factory.mktemp("static_cxx")
    source = folder / "regex_device.cpp"
    source.write_text(REGEX_LIBRARY)
    library = folder / "libregex_device.so"
    subprocess.run([compiler, "-O1", "-fPIC", "-shared", "-static-libstdc++", str(source), "-o", str(library)], check=True)
    return library


def needed(path: Path) -> list:
    data = SealedFile.copy_of(path)
    try:
        return needed_libraries(data)
    finally:
        data.close()


@pytest.mark.parametrize("name", ["ti_imagepiece", "ti_tome_pt2"])
def test_compiled_artifacts_link_the_shared_cxx_runtime(compiled, name):
    verified = open_artifact(compiled.path(name))
    try:
        libraries = needed_libraries(verified.library)
    finally:
        verified.close()
    assert "libstdc++.so.6" in libraries, libraries


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"not a library" * 8, "no ELF header"),
    (lambda data: data[: len(data) // 2], "out of range"),  # the section table sits at the end
])
def test_reading_the_linked_libraries_of_a_damaged_file_says_what_is_wrong(static_cxx_library, damage, message):
    data = SealedFile.holding(damage(static_cxx_library.read_bytes()), "damaged")
    try:
        with pytest.raises(ContainerError, match=message):
            needed_libraries(data)
    finally:
        data.close()


def test_the_compile_links_the_shared_runtime_where_the_toolchain_would_link_it_statically(tmp_path, static_linking_gxx):
    out = tmp_path / "plain.so"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compile's own check must find nothing to warn about
        compile_artifact(imagepiece.create_model("deit_tiny_patch16_224", "plain"), out, batch=2,
                         inductor_overrides={"cpp.cxx": (None, str(static_linking_gxx))})
    assert "libstdc++.so.6" in needed(out)


def test_the_runtime_and_its_bindings_link_the_shared_cxx_runtime():
    core = Path(ip_runtime._core.__file__)
    for library in (core, core.parent / "lib" / "libimagepiece_runtime.so"):
        assert "libstdc++.so.6" in needed(library), library


@pytest.mark.parametrize("linked_by_name", [True, False])
def test_the_cmake_build_links_the_shared_runtime_where_the_toolchain_would_link_it_statically(tmp_path, static_linking_gxx,
                                                                                             linked_by_name):
    """cmake/SharedCxxRuntime.cmake against the toolchain above; without it the same build is static (the check can fail)."""
    source = tmp_path / "project"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(CMAKE_PROJECT.format(root=ROOT.as_posix()))
    (source / "regex_device.cpp").write_text(REGEX_LIBRARY)
    build = tmp_path / "build"
    tools = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the venv's cmake, ninja
    for command in (["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", f"-DCMAKE_CXX_COMPILER={static_linking_gxx}",
                     f"-DLINK_SHARED_CXX_RUNTIME={'ON' if linked_by_name else 'OFF'}"], ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=tools)
        assert result.returncode == 0, result.stdout + result.stderr
    shared = any(name.startswith("libstdc++") for name in needed(build / "libregex_device.so"))
    assert shared == linked_by_name


def test_a_compile_that_links_its_own_cxx_runtime_warns(static_cxx_library):
    assert not any(name.startswith("libstdc++") for name in needed(static_cxx_library))
    verified = SimpleNamespace(library=SealedFile.copy_of(static_cxx_library))
    try:
        with pytest.warns(RuntimeWarning, match=r"linked the C\+\+ runtime statically"):
            _check_shared_cxx_runtime(verified, static_cxx_library)
    finally:
        verified.library.close()


def call_after(load: str, library: Path) -> subprocess.CompletedProcess:
    """A fresh process with torch: `load`, then call into `library`."""
    script = textwrap.dedent(f"""
        import ctypes, torch
        {load}
        print("parsed", ctypes.CDLL({str(library)!r}).parse_device(b"cuda:0"))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
def test_loaders_let_a_library_with_its_own_cxx_runtime_run(compiled, static_cxx_library, loader):
    unprepared = call_after("", static_cxx_library)
    if unprepared.returncode == 0:
        pytest.skip("this toolchain's static libstdc++ does not crash beside torch: nothing to show here")
    artifact = str(compiled.path("ti_imagepiece"))
    load = (f"import ip_runtime; ip_runtime.Runtime({artifact!r})" if loader == "ip_runtime"
            else f"from imagepiece.export import load; load({artifact!r})")
    prepared = call_after(load, static_cxx_library)
    assert prepared.returncode == 0 and "parsed 1" in prepared.stdout, prepared.stdout + prepared.stderr[-2000:]
