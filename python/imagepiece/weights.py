"""Load local checkpoints (timm/DeiT `.pth`, `.safetensors`) into any ImagePiece-family model.

The reduction methods add no weights, so a plain DeiT checkpoint fits every method. LCB is the
exception: "residual" weights may be absent (the branch then keeps its zero init, an exact no-op);
"stem" weights replace the patchify and must be present unless the caller accepts an untrained stem.
Nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import Dict, Iterator, Optional, Union

import safetensors.torch
import torch
from timm.models import clean_state_dict, load_state_dict
from torch import nn

from .artifact_metadata import MAX_CLASSES
from .config import PRESETS, ReductionConfig, lcb_from_cli


class UntrainedLCBWarning(UserWarning):
    """A checkpoint without LCB 'stem' weights was loaded with allow_untrained_lcb: the stem stays random."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit the model."""


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a `.safetensors` or torch-saved checkpoint into a flat {name: tensor} dict on CPU.

    timm's `load_state_dict` does the reading: safetensors or `torch.load(weights_only=True)`, the
    state dict found under "state_dict" / "model" (DeiT, timm and common trainers wrap it so), and
    `clean_state_dict`'s removal of DDP / torch.compile prefixes. The trained weights, not an EMA copy beside
    them: DeiT's checkpoint.pth holds both "model" and "model_ema", and DeiT (as timm's validate.py) evaluates
    "model"; the EMA copy of a short fine-tune is still near its starting weights. Only a checkpoint with no
    other state dict is read from "state_dict_ema" / "model_ema".
    What this adds: one error type whose message names the file and says what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        with _unpickler_warnings_quieted():
            state = _read(path)
    except AttributeError:  # timm cleans keys with .items(): the file holds something other than a dict
        state = None
    except Exception as error:  # torch.load / safetensors raise many types for a bad file
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({_load_failure(error)})") from None
    if not _is_tensor_dict(state):
        raise CheckpointError(f"{str(path)!r} holds no state dict of tensors (looked at the top level and under "
                              "'state_dict_ema', 'model_ema', 'state_dict', 'model')")
    return state


def _is_tensor_dict(state) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _has_non_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return False
    checked = tensor if tensor.element_size() > 1 else tensor.float()  # float8 has no isfinite of its own
    return not bool(torch.isfinite(checked).all())


def _is_safetensors(path: Path) -> bool:
    """A safetensors file opens with its header's length (8 bytes, little-endian) and then the JSON header."""
    with open(path, "rb") as file:
        start = file.read(9)
    return len(start) == 9 and start[8:9] == b"{" and 2 <= int.from_bytes(start[:8], "little") <= path.stat().st_size - 8


def _read(path: Path):
    if path.suffix != ".safetensors" and _is_safetensors(path):  # timm picks the reader by the name alone
        return clean_state_dict(safetensors.torch.load_file(str(path), device="cpu"))
    state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    if not _is_tensor_dict(state):  # only an EMA copy inside (timm looks for it only when asked)
        state = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    return state


@contextlib.contextmanager
def _unpickler_warnings_quieted() -> Iterator[None]:
    """torch's weights-only reader warns of a pickle protocol torch.save does not write (a plain pickle.dump), asking to
    file an issue with torch; the error that follows says what the file is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def _load_failure(error: Exception) -> str:
    """What went wrong, in one line. A weights-only refusal (torch.load's, or timm's wrapper of it) ends in
    advice to load with weights_only=False, which these tools must not follow: a checkpoint holds tensors,
    and unpickling anything else runs code from the file. torch's own reason is its "WeightsUnpickler" line."""
    chain = [error, error.__cause__, error.__context__]
    texts = [str(link) for link in chain if link is not None]
    # torch's reason follows "WeightsUnpickler error:", on the same line or after a blank one.
    reason = next((" ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
                   for text in texts if "WeightsUnpickler error:" in text), None)
    if isinstance(error, (KeyError, UnpicklingError)) and not reason:  # text, or bytes no pickle starts with: opcode 101 is "e"
        return f"not a torch.save checkpoint nor a safetensors file ({type(error).__name__}: {texts[0].strip()[:80]})"
    if reason is not None and reason.startswith("Unsupported operand"):
        return (f"not a torch.save checkpoint nor a safetensors file: a pickle torch.save did not write, or no pickle "
                f"at all ({reason})")
    if reason is not None or "weights_only" in texts[0]:
        detail = f": {reason.split('. Please use')[0]}" if reason else ""
        return f"it holds pickled objects other than tensors and plain values, which are never unpickled here{detail}"
    return f"{type(error).__name__}: {texts[0].strip().splitlines()[0] if texts[0].strip() else ''}"


def load_checkpoint(model: nn.Module, path: Union[str, Path], allow_untrained_lcb: bool = False) -> None:
    """Load `path` into `model` strictly: every mismatch is an error that lists the names.

    Args:
        model: an `ImagePieceViT`.
        allow_untrained_lcb: accept a checkpoint that lacks LCB "stem" weights (they stay random,
            so accuracy needs training; a warning says so).
    """
    state = read_state_dict(path)
    if model.num_classes == 0:  # built without a head (num_classes=0, for features): the checkpoint's is dropped, as timm does
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
    expected = model.state_dict()
    lcb = model.reduction_config.lcb
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched_keys = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    mismatched = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}" for key in mismatched_keys]

    # A plain DeiT checkpoint has no LCB weights: fine for the zero-init residual branch.
    lcb_missing = [key for key in missing if key.startswith("lcb.")]
    stem_missing = [key for key in missing if key.startswith("patch_embed.proj.layers.")]
    missing = [key for key in missing if key not in lcb_missing and key not in stem_missing]
    if lcb == "stem":
        # The DeiT patchify conv has no place in a stem model; report it with the stem's absence.
        stem_replaced = [key for key in unexpected if key.startswith("patch_embed.proj.")]
        if stem_missing and not allow_untrained_lcb:
            raise CheckpointError(
                f"{str(path)!r} has no weights for LCB 'stem' ({len(stem_missing)} tensors, e.g. {stem_missing[0]}); "
                "the stem must be trained (scripts/finetune.py), or used untrained: aot_compile.py --allow-untrained-lcb, "
                "allow_untrained_lcb=True from Python"
            )
        if stem_missing:
            warnings.warn(f"LCB 'stem' left untrained: {str(path)!r} has no stem weights", UntrainedLCBWarning, stacklevel=2)
            unexpected = [key for key in unexpected if key not in stem_replaced]

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    if problems:
        raise CheckpointError(f"{str(path)!r} does not fit {model.pretrained_cfg.get('architecture', 'the model')}: " + "; ".join(problems)
                              + (fine_tune_hint(path) or head_size_hint(state, missing, mismatched_keys, model.num_features)))
    # A diverged run saves NaN/Inf weights that load and compile fine and then answer NaN logits for
    # every image: refuse them here, where the file is named.
    non_finite = [key for key in expected if key in state and _has_non_finite(state[key])]
    if non_finite:
        raise CheckpointError(f"{str(path)!r} holds NaN or infinite values in {len(non_finite)} tensor(s): "
                              f"{_first(non_finite)} (a diverged training run?)")

    model.load_state_dict(state, strict=False)


def head_size_hint(state: dict, missing: list, mismatched_keys: list, model_width: int) -> str:
    """Where only the classifier differs (a timm model fine-tuned on other classes): the --num-classes that fits, as a
    sentence to append to an error ("" otherwise)."""
    only_the_head = not missing and "head.weight" in mismatched_keys and all(key.startswith("head.") for key in mismatched_keys)
    if not only_the_head or state["head.weight"].dim() != 2:
        return ""
    classes, width = state["head.weight"].shape
    bias = state.get("head.bias")
    # Only another number of classes: a head as wide as the model's features, with a bias to match (its width wrong
    # is another model, and the hint would name the classes already asked for).
    if width != model_width or (bias is not None and tuple(bias.shape) != (classes,)):
        return ""
    return (f". Its head has {classes} classes: pass --num-classes {classes} (num_classes={classes} from Python, then "
            "model.reset_classifier(n) for a new head of n classes)")


def _first(items: list, count: int = 6) -> str:
    # Another DeiT size mismatches every tensor: the whole list made a 10 KB line.
    shown = ", ".join(map(str, items[:count]))
    return shown + (f", ... ({len(items) - count} more)" if len(items) > count else "")


def fine_tuned_settings(path: Union[str, Path]) -> Optional[dict]:
    """{"arch", "lcb", "num_classes"} that scripts/finetune.py records beside the weights it writes, which
    the weights need to fit a model, "classes" (the class folder names it trained on), "preset" (its --preset)
    and "reduction" (its `ReductionConfig.to_dict()`), each None where an older fine-tune did not record it;
    None for any other checkpoint (or an unreadable one); CheckpointError for a record of no or too many classes."""
    try:
        with _unpickler_warnings_quieted():
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # safetensors, or unreadable: nothing recorded
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("arch"), str) or isinstance(saved.get("num_classes"), bool) \
            or not isinstance(saved.get("num_classes"), int) or not isinstance(saved.get("lcb"), (str, type(None))):
        return None
    classes = saved.get("classes")  # its class folder names, in label order (older checkpoints: none)
    classes = list(classes) if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes) else None
    preset = saved.get("preset") if saved.get("preset") in PRESETS else None
    reduction = saved.get("reduction") if isinstance(saved.get("reduction"), dict) else None
    if not 1 <= saved["num_classes"] <= MAX_CLASSES:  # a model built with it would have no head, or an absurd one
        raise CheckpointError(f"{str(path)!r} records num_classes {saved['num_classes']}: a classifier has 1..{MAX_CLASSES:,} classes")
    return {"arch": saved["arch"], "lcb": saved["lcb"], "num_classes": saved["num_classes"], "classes": classes,
            "preset": preset, "reduction": reduction}


# What changes how a model reduces its tokens (its LCB is checked with the weights; depth and patches by the arch).
_REDUCTION_KEYS = ("method", "p", "merge_ratio", "keep_rate", "prune_blocks", "tome_r", "prop_attn", "reevaluation")


def reduction_difference(saved: Optional[dict], path: Union[str, Path], config: ReductionConfig) -> Optional[str]:
    """For `saved`, the `fine_tuned_settings` of the checkpoint at `path`: a sentence saying how `config` reduces
    tokens otherwise than the fine-tune did (its weights learnt that reduction: another one scores otherwise), else
    None (also for None: no checkpoint, or not a fine-tune's)."""
    if saved is None:
        return None
    trained = saved["reduction"] or (ReductionConfig(**PRESETS[saved["preset"]]).to_dict() if saved["preset"] else None)
    if trained is None:
        return None
    here = config.to_dict()
    as_tuple = lambda value: tuple(value) if isinstance(value, list) else value  # noqa: E731
    differing = [key for key in _REDUCTION_KEYS if key in trained and as_tuple(trained[key]) != here[key]]
    if not differing:
        return None
    preset = f" (--preset {saved['preset']})" if saved["preset"] else ""
    return (f"{str(path)!r} was fine-tuned with {trained['method']} token reduction{preset}; this model has "
            + ", ".join(f"{key} {here[key]!r} (trained: {as_tuple(trained[key])!r})" for key in differing)
            + ": its accuracy may differ from the fine-tune's")


def fine_tuned_flags(saved: Optional[dict]) -> dict:
    """For `saved`, a checkpoint's `fine_tuned_settings`: the model flags its fine-tune was run with, as the command
    lines spell them ({"arch", "lcb" ("none" for None), "num_classes", and "preset" where recorded}); {} for None.
    evaluate.py, visualize.py and aot_compile.py default each flag to these: the weights fit no other arch, LCB or
    head, and learnt that token reduction."""
    if saved is None:
        return {}
    flags = {"arch": saved["arch"], "lcb": saved["lcb"] or "none", "num_classes": saved["num_classes"]}
    if saved["preset"]:
        flags["preset"] = saved["preset"]
    return flags


# What the model flags of the tools are when neither the command line nor a fine-tune's record says: DeiT-S ImagePiece.
MODEL_FLAG_DEFAULTS = {"arch": "deit_small_patch16_224", "preset": "imagepiece", "lcb": "none", "num_classes": 1000}


def fill_model_flags(args, recorded: dict, flags=tuple(MODEL_FLAG_DEFAULTS)) -> None:
    """Set each of `flags` that the parsed `args` leave None to the fine-tune's (`recorded`, `fine_tuned_flags`),
    else to MODEL_FLAG_DEFAULTS."""
    for flag in flags:
        if getattr(args, flag) is None:
            setattr(args, flag, recorded.get(flag, MODEL_FLAG_DEFAULTS[flag]))


def fine_tune_hint(path: Union[str, Path]) -> str:
    """For a checkpoint written by scripts/finetune.py: the flags that rebuild its model, as a sentence
    to append to an error ("" for others)."""
    flags = fine_tuned_flags(fine_tuned_settings(path))
    if not flags:
        return ""
    preset_keywords = f", **imagepiece.PRESETS[{flags['preset']!r}]" if "preset" in flags else ""
    return (f". It was fine-tuned (scripts/finetune.py) as --arch {flags['arch']} --lcb {flags['lcb']} "
            f"--num-classes {flags['num_classes']}: pass the same flags (evaluate.py, visualize.py and aot_compile.py "
            "take them from the checkpoint when they are not given), or from Python "
            f"create_model({flags['arch']!r}, lcb={lcb_from_cli(flags['lcb'])!r}, num_classes={flags['num_classes']}, "
            f"checkpoint=...{preset_keywords})")


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file (checkpoint provenance for artifact metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
