"""Fast inference for ImagePiece artifacts through the C++ runtime (libimagepiece_runtime).

    import ip_runtime
    runtime = ip_runtime.Runtime("deit_s_ip.so")           # device from the artifact; cuda_graphs=, instances=
    logits = runtime.run(images)                           # torch.Tensor or numpy.ndarray, [B, 3, 224, 224]
                                                           # ([B, 224, 224, 3] uint8 if info["input_format"] is uint8_nhwc)
    with ip_runtime.Batcher(runtime, max_batch=16, max_delay_ms=2) as batcher:   # dynamic batching of single images
        logits = batcher.submit(image).result()            # a concurrent.futures.Future per image

Errors raise ip_runtime.Error with a `.code` ("invalid_batch", "incompatible", ...).
C++ users: find_package(ImagePiece) with CMAKE_PREFIX_PATH=ip_runtime.cmake_prefix_path.
"""
import os
import sys
from pathlib import Path

# Imported before torch, make waiting OpenMP threads sleep instead of spin unless the environment says how
# they should wait (as `import imagepiece` does; see its docstring): on shared cores spinning costs several times.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402,F401  (loads libtorch before the extension that links it)

from . import _core
from ._core import Batcher, Error, Runtime, RuntimeOptions

# Where the C++ package (lib/, include/, lib/cmake/ImagePiece) is installed: beside the compiled
# module, which in an editable install is not beside this file.
cmake_prefix_path = str(Path(_core.__file__).resolve().parent)

__all__ = ["Batcher", "Error", "Runtime", "RuntimeOptions", "cmake_prefix_path"]
