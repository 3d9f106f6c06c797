"""precision: how far low precision moves plain DeiT and ImagePiece from fp32, and which decisions it flips.

For plain DeiT and ImagePiece with the same random weights (timm's init and/or "sharpened", see
`random_weights`), each contender runs the same Gaussian-noise images as the fp32 eager model:

  * eager_bf16:   the eager model cast to bf16 (eager_fp16: fp16, on a GPU or a CPU with fp16 GEMMs);
  * autocast_bf16: fp32 model under torch.autocast(bf16): GEMMs in bf16, the residual stream, LayerNorm
                  and every decision input in fp32 (mixed precision);
  * bf16_weights: fp32 arithmetic on weights rounded to bf16 (what the weights alone do);
  * fp32_noise:   fp32, every weight multiplied by (1 + 1e-6 * N(0, 1)): the floor any other arithmetic
                  (another CPU, compiled kernels) meets, since it shows what a perturbation far below
                  bf16's (2^-9) already does to the decisions;
  * ip_runtime_bf16 / ip_runtime_int8: compiled artifacts through the C++ runtime (fp32 images in);
    ip_runtime_bf16_sdpa: the bf16 artifact with PyTorch's fused SDPA instead of the CPU bf16 default
    attention kernel (`blocks.matmul_attention`, whose logits are rounded to bf16 before the softmax);
  * openvino_bf16: the ONNX export on OpenVINO with the bf16 hint.

Reported: top-1 agreement with fp32, max and median |logit - fp32| (per image, its largest), and for
the eager contenders the decisions themselves: per block, the share of tokens leaving it that cover
exactly the same patches (merged or pruned alike) as in fp32, and the share of images whose every
token still does. Plain DeiT decides nothing (its rows are 1.00): its logit deviation is the bar.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..artifact import DTYPES
from ..environment import bf16_support
from ..evaluation import logit_agreement
from ..model import create_model
from .random_weights import WEIGHTS, random_weights
from .results import ResultsWriter

HELP = "decision stability and logit deviation of bf16 / int8 / peers vs fp32, plain DeiT beside ImagePiece"
EAGER = ("eager_bf16", "eager_fp16", "autocast_bf16", "bf16_weights", "fp32_noise")
# The compiled ip_runtime contenders: (precision, attention kernel; None: the compile's default for the precision).
IP_RUNTIME = {"ip_runtime_bf16": ("bf16", None), "ip_runtime_bf16_sdpa": ("bf16", "sdpa"), "ip_runtime_int8": ("int8", None)}
COMPILED = (*IP_RUNTIME, "openvino_bf16")
CONTENDERS = EAGER + COMPILED
METHODS = ("plain", "imagepiece")
NOISE = 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=["eager_bf16", "fp32_noise"],
                        help="compiled ones compile an artifact (or ONNX file) per method (minutes each on 2 cores)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["sharpened"])
    parser.add_argument("--images", type=int, default=32, help="Gaussian-noise images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=Path, help="int8: a folder of images to calibrate on (default: synthetic)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.images < 1 or args.batch < 1:
        parser.error("--images and --batch must be >= 1")
    # Arguments that contradict each other first: that error holds on every machine, what this one lacks after it.
    if args.calibration is not None and "ip_runtime_int8" not in args.contenders:
        parser.error("--calibration is for the int8 artifact: add ip_runtime_int8 to --contenders or drop --calibration")
    cuda = args.device.startswith("cuda")
    if "eager_fp16" in args.contenders and not cuda and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        parser.error("eager_fp16 needs a GPU or a CPU with fp16 GEMMs (AVX512-FP16 or AMX-FP16); this one would emulate it")
    if cuda and set(args.contenders) & set(COMPILED):
        parser.error(f"{sorted(set(args.contenders) & set(COMPILED))} are CPU contenders; run them with --device cpu")
    bf16_contenders = {"eager_bf16", "autocast_bf16", "ip_runtime_bf16", "ip_runtime_bf16_sdpa", "openvino_bf16"}
    if not cuda and bf16_contenders & set(args.contenders) and not bf16_support().native:
        parser.error(f"bf16 contenders would be emulated here: {bf16_support().reason}")
    for contender, modules, extra in (("ip_runtime_int8", ("torchao",), "int8"), ("openvino_bf16", ("openvino", "onnxscript"), "peers")):
        missing = [module for module in modules if importlib.util.find_spec(module) is None]
        if contender in args.contenders and missing:
            parser.error(f"{contender} needs {missing}: pip install 'imagepiece[{extra}]'")
    # A value given twice would be measured twice into one folder name (FileExistsError) and one record key.
    args.contenders, args.weights = list(dict.fromkeys(args.contenders)), list(dict.fromkeys(args.weights))
    if args.calibration is not None:
        try:
            check_calibration_folder(args.calibration, args.batch)
        except ValueError as error:
            parser.error(f"--calibration: {error}")


def check_calibration_folder(folder: Path, batch: int) -> None:
    """ValueError (one line) unless the int8 compile can calibrate on `folder`'s images: the ones it would take
    (`quantize.calibration_files`), each decoding, at least one static `batch` of them."""
    from ..quantize import calibration_files, decoded_calibration_image, default_calibration_images

    files = calibration_files(folder, default_calibration_images(batch, dynamic=False))  # the compile's static batch
    if len(files) < batch:  # the artifact has a static --batch: calibration runs whole batches only
        raise ValueError(f"{str(folder)!r} holds {len(files)} image file(s); calibrating a batch-{batch} artifact needs at least {batch}")
    for path in files:
        decoded_calibration_image(path)


def block_sources(model: torch.nn.Module, images: torch.Tensor, autocast: bool = False) -> List[torch.Tensor]:
    """Per block: [B, N_out, 1 + patches] map of which patches each token leaving it covers (eager only)."""
    sources: List[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: sources.append(output[2].float().cpu()))
             for block in model.blocks]
    try:
        with torch.inference_mode(), torch.autocast(images.device.type, torch.bfloat16, enabled=autocast):
            model.forward_tokens(images, trace_source=True)
    finally:
        for hook in hooks:
            hook.remove()
    return sources


def same_tokens(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[B] share of the reference's tokens that the other run also has (same patches, merged or pruned alike)."""
    shares = []
    for ours, theirs in zip((reference * 2).round().to(torch.int8), (other * 2).round().to(torch.int8)):
        expected = {row.numpy().tobytes() for row in ours}
        shares.append(len(expected & {row.numpy().tobytes() for row in theirs}) / len(expected))
    return torch.tensor(shares)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy with every weight multiplied by (1 + scale * N(0, 1))."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device)
            parameter.mul_(1 + scale * noise)
    return noisy


def rounded_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """A fp32 copy whose weights are rounded to bf16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    return rounded


def eager_contender(contender: str, model: torch.nn.Module, seed: int) -> Tuple[torch.nn.Module, torch.dtype]:
    """The model an eager contender runs, and the dtype of its images."""
    if contender == "fp32_noise":
        return perturbed(model, NOISE, seed), torch.float32
    if contender == "bf16_weights":
        return rounded_to_bf16(model), torch.float32
    if contender == "autocast_bf16":
        return model, torch.float32
    dtype = DTYPES[contender.split("_")[1]]
    return copy.deepcopy(model).to(dtype), dtype


def compiled_runner(contender: str, model: torch.nn.Module, folder: Path, batch: int, calibration: Optional[Path]) -> Callable:
    """images (fp32) -> logits for a compiled contender, built from a copy of `model`."""
    if contender == "openvino_bf16":
        from ..onnx_export import export_onnx
        from ..peers import OpenVinoModel

        return OpenVinoModel(export_onnx(model, folder / "model.onnx", batch=batch), "bf16")
    import ip_runtime

    from ..export import compile_artifact

    precision, attention = IP_RUNTIME[contender]
    options = {"calibration": calibration} if precision == "int8" and calibration else {}
    path = compile_artifact(copy.deepcopy(model), folder / f"{contender}.so", dtype=precision, batch=batch, attention=attention,
                            **options).path
    runtime = ip_runtime.Runtime(str(path), device="cpu")
    return (lambda images: runtime.run(images.to(torch.bfloat16))) if precision == "bf16" else runtime.run


def padded_to(batch: int, infer: Callable) -> Callable:
    """`infer` for a compiled contender, which takes exactly `batch` images (a static-batch artifact or ONNX file):
    a short last chunk (--images not a multiple of --batch) is padded with copies of its first image, and the
    padding's logits dropped (the images of a batch do not see each other)."""

    def run(chunk: torch.Tensor) -> torch.Tensor:
        missing = batch - len(chunk)
        if missing == 0:
            return infer(chunk)
        return infer(torch.cat([chunk, chunk[:1].expand(missing, *chunk.shape[1:])]))[: len(chunk)]

    return run


def measure(model: torch.nn.Module, contender: str, images: torch.Tensor, batch: int, folder: Path,
            args: argparse.Namespace) -> Dict:
    """Deviation from the fp32 eager `model` on `images`, and the eager contenders' decision agreement."""
    decisions, autocast = contender in EAGER, contender == "autocast_bf16"
    if decisions:
        other, dtype = eager_contender(contender, model, args.seed)

        def infer(chunk: torch.Tensor) -> torch.Tensor:
            with torch.autocast(chunk.device.type, torch.bfloat16, enabled=autocast):
                return other(chunk.to(dtype))
    else:
        infer = padded_to(batch, compiled_runner(contender, model, folder, batch, args.calibration))
    reference, logits, same, identical = [], [], [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        with torch.inference_mode():
            reference.append(model(chunk).float().cpu())
            logits.append(infer(chunk).float().cpu())
        if decisions:
            pairs = list(zip(block_sources(model, chunk), block_sources(other, chunk.to(dtype), autocast)))
            same.append(torch.stack([same_tokens(a, b) for a, b in pairs]))  # [blocks, B]
            identical.append(torch.stack([(a == b).flatten(1).all(1).float() for a, b in pairs]))
    result = logit_agreement(torch.cat(logits), torch.cat(reference))
    if decisions:
        result["same_tokens_per_block"] = [round(float(x), 4) for x in torch.cat(same, dim=1).mean(dim=1)]
        result["identical_images_per_block"] = [round(float(x), 4) for x in torch.cat(identical, dim=1).mean(dim=1)]
    return result


def format_row(weights: str, contender: str, method: str, result: Dict, plain: Optional[Dict]) -> str:
    ratio = " " * 12
    if plain and method != "plain" and plain["max_abs_logit_diff"] > 0:
        ratio = f"{result['max_abs_logit_diff'] / plain['max_abs_logit_diff']:6.1f}x plain"
    line = (f"{weights:<10} {contender:<16} {method:<11} top-1 {result['top1_agree']:>3}/{result['images']:<3} "
            f"max|dl| {result['max_abs_logit_diff']:7.4f} ({ratio})  median {result['median_abs_logit_diff']:7.4f}  "
            f"cos {result['cosine_mean']:.4f}")
    if "same_tokens_per_block" in result:
        line += "\n" + " " * 29 + "same tokens per block " + " ".join(f"{x:.2f}" for x in result["same_tokens_per_block"])
        line += f"; images with every token the same after the last block {result['identical_images_per_block'][-1]:.2f}"
    return line


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    writer = ResultsWriter(args.out, "precision", f"{args.arch}_{args.images}img", device=args.device)
    lines = [f"deviation from fp32 eager, {args.arch}, {args.images} Gaussian-noise images (seed {args.seed}), batch {args.batch}, "
             f"{device}; fp32_noise = fp32 with weights x (1 + {NOISE:g} N(0,1))"]
    print(f"# {writer.provenance}\n{lines[0]}", flush=True)
    record: Dict[str, Dict] = {}
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    with tempfile.TemporaryDirectory(prefix="benchmark_precision.") as workdir:
        for weights in args.weights:
            torch.manual_seed(args.seed)
            reference = random_weights(create_model(args.arch, "plain"), weights).state_dict()
            for contender in args.contenders:
                for method in METHODS:
                    model = create_model(args.arch, method)
                    model.load_state_dict(reference)
                    folder = Path(workdir) / f"{weights}_{contender}_{method}"
                    folder.mkdir()
                    result = measure(model.to(device), contender, images, args.batch, folder, args)
                    record.setdefault(weights, {}).setdefault(contender, {})[method] = result
                    lines.append(format_row(weights, contender, method, result, record[weights][contender].get("plain")))
                    print(lines[-1], flush=True)
    writer.report("\n".join(lines), vars(args), results=record)
    return 0
