"""int8 for x86 CPUs: PT2E static quantization of the Linear layers, calibrated on images.

PyTorch's PT2E flow (now in torchao; torch 2.14 no longer ships `torch.ao.quantization.quantize_pt2e`):
export -> `prepare_pt2e` with `X86InductorQuantizer` (observers) -> calibration batches -> `convert_pt2e`
(quantize/dequantize pairs) -> export again -> AOTInductor with freezing, which folds each
dequantize -> linear -> quantize pattern into one oneDNN int8 GEMM with prepacked weights (VNNI where
the CPU has it: `environment.int8_support`).

Only `nn.Linear` is annotated (qkv, proj, both MLP layers, the head: nearly all of the FLOPs), with
the quantizer's default static config: int8 weights per output channel (symmetric), uint8
activations per tensor (affine, histogram-calibrated). Everything that decides tokens stays float:
class attention, similarity, sorts, gathers and the merging scatter, and so do attention itself
(SDPA), LayerNorm, GELU and the patch-embedding conv. The artifact takes fp32 images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from .command_line import warning_printer
from .environment import logger_quieted
from .evaluation import logit_agreement

CALIBRATION_IMAGES = 32  # by default; a static batch rounds it up to whole batches
# Every calibration image is held as float32 at once (~0.6 MB at 224 px): 4096 of them take 2.4 GB.
MAX_CALIBRATION_IMAGES = 4096
QUANTIZED_MODULES = ("Linear",)
SCHEME = ("PT2E static, X86InductorQuantizer default config on nn.Linear: weights int8 per-channel symmetric, "
          "activations uint8 per-tensor affine (histogram observer)")


@dataclass(frozen=True)
class Calibration:
    """What the activation ranges were measured on (recorded in the artifact's metadata)."""

    images: torch.Tensor  # [N, 3, H, W] float32, normalised as the model expects
    source: str  # "synthetic (N(0,1), seed S)" or the folder's name

    def describe(self) -> dict:
        return {"source": self.source, "images": int(self.images.shape[0])}


def require_torchao():
    # Importing torchao logs a torch pytree warning (an Enum registered as a constant) to stderr on every run, in
    # front of a refusal's one line too.
    try:
        with logger_quieted("torch.utils._pytree"):
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as error:
        raise ValueError(f"int8 needs torchao (pip install torchao): {error}") from None
    return quantize_pt2e, x86_inductor_quantizer


def default_calibration_images(batch: int, dynamic: bool) -> int:
    """CALIBRATION_IMAGES, for a static batch rounded up to whole batches (a batch-64 graph calibrates on 64)."""
    return CALIBRATION_IMAGES if dynamic else -(-CALIBRATION_IMAGES // batch) * batch


def synthetic_calibration(input_shape: Sequence[int], count: int = CALIBRATION_IMAGES, seed: int = 0) -> Calibration:
    """Gaussian images in the model's normalised input space: right for random-weight models and
    tests; a trained checkpoint should be calibrated on real images (`folder_calibration`)."""
    images = torch.randn(count, *input_shape, generator=torch.Generator().manual_seed(seed))
    return Calibration(images, f"synthetic (N(0,1) images, seed {seed})")


def image_files(folder: Path, warn: Callable[[str], None] = warning_printer()) -> List[Path]:
    """The image files under `folder` as `imagepiece-predict` lists a folder: any depth, the suffixes its decoder
    opens (a .psd beside the images is no calibration image), hidden files and folders left out (macOS's ._photo.jpg),
    links to folders not entered; `warn` hears of a sub-folder that cannot be listed."""
    from .predict.sources import walk_folder

    return [Path(item.location) for item in walk_folder(str(folder), warn)]


def folder_calibration(folder: Union[str, Path], preprocessing: dict, input_shape: Sequence[int],
                       count: int = CALIBRATION_IMAGES, warn: Callable[[str], None] = warning_printer()) -> Calibration:
    """Up to `count` images from `folder`, decoded, resized and normalised exactly as
    `imagepiece.predict` prepares images for this model (its preprocessing metadata)."""
    from .predict.preprocess import Preprocess, normalise

    prepare = Preprocess(preprocessing, input_shape)
    files = calibration_files(folder, count, warn)
    if len(files) < count:
        warn(f"calibration folder {str(folder)!r} holds {len(files)} image files, fewer than {count} "
             "(--calibration-images, or its default)")
    pixels = torch.stack([torch.from_numpy(prepare(decoded_calibration_image(path))) for path in files])
    return Calibration(normalise(pixels, preprocessing["mean"], preprocessing["std"]), f"folder {Path(folder).name!r}")


def calibration_files(folder: Union[str, Path], count: int = CALIBRATION_IMAGES,
                      warn: Callable[[str], None] = warning_printer()) -> List[Path]:
    """The up to `count` image files of `folder` that calibrate (`spread_over_folders`); ValueError if `folder` is
    not a folder or holds none."""
    from .predict.sources import InputError

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"calibration folder {str(folder)!r} does not exist or is not a folder")
    try:
        files = spread_over_folders(image_files(folder, warn), count)
    except InputError as error:  # the folder itself cannot be listed
        raise ValueError(f"calibration {error}") from None
    if not files:
        raise ValueError(f"calibration folder {str(folder)!r} holds no image files")
    return files


def decoded_calibration_image(path: Path):
    """`path` decoded to RGB; a file that does not decode is a request that cannot work (ValueError, exit 2),
    not a failed write."""
    from .predict.decode import ImageError, decode_rgb

    try:
        return decode_rgb(str(path), advice="")  # aot_compile has no --max-pixels
    except ImageError as error:
        raise ValueError(f"calibration image {str(path)!r} cannot be used: {error}; remove it or give another --calibration") from None


def spread_over_folders(files: List[Path], count: int) -> List[Path]:
    """Up to `count` of `files` taken in turn from each folder (val/<class>/...: every class, not the first
    one's 32 images), each folder's in sorted order: stable from run to run."""
    by_folder: dict = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    queues = [iter(group) for _, group in sorted(by_folder.items())]
    chosen: List[Path] = []
    while queues and len(chosen) < count:
        for queue in list(queues):
            path = next(queue, None)
            if path is None:
                queues.remove(queue)
            elif len(chosen) < count:
                chosen.append(path)
    return chosen


def calibration_chunks(count: int, batch: int, dynamic: bool) -> List[slice]:
    """The slices of `count` calibration images that run through the model: chunks of `batch`, and for a dynamic-batch
    graph the rest too (a static graph takes whole batches only)."""
    return [slice(start, min(start + batch, count)) for start in range(0, count if dynamic else count - batch + 1, batch)]


def usable_calibration(calibration: Calibration, batch: int, dynamic: bool) -> Calibration:
    """`calibration` without the images no chunk would run (a static batch's remainder), so that the metadata
    records the images the ranges were measured on; ValueError if none would run."""
    count = len(calibration.images)
    used = count if dynamic else count - count % batch
    if used == 0:
        raise ValueError(f"int8 calibration of a static batch-{batch} artifact needs at least {batch} images, "
                         f"got {len(calibration.images)} (--calibration-images, and as many in --calibration's folder)")
    return Calibration(calibration.images[:used], calibration.source)


def int8_quantizer():
    """X86InductorQuantizer annotating nn.Linear only (see the module docstring)."""
    _, x86 = require_torchao()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_module_type_qconfig(torch.nn.Linear, x86.get_default_x86_inductor_quantization_config())
    return quantizer


def quantize_int8(model: torch.nn.Module, example: torch.Tensor, calibration: Calibration, batch: int,
                  dynamic_shapes: Optional[tuple] = None) -> torch.nn.Module:
    """`model` with int8 Linear layers (quantize/dequantize nodes in an exported graph module), its
    activation ranges calibrated on `usable_calibration(calibration, ...)`'s images in chunks of `batch`."""
    quantize_pt2e, _ = require_torchao()
    dynamic = dynamic_shapes is not None
    images = usable_calibration(calibration, batch, dynamic).images.to(example.device)
    with torch.no_grad():
        graph = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes).module()
        prepared = quantize_pt2e.prepare_pt2e(graph, int8_quantizer())
        for chunk in calibration_chunks(len(images), batch, dynamic):
            prepared(images[chunk])
        return quantize_pt2e.convert_pt2e(prepared)


def agreement_with_fp32(reference: torch.nn.Module, quantized: torch.nn.Module, images: torch.Tensor, batch: int,
                        dynamic: bool = False) -> dict:
    """How the quantized model's logits compare with the fp32 model's on `images` (`calibration_chunks`' chunks).

    `quantized` is `quantize_int8`'s graph module, which computes int8 in reference form (quantize ->
    dequantize -> fp32 op); the compiled artifact runs the fused int8 kernels instead, equal up to rounding
    (tests/test_int8.py measures the artifact itself; `python -m imagepiece.bench precision` the figures)."""
    expected, actual = [], []
    with torch.no_grad():
        for part in calibration_chunks(len(images), batch, dynamic):
            chunk = images[part]
            expected.append(reference(chunk).float())
            actual.append(quantized(chunk).float())
    return logit_agreement(torch.cat(actual), torch.cat(expected))
