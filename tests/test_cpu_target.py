"""A CPU artifact names the CPUs it runs on, and both loaders refuse others (imagepiece.cpu_target).

Pure functions for the rules, on every machine; the loaders end to end by lowering this CPU's
capability with ATEN_CPU_CAPABILITY (as one would rehearse a smaller machine). Metadata that names
features or capabilities this CPU lacks is in test_artifact_integrity's READER_CASES.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imagepiece.artifact import read_metadata
import imagepiece.cpu_target as cpu_target
from imagepiece.cpu_target import LEVELS, compile_target, pinned_march, target_of, unsupported

AVX512_VNNI_FLAGS = "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni -mavx512vl"  # Inductor's, on a Xeon
ALL_OF_IT = {feature: True for _, features in LEVELS.values() for feature in features} | {"avx512_vnni": True}


def test_inductors_vector_isa_becomes_a_portable_level_plus_its_flags():
    avx512 = target_of("avx512 avx512_vnni", AVX512_VNNI_FLAGS)
    assert (avx512.capability, avx512.march) == ("AVX512", "x86-64-v4")
    assert set(avx512.features) == set(LEVELS["AVX512"][1]) | {"avx512_vnni"}
    avx2 = target_of("avx2", "-mavx2 -mfma -mf16c")
    assert (avx2.capability, avx2.march) == ("AVX2", "x86-64-v3") and "avx512_f" not in avx2.features
    scalar = target_of("", "")  # ATEN_CPU_CAPABILITY=default: Inductor vectorises nothing
    assert (scalar.capability, scalar.march, scalar.features) == ("DEFAULT", "x86-64-v2", tuple(sorted(LEVELS["DEFAULT"][1])))
    with pytest.raises(ValueError, match=r"-mavx10\.2, which .* cannot check"):
        target_of("avx512", "-mavx512f -mavx10.2")


def test_a_cpu_runs_its_own_level_and_below_never_above():
    features = LEVELS["AVX2"][1]
    assert unsupported("AVX2", features, "AVX512", ALL_OF_IT) is None
    assert unsupported("AVX2", features, "AVX2", ALL_OF_IT) is None
    assert unsupported("DEFAULT", LEVELS["DEFAULT"][1], "DEFAULT", ALL_OF_IT) is None
    why = unsupported("AVX512", LEVELS["AVX512"][1], "AVX2", ALL_OF_IT)
    assert why.startswith("artifact was compiled for AVX512 CPUs, this CPU supports AVX2")
    assert "SVE256" in unsupported("SVE256", (), "AVX512", ALL_OF_IT)  # another architecture's level
    assert unsupported("SVE256", (), "SVE256", {}) is None


def test_a_missing_or_unknown_feature_is_named():
    no_vnni = {**ALL_OF_IT, "avx512_vnni": False}
    assert "avx512_vnni, which this CPU lacks" in unsupported("AVX512", ("avx512_f", "avx512_vnni"), "AVX512", no_vnni)
    assert "avx1024" in unsupported("AVX512", ("avx512_f", "avx1024"), "AVX512", ALL_OF_IT)


def test_this_machine_compiles_for_what_it_runs():
    target = compile_target()
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        assert target.capability == torch.backends.cpu.get_cpu_capability()
    assert unsupported(target.capability, target.features, torch.backends.cpu.get_cpu_capability(), torch.cpu.get_capabilities()) is None


def test_the_march_level_is_pinned_where_inductor_has_no_option_for_it(monkeypatch):
    """torch 2.11's Inductor has no cpp.march and always passes -march=native: the level is swapped in."""
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpu_target, "inductor_has_march_option", lambda: False)
    original = cpp_builder._get_optimization_cflags
    assert "march=native" in original("g++")[0], "this torch's Inductor changed its flags: pinned_march needs a look"
    with pinned_march({"cpp.march": "x86-64-v3", "freezing": True}) as options:
        assert options == {"freezing": True}
        cflags = cpp_builder._get_optimization_cflags("g++")[0]
        assert "march=x86-64-v3" in cflags and "march=native" not in cflags
    assert cpp_builder._get_optimization_cflags is original

    # Inductor's flags changed (no -march=native to swap): refused, never a silently native artifact.
    monkeypatch.setattr(cpp_builder, "_get_optimization_cflags", lambda *args, **kwargs: (["O3"], []))
    with pytest.raises(RuntimeError, match="could not pin -march=x86-64-v3"):
        with pinned_march({"cpp.march": "x86-64-v3"}):
            cpp_builder._get_optimization_cflags("g++")
    with pytest.raises(RuntimeError, match="could not pin"):
        with pinned_march({"cpp.march": "x86-64-v3"}):
            pass  # nothing compiled: nothing shows the flag was swapped


def test_an_inductor_with_the_march_option_gets_it_unchanged(monkeypatch):
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpu_target, "inductor_has_march_option", lambda: True)
    original = cpp_builder._get_optimization_cflags
    with pinned_march({"cpp.march": "x86-64-v4"}) as options:
        assert options == {"cpp.march": "x86-64-v4"} and cpp_builder._get_optimization_cflags is original


def test_both_loaders_refuse_an_artifact_built_for_more_than_this_cpu_offers(compiled):
    """ATEN_CPU_CAPABILITY=default lowers what this CPU offers below any vectorised artifact."""
    path = compiled.path("ti_imagepiece")
    capability = read_metadata(path)["cpu_capability"]
    if capability == "DEFAULT":
        pytest.skip("this machine compiles scalar kernels: nothing to lower")
    script = f"""
        import ip_runtime
        from imagepiece.artifact import ArtifactError
        from imagepiece.export import load
        for make in (ip_runtime.Runtime, load):
            try:
                make({str(path)!r})
                print("loaded")
            except (ip_runtime.Error, ArtifactError) as error:
                print(error.code, "|", error)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, ATEN_CPU_CAPABILITY="default"))
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr[-2000:]
    expected = f"incompatible | artifact was compiled for {capability} CPUs, this CPU supports DEFAULT (ATEN_CPU_CAPABILITY=default)"
    assert all(line.startswith(expected) for line in lines), lines
