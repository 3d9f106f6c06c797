"""What an artifact's metadata may say: the strict reader and the checks made against it.

The metadata is one JSON object written by `imagepiece.export`. It is read strictly, with exactly the
rules of the C++ runtime (cpp/src/metadata.cpp), so that a file one accepts the other accepts:

  * at most MAX_METADATA_BYTES of UTF-8 without a byte-order mark or NUL bytes;
  * plain JSON (RFC 8259): no NaN/Infinity, no numbers that overflow a double, no duplicate keys,
    no lone surrogate escapes, nesting at most MAX_DEPTH deep;
  * the fields in `validated` with their exact JSON types (an integer field is never 2.0 or true)
    and ranges; unknown extra fields are allowed.

A metadata of another `format_version` is `incompatible` (recompile it); anything else that breaks
these rules is `not_an_artifact`.

What the artifact takes: `input_shape` is one image, [C, H, W]; `input_format` says how a batch of
them is laid out: "float_nchw" (normalised [B, C, H, W] of `dtype` fp32/fp16/bf16) or "uint8_nhwc"
(resized and cropped RGB pixels [B, H, W, C], `dtype` "uint8", normalised by the compiled graph).
`precision` is what it computes in (fp32, fp16, bf16, or int8 Linear layers); its logits are of
`model_dtype(metadata)`. `class_names`, when not null, names each of the `num_classes` outputs (the class
folders of the fine-tune its checkpoint came from). A CPU artifact names the CPUs it runs on (`cpu_capability`, `cpu_features`:
see `imagepiece.cpu_target`).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, List, Optional, Union

import torch

from .cpu_target import check_this_cpu

FORMAT_VERSION = 2
DIGEST_KEY = "artifact_sha256"
MAX_METADATA_BYTES = 1 << 20
MAX_DEPTH = 32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = (*DTYPES, "int8")
INPUT_FORMATS = ("float_nchw", "uint8_nhwc")
INPUT_DTYPES = {**DTYPES, "uint8": torch.uint8}
MAX_CPU_FEATURES = 64
DEVICE_TYPES = ("cpu", "cuda")
MAX_BATCH = 1 << 20
MAX_IMAGE_SIDE = 1 << 16
MAX_CLASSES = 1 << 24
MAX_BLOCKS = 1024
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_CAPABILITY = re.compile(r"[0-9]+\.[0-9]+")


class ArtifactError(ValueError):
    """A bad artifact or a bad input to one; `code` says which kind (same names as the C++ runtime)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _reject_duplicates(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"number {text[:40]}... overflows a double") from None
    return value


def _check_tree(value: Any, depth: int = 1) -> None:
    """Nesting depth and strings that UTF-8 can encode (JSON escapes can spell lone surrogates)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_tree(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, depth + 1)


def decode(text: bytes) -> dict:
    """The metadata text as a JSON object; ValueError saying why when it breaks the rules above."""
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(text)} bytes, more than the {MAX_METADATA_BYTES} allowed")
    if b"\0" in text:
        raise ValueError("metadata contains a NUL byte")
    if text.startswith(b"\xef\xbb\xbf"):
        raise ValueError("metadata starts with a byte-order mark")
    try:
        document = json.loads(text.decode("utf-8"), object_pairs_hook=_reject_duplicates,
                              parse_constant=_reject_constant, parse_float=_finite_float,
                              parse_int=_finite_int)
        _check_tree(document)
    except UnicodeError as error:
        raise ValueError(f"metadata is not valid UTF-8 ({error.reason})") from None
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise ValueError(f"metadata is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError("metadata is not a JSON object")
    return document


def check_format_version(document: dict, where: str) -> None:
    """`incompatible`, with the advice to recompile, when the metadata declares another format version
    (read before anything else: an older or newer format may differ in every other rule)."""
    version = document.get("format_version")
    if _is_int(version) and version != FORMAT_VERSION:
        raise ArtifactError("incompatible", f"{where}: artifact format version {version} is not the supported {FORMAT_VERSION}; recompile it")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return "nothing" if value is None else json.dumps(value)[:80]


class _Fields:
    """Typed access to one JSON object, naming the full field path in every complaint."""

    def __init__(self, document: dict, where: str, prefix: str = "") -> None:
        self.document, self.where, self.prefix = document, where, prefix

    def fail(self, key: str, wanted: str, value: Any) -> None:
        shown = "missing" if value is _MISSING else _show(value)
        raise ArtifactError("not_an_artifact", f"{self.where} has invalid metadata: {self.prefix}{key} must be {wanted}, got {shown}")

    def get(self, key: str) -> Any:
        return self.document.get(key, _MISSING)

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key)
        if not (_is_int(value) and low <= value <= high):
            self.fail(key, f"an integer in {low}..{high}", value)
        return value

    def number(self, key: str, low_exclusive: float = -math.inf) -> float:
        value = self.get(key)
        if not (_is_number(value) and value > low_exclusive):
            self.fail(key, "a number" if low_exclusive == -math.inf else f"a number > {low_exclusive:g}", value)
        return value

    def string(self, key: str, allowed: Optional[tuple] = None, pattern: Optional[re.Pattern] = None) -> str:
        value = self.get(key)
        ok = isinstance(value, str) and value != ""
        ok = ok and (allowed is None or value in allowed) and (pattern is None or pattern.fullmatch(value) is not None)
        if not ok:
            wanted = f"one of {list(allowed)}" if allowed else "a non-empty string" if pattern is None else f"a string like {pattern.pattern}"
            self.fail(key, wanted, value)
        return value

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def object(self, key: str) -> "_Fields":
        value = self.get(key)
        if not isinstance(value, dict):
            self.fail(key, "an object", value)
        return _Fields(value, self.where, f"{self.prefix}{key}.")

    def array(self, key: str, low: int, high: int) -> list:
        value = self.get(key)
        if not (isinstance(value, list) and low <= len(value) <= high):
            self.fail(key, f"an array of {low}..{high} items", value)
        return value


_MISSING = object()


def validated(document: dict, where: str) -> dict:
    """`document` if every field the runtimes rely on has its type and range, else not_an_artifact."""
    fields = _Fields(document, where)
    fields.integer("format_version", FORMAT_VERSION, FORMAT_VERSION)
    fields.string(DIGEST_KEY, pattern=_HEX_DIGEST)
    for key in ("model_name", "arch", "method", "torch_version"):
        fields.string(key)
    if not isinstance(fields.get("created"), str):
        fields.fail("created", "a string", fields.get("created"))
    fields.object("config")
    input_format = fields.string("input_format", INPUT_FORMATS)
    precision = fields.string("precision", PRECISIONS)
    fields.string("dtype", (input_dtype_name(input_format, precision),))
    device_type = fields.string("device_type", DEVICE_TYPES)
    if device_type == "cuda":
        fields.string("cuda_capability", pattern=_CAPABILITY)
    elif fields.get("cuda_capability") is not None:
        fields.fail("cuda_capability", "null for a cpu artifact", fields.get("cuda_capability"))
    if device_type == "cpu":
        fields.string("cpu_capability")
        for index, feature in enumerate(fields.array("cpu_features", 0, MAX_CPU_FEATURES)):
            if not (isinstance(feature, str) and feature != ""):
                fields.fail(f"cpu_features[{index}]", "a non-empty string", feature)
    else:
        for key in ("cpu_capability", "cpu_features"):
            if fields.get(key) is not None:
                fields.fail(key, "null for a cuda artifact", fields.get(key))
    checkpoint = fields.object("checkpoint")
    if not isinstance(checkpoint.get("sha256"), str):
        checkpoint.fail("sha256", "a string", checkpoint.get("sha256"))
    shape = fields.array("input_shape", 3, 3)
    for index, side in enumerate(shape):
        if not (_is_int(side) and 1 <= side <= MAX_IMAGE_SIDE):
            fields.fail(f"input_shape[{index}]", f"an integer in 1..{MAX_IMAGE_SIDE}", side)
    classes = fields.integer("num_classes", 1, MAX_CLASSES)
    if fields.get("class_names") not in (None, _MISSING):  # optional: a fine-tune's class folders, in label order
        for index, name in enumerate(fields.array("class_names", classes, classes)):
            if not isinstance(name, str):
                fields.fail(f"class_names[{index}]", "a string", name)
    batch = fields.object("batch")
    low = batch.integer("min", 1, MAX_BATCH)
    high = batch.integer("max", low, MAX_BATCH)
    if batch.boolean("dynamic") != (low != high):
        batch.fail("dynamic", "true exactly when min != max", batch.get("dynamic"))
    schedule = fields.array("token_schedule", 1, MAX_BLOCKS)
    for index, row in enumerate(schedule):
        if not isinstance(row, dict):
            fields.fail(f"token_schedule[{index}]", "an object", row)
        _Fields(row, where, f"token_schedule[{index}].").integer("tokens_in", 1, MAX_BATCH)
    preprocessing = fields.object("preprocessing")
    for key in ("mean", "std"):
        values = preprocessing.array(key, shape[0], shape[0])
        for index, value in enumerate(values):
            if not (_is_number(value) and (key == "mean" or value > 0)):
                preprocessing.fail(f"{key}[{index}]", "a number" if key == "mean" else "a number > 0", value)
    preprocessing.string("interpolation")
    preprocessing.number("crop_pct", 0.0)
    return document


def input_dtype_name(input_format: str, precision: str) -> str:
    """The images' dtype an artifact of this format and precision takes (its metadata's "dtype")."""
    return "uint8" if input_format == "uint8_nhwc" else _compute_dtype(precision)


def _compute_dtype(precision: str) -> str:
    return "fp32" if precision == "int8" else precision  # int8 Linear layers between fp32 activations


def model_dtype(metadata: dict) -> torch.dtype:
    """What an artifact's model computes in and returns its logits in (fp32 for int8 Linear layers)."""
    return DTYPES[_compute_dtype(metadata["precision"])]


def image_dims(metadata: dict) -> List[int]:
    """One image as the artifact takes it: [C, H, W] (float_nchw) or [H, W, C] (uint8_nhwc)."""
    channels, height, width = metadata["input_shape"]
    return [height, width, channels] if metadata["input_format"] == "uint8_nhwc" else [channels, height, width]


def example_images(metadata: dict, batch: int) -> torch.Tensor:
    """`batch` random CPU images in the layout and dtype the artifact takes, for timing runs."""
    dims = image_dims(metadata)
    if metadata["input_format"] == "uint8_nhwc":
        return torch.randint(0, 256, (batch, *dims), dtype=torch.uint8)
    return torch.randn(batch, *dims).to(INPUT_DTYPES[metadata["dtype"]])


def current_cuda_capability(device_index: int = 0) -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


def torch_release(version: str) -> str:
    """"2.14.1+cu130" -> "2.14.1": builds of one release (CPU, CUDA, local tags) share the AOTI ABI."""
    return version.split("+", 1)[0]


def resolved_device(device: Optional[Union[str, torch.device]], metadata: dict) -> torch.device:
    """Where an artifact runs, as the C++ runtime's resolve_device decides it: `device`, else the artifact's own
    type; cuda means cuda:0 and cpu:0 means cpu (CPU tensors carry no index); anything else is invalid_option."""
    name = str(device) if device is not None and str(device) != "" else metadata["device_type"]  # "": as C++, its own
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArtifactError("invalid_option", f"device '{name}' is not a device (use cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ArtifactError("invalid_option", f"device '{name}' is not supported: the runtime runs on cpu or cuda[:N]")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", 0)
    check_device_exists(resolved)
    if resolved.type == "cpu" and resolved.index is not None:
        if resolved.index != 0:
            raise ArtifactError("invalid_option", f"device '{name}' does not exist: there is one CPU device, 'cpu'")
        resolved = torch.device("cpu")
    return resolved


def check_device_exists(device: torch.device) -> None:
    """invalid_option for a cuda:N past this machine's last GPU (as the C++ runtime's resolve_device); with no GPU
    at all `check_compatible` says so, the more useful answer."""
    if device.type != "cuda":
        return
    gpus = torch.cuda.device_count()
    if 0 < gpus <= (device.index or 0):
        exists = "GPU (cuda:0)" if gpus == 1 else f"GPUs (cuda:0..cuda:{gpus - 1})"
        raise ArtifactError("invalid_option", f"device '{device}' does not exist: this machine has {gpus} {exists}")


def check_compatible(metadata: dict, device: torch.device) -> None:
    """Refuse an artifact this process cannot run on `device`, saying what does not match."""
    if torch_release(metadata["torch_version"]) != torch_release(torch.__version__):
        raise ArtifactError(
            "incompatible",
            f"artifact was compiled with torch {metadata['torch_version']} but this is torch {torch.__version__}; "
            "AOTInductor artifacts run only with the torch release that built them: recompile it",
        )
    if device.type != metadata["device_type"]:
        raise ArtifactError("incompatible", f"artifact was compiled for {metadata['device_type']} and cannot run on {device.type}")
    if device.type == "cpu":
        why = check_this_cpu(metadata["cpu_capability"], metadata["cpu_features"])
        if why is not None:
            raise ArtifactError("incompatible", why)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError("incompatible", "artifact was compiled for cuda but no CUDA device is available")
        here = current_cuda_capability(device.index or 0)
        if metadata["cuda_capability"] != here:
            raise ArtifactError(
                "incompatible",
                f"artifact was compiled for CUDA compute capability {metadata['cuda_capability']}, this GPU is {here}",
            )


def check_images(metadata: dict, images, device: torch.device) -> None:
    """Validate a batch against the artifact before the compiled model sees it (no copies made)."""
    expected, uint8 = image_dims(metadata), metadata["input_format"] == "uint8_nhwc"
    layout = f"[B, {', '.join(map(str, expected))}]" + (" uint8 RGB pixels (the artifact normalises them)" if uint8 else "")
    if not isinstance(images, torch.Tensor):
        raise ArtifactError("invalid_type", f"images must be a torch.Tensor, got {type(images).__name__}")
    _check_dense(images)
    if images.dim() != 4:
        raise ArtifactError("invalid_shape", f"images must be 4-D {layout}, got {images.dim()}-D {list(images.shape)}")
    if list(images.shape[1:]) != expected:
        raise ArtifactError("invalid_shape", f"images must be {layout}, got {list(images.shape)}")
    low, high = metadata["batch"]["min"], metadata["batch"]["max"]
    if not low <= images.shape[0] <= high:
        allowed = f"exactly {low}" if low == high else f"{low}..{high}"
        raise ArtifactError("invalid_batch", f"batch {images.shape[0]} is outside the artifact's batch range ({allowed})")
    if images.dtype != INPUT_DTYPES[metadata["dtype"]]:
        raise ArtifactError("invalid_dtype", f"images must be {INPUT_DTYPES[metadata['dtype']]} ({metadata['dtype']}), got {images.dtype}")
    if images.device.type != device.type or (device.index is not None and images.device.index != device.index):
        raise ArtifactError("invalid_device", f"images are on {images.device}, the artifact runs on {device}")
    if not images.is_contiguous():
        raise ArtifactError("not_contiguous", f"images must be contiguous ({'NHWC' if uint8 else 'NCHW'}); call .contiguous() first")
    _check_memory(images)


def _check_dense(images: torch.Tensor) -> None:
    """What the C++ runtime refuses before the shape checks (runtime.cpp, check_layout): tensors whose memory is not
    the plain strided values the compiled code reads."""
    if images.is_nested:
        raise ArtifactError("invalid_type", "images must be a dense (strided) tensor, got a nested tensor")
    if images.layout != torch.strided:
        raise ArtifactError("invalid_type", f"images must be a dense (strided) tensor, got layout {images.layout}; call .to_dense() first")
    if images.is_neg():  # torch._neg_view stores x and means -x: the compiled code would read x
        raise ArtifactError("invalid_type", "images are a lazily negated view; call .resolve_neg() first")
    if images._is_zerotensor():  # no memory at all, by design
        raise ArtifactError("invalid_type", "images are an efficient zero tensor (no memory); pass torch.zeros(...) instead")


def _check_memory(images: torch.Tensor) -> None:
    """A tensor whose storage was shrunk (untyped_storage().resize_()) passes every check of sizes and strides; the
    model would then read past its memory, or at address 0 (runtime.cpp, check_memory)."""
    if images.numel() == 0:
        return
    storage = images.untyped_storage()
    if storage.data_ptr() == 0:
        raise ArtifactError("invalid_type", "images have no memory behind them (a fake tensor, or one whose storage was freed)")
    last = images.storage_offset() + sum((size - 1) * stride for size, stride in zip(images.shape, images.stride()))
    needed = (last + 1) * images.element_size()
    if needed > storage.nbytes():
        raise ArtifactError("invalid_type", f"images reach past their storage ({needed} bytes needed, {storage.nbytes()} allocated): was it resized?")
