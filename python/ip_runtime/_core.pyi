"""Type stub of the ip_runtime extension (cpp/bindings/ip_runtime.cpp, batcher_bindings.cpp)."""
import concurrent.futures
import os
from typing import Any, Optional, Sequence, TypeVar, Union, overload

import numpy as np
import torch

_Out = TypeVar("_Out", torch.Tensor, np.ndarray)

class Error(RuntimeError):
    """Any runtime failure; `code` names the kind, as imagepiece::ErrorCode does in C++."""

    code: Optional[str]  # None only on an Error made by the caller, not raised by the runtime

class RuntimeOptions:
    """What Runtime.options returns: the options a Runtime was loaded with, as in effect (a copy)."""

    device: str
    instances: int
    cuda_graphs: bool
    batch_buckets: list[int]
    def __init__(self) -> None: ...
    def __repr__(self) -> str: ...

class Runtime:
    def __init__(
        self,
        artifact: Union[str, bytes, os.PathLike],
        device: Union[str, torch.device] = "",
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
    def options(self) -> RuntimeOptions:
        """A copy of the options in effect (device resolved: 'cpu', 'cuda:N'). Setting its fields changes nothing:
        options are fixed at load; create another Runtime to change them."""
    def __repr__(self) -> str: ...

class Batcher:
    """Dynamic micro-batching over a Runtime (imagepiece::Batcher); keeps the Runtime alive."""

    def __init__(
        self,
        runtime: Runtime,
        max_batch: int = 0,
        max_delay_ms: float = 1.0,
        queue_capacity: int = 1024,
        preferred_batches: Sequence[int] = ...,
    ) -> None: ...
    @overload
    def submit(self, image: torch.Tensor) -> concurrent.futures.Future[torch.Tensor]: ...
    @overload
    def submit(self, image: np.ndarray) -> concurrent.futures.Future[np.ndarray]: ...
    def expedite(self) -> None: ...
    def close(self, drain: bool = True) -> None: ...
    @property
    def stats(self) -> dict[str, Any]: ...
    @property
    def options(self) -> dict[str, Any]: ...
    def __enter__(self) -> Batcher: ...
    def __exit__(self, *exc: object) -> None: ...
