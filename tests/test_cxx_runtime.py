"""Artifacts share the process's C++ runtime; one that carries its own copy still loads without a crash.

On the H200 machine (Ubuntu 24.04, g++ 13, torch 2.11) AOTInductor linked libstdc++ statically into
CUDA libraries, whose constructor then crashed in std::regex's locale code beside torch's shared
libstdc++ (issue 15). Compiles now link it dynamically and warn where they could not; both loaders put the
process's libstdc++ into the global symbol scope, so a library built elsewhere binds to it. The crash is
reproduced here on the CPU with a small library that uses std::regex, built with -static-libstdc++.
"""
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import imagepiece
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


def test_the_compile_links_the_shared_runtime_where_the_toolchain_would_link_it_statically(tmp_path):
    """A g++ that adds -static-libstdc++ to every shared-library link, as the H200 machine's build did."""
    wrapper = tmp_path / "bin" / "g++"  # named g++ so that Inductor treats it as GCC
    wrapper.parent.mkdir()
    wrapper.write_text(STATIC_LINKING_GXX.format(gxx=shutil.which("g++")))
    wrapper.chmod(0o755)
    out = tmp_path / "plain.so"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compile's own check must find nothing to warn about
        compile_artifact(imagepiece.create_model("deit_tiny_patch16_224", "plain"), out, batch=2,
                         inductor_overrides={"cpp.cxx": (None, str(wrapper))})
    assert "libstdc++.so.6" in needed(out)


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
