"""Fast inference for ImagePiece artifacts through the C++ runtime (libimagepiece_runtime).

    import ip_runtime
    runtime = ip_runtime.Runtime("deit_s_ip.so")           # device from the artifact; cuda_graphs=, instances=
    logits = runtime.run(images)                           # torch.Tensor or numpy.ndarray, [B, 3, 224, 224]

Errors raise ip_runtime.Error with a `.code` ("invalid_batch", "incompatible", ...).
C++ users: find_package(ImagePiece) with CMAKE_PREFIX_PATH=ip_runtime.cmake_prefix_path.
"""
from pathlib import Path

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _core
from ._core import Error, Runtime, RuntimeOptions

# Where the C++ package (lib/, include/, lib/cmake/ImagePiece) is installed: beside the compiled
# module, which in an editable install is not beside this file.
cmake_prefix_path = str(Path(_core.__file__).resolve().parent)

__all__ = ["Error", "Runtime", "RuntimeOptions", "cmake_prefix_path"]
