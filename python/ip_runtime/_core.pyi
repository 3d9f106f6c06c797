"""Type stub of the ip_runtime extension (cpp/bindings/ip_runtime.cpp)."""
from typing import Any, Optional, Sequence, TypeVar, Union, overload

import numpy as np
import torch

_Out = TypeVar("_Out", torch.Tensor, np.ndarray)

class Error(RuntimeError):
    """Any runtime failure; `code` names the kind, as imagepiece::ErrorCode does in C++."""

    code: str

class RuntimeOptions:
    device: str
    instances: int
    cuda_graphs: bool
    batch_buckets: list[int]
    def __init__(self) -> None: ...

class Runtime:
    def __init__(
        self,
        artifact: str,
        device: str = "",
        instances: int = 1,
        cuda_graphs: bool = False,
        batch_buckets: Sequence[int] = ...,
    ) -> None: ...
    @overload
    def run(self, images: torch.Tensor, logits: None = None) -> torch.Tensor: ...
    @overload
    def run(self, images: np.ndarray, logits: None = None) -> np.ndarray: ...
    @overload
    def run(self, images: Union[torch.Tensor, np.ndarray], logits: _Out) -> _Out: ...
    @property
    def info(self) -> dict[str, Any]: ...
    @property
    def options(self) -> RuntimeOptions: ...
