"""Which x86 CPUs a CPU artifact can run on: fixed at compile time, checked at load.

Inductor compiles its C++ kernels for the machine that builds them. Left alone it passes
`-march=native` (on an AVX-512 Xeon that is `-march=cooperlake ... -mavx512fp16 -mavx512bf16`), so an
artifact may use any instruction of the build machine and die with SIGILL elsewhere. `compile_target`
pins what the compiler may use instead, as a portable level plus Inductor's own vector flags:

  * the vector ISA is the one Inductor picks (`torch._inductor.cpu_vec_isa.pick_vec_isa`: the best the
    CPU has, lowered by ATEN_CPU_CAPABILITY); its ATen name is the artifact's `cpu_capability`
    ("AVX512", "AVX2", "DEFAULT" for scalar code);
  * `-march` is the x86-64 micro-architecture level of that ISA (x86-64-v4 for AVX-512, v3 for AVX2,
    v2 otherwise), so nothing beyond the level and Inductor's explicit `-m` flags is allowed;
  * `cpu_features` lists everything that allows, in the names of `torch.cpu.get_capabilities()` (the
    same cpuinfo map as C++ `at::cpu::get_cpu_capabilities()`).

A loader refuses (`incompatible`) when the running CPU's ATen capability is lower than the artifact's
(ATEN_CPU_CAPABILITY lowers it, as it lowers ATen's and Inductor's own kernels: a way to rehearse a
smaller machine) or when it lacks a listed feature. The C++ runtime (cpp/src/metadata.cpp) applies
the same rules. Other architectures are compiled for the build machine as Inductor does by default
and checked by capability only.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

# ATen's x86 capabilities, lowest first (`torch.backends.cpu.get_cpu_capability()`).
X86_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
# cpuinfo names of what each -march level guarantees (cx16, lahf, movbe and xsave have no cpuinfo key:
# every CPU with the rest has them).
_V2 = ("popcnt", "sse3", "sse4_1", "sse4_2", "ssse3")
_V3 = (*_V2, "avx", "avx2", "bmi", "bmi2", "f16c", "fma3", "lzcnt")
_V4 = (*_V3, "avx512_bw", "avx512_cd", "avx512_dq", "avx512_f", "avx512_vl")
LEVELS = {"AVX512": ("x86-64-v4", _V4), "AVX2": ("x86-64-v3", _V3), "DEFAULT": ("x86-64-v2", _V2)}
# Inductor's vector-ISA compiler flags -> cpuinfo names.
FLAG_FEATURES = {
    "avx2": "avx2", "fma": "fma3", "f16c": "f16c",
    "avx512f": "avx512_f", "avx512dq": "avx512_dq", "avx512vl": "avx512_vl", "avx512bw": "avx512_bw", "avx512cd": "avx512_cd",
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16",
}


@dataclass(frozen=True)
class CpuTarget:
    capability: str  # ATen's name of the vector ISA the kernels use
    features: Tuple[str, ...]  # cpuinfo names of every instruction-set extension the compiler may use
    march: Optional[str]  # the -march Inductor is given (None: its default, the build machine)


def target_of(isa: str, arch_flags: str) -> CpuTarget:
    """The x86 target for Inductor's vector ISA `isa` (e.g. "avx512 avx512_vnni", "" for none) compiled
    with `arch_flags` (its `build_arch_flags()`); ValueError for a flag that no loader could check."""
    capability = {"avx512": "AVX512", "avx2": "AVX2"}.get(isa.split()[0] if isa.split() else "", "DEFAULT")
    march, features = LEVELS[capability]
    extra = []
    for flag in arch_flags.split():
        name = flag[2:] if flag.startswith("-m") else flag
        if name not in FLAG_FEATURES:
            raise ValueError(f"Inductor compiles CPU kernels with {flag}, which imagepiece.cpu_target cannot check at load "
                             "(add it to FLAG_FEATURES, or compile with ATEN_CPU_CAPABILITY=avx2)")
        extra.append(FLAG_FEATURES[name])
    return CpuTarget(capability, tuple(sorted(set(features) | set(extra))), march)


def compile_target() -> CpuTarget:
    """What a CPU artifact compiled now, in this process, is built for (see the module docstring)."""
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from .environment import logger_quieted  # imports torch at its top: here, as torch is

    if platform.machine() not in ("x86_64", "AMD64"):
        return CpuTarget(torch.backends.cpu.get_cpu_capability(), (), None)
    # Inductor's ISA probe imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" wherever a CUDA
    # toolkit is installed without a GPU: noise in a command that asks only which CPU it compiles for.
    with logger_quieted("torch.utils.cpp_extension"):
        isa = pick_vec_isa()
    return target_of(str(isa) if isa else "", isa.build_arch_flags() if isa else "")


def unsupported(capability: str, features: Sequence[str], running: str, available: Dict[str, object]) -> Optional[str]:
    """Why a CPU whose ATen capability is `running` and whose cpuinfo map is `available` cannot run
    code built for `capability` + `features` (None when it can)."""
    if capability != running and capability != "DEFAULT":
        incomparable = capability not in X86_CAPABILITIES or running not in X86_CAPABILITIES
        if incomparable or X86_CAPABILITIES.index(running) < X86_CAPABILITIES.index(capability):
            lowered = os.environ.get("ATEN_CPU_CAPABILITY")
            because = f" (ATEN_CPU_CAPABILITY={lowered})" if lowered else ""
            return f"artifact was compiled for {capability} CPUs, this CPU supports {running}{because}: recompile it on (or for) this machine"
    missing = [feature for feature in features if available.get(feature) is not True]
    if missing:
        return (f"artifact was compiled for CPUs with {', '.join(missing)}, which this CPU lacks: "
                "recompile it on this machine (or with ATEN_CPU_CAPABILITY set to what every target CPU has)")
    return None


def check_this_cpu(capability: str, features: Sequence[str]) -> Optional[str]:
    """`unsupported` for the CPU this process runs on."""
    import torch

    return unsupported(capability, features, torch.backends.cpu.get_cpu_capability(), torch.cpu.get_capabilities())


def inductor_has_march_option() -> bool:
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.cpp, "march")


@contextlib.contextmanager
def pinned_march(options: Dict[str, object]) -> Iterator[Dict[str, object]]:
    """Inductor options in which `cpp.march` works on every torch this package supports.

    Inductor's `cpp.march` option is recent (torch 2.14 has it, 2.11 does not); older Inductors always
    compile with `-march=native`. There, for as long as the block runs, that one flag is swapped for the
    requested level where Inductor builds its C++ flags (`cpp_builder._get_optimization_cflags`), and the
    block gets the options without `cpp.march`. If the block compiled C++ without the flag being swapped
    (Inductor's flags changed), the artifact would silently use the build machine's instructions while its
    metadata promised a portable level: that raises RuntimeError instead.
    """
    march = options.get("cpp.march")
    if march is None or inductor_has_march_option():
        yield options
        return
    from torch._inductor import cpp_builder

    original = getattr(cpp_builder, "_get_optimization_cflags", None)
    if original is None:
        raise RuntimeError(f"cannot pin -march={march} with this torch's Inductor (no cpp.march option and no "
                           "_get_optimization_cflags): upgrade torch")
    swapped = []

    def with_march(*args, **kwargs):
        cflags, ldflags = original(*args, **kwargs)
        swapped.append("march=native" in cflags)
        return [f"march={march}" if flag == "march=native" else flag for flag in cflags], ldflags

    cpp_builder._get_optimization_cflags = with_march
    try:
        yield {name: value for name, value in options.items() if name != "cpp.march"}
    finally:
        cpp_builder._get_optimization_cflags = original
    if not swapped or not all(swapped):
        raise RuntimeError(f"could not pin -march={march}: this torch's Inductor did not compile with -march=native "
                           "where expected; upgrade torch")
