"""ip_runtime (the C++ runtime through its Python module) and the C++ example app."""
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import ip_runtime
from imagepiece.artifact import DIGEST_KEY, SECTION_NAME, ArtifactError, read_metadata, write_metadata
from imagepiece.export import load
from imagepiece.input_format import random_pixels
from test_parity import assert_parity

ROOT = Path(__file__).resolve().parent.parent


class RuntimeModel:
    """ip_runtime.Runtime with the call interface test_parity.assert_parity expects."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.device = torch.device(runtime.info["device_type"])

    def __call__(self, images):
        return self.runtime.run(images)


def images_for(runtime, batch, seed=0):
    shape = runtime.info["input_shape"]
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, batch", [("ti_imagepiece", 2), ("ti_imagepiece_dynamic", 7), ("ti_tome_pt2", 2)])
def test_runtime_matches_the_python_loader_and_eager(compiled, name, batch):
    runtime = ip_runtime.Runtime(str(compiled.path(name)))
    images = images_for(runtime, batch)
    with torch.inference_mode():
        torch.testing.assert_close(runtime.run(images), load(compiled.path(name))(images), rtol=0, atol=1e-6)
    assert_parity(RuntimeModel(runtime), compiled.eager(name), batch=batch, count=14 if batch == 7 else 16)


def test_info_exposes_the_metadata(compiled):
    info = ip_runtime.Runtime(compiled.path("s_imagepiece")).info  # a Path is a path
    assert info["artifact_sha256"] == read_metadata(compiled.path("s_imagepiece"))[DIGEST_KEY]
    assert (info["arch"], info["method"], info["dtype"], info["device_type"]) == ("deit_small_patch16_224", "imagepiece", "fp32", "cpu")
    assert info["tokens_per_block"] == [197, 182, 168, 155, 116, 107, 99, 75, 70, 65, 50, 47]
    assert (info["batch_min"], info["batch_max"], info["dynamic_batch"]) == (2, 2, False)
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["interpolation"] == "bicubic"
    assert (info["input_format"], info["precision"]) == ("float_nchw", "fp32")
    metadata = read_metadata(compiled.path("s_imagepiece"))
    assert (info["cpu_capability"], info["cpu_features"]) == (metadata["cpu_capability"], metadata["cpu_features"])
    assert info["metadata"] == read_metadata(compiled.path("s_imagepiece"))


def test_numpy_in_numpy_out_and_run_into_caller_memory(compiled):
    runtime = ip_runtime.Runtime(str(compiled.path("ti_imagepiece")))
    images = images_for(runtime, 2)
    expected = runtime.run(images)
    from_numpy = runtime.run(images.numpy())
    assert isinstance(from_numpy, np.ndarray) and np.array_equal(from_numpy, expected.numpy())
    logits = torch.empty(2, 1000)
    assert runtime.run(images, logits) is logits
    assert torch.equal(logits, expected)
    into_numpy = np.zeros((2, 1000), dtype=np.float32)
    runtime.run(images, into_numpy)
    assert np.array_equal(into_numpy, expected.numpy())


@pytest.fixture(scope="module")
def runtimes(compiled):
    return {"static": ip_runtime.Runtime(str(compiled.path("ti_imagepiece"))),
            "dynamic": ip_runtime.Runtime(str(compiled.path("ti_imagepiece_dynamic")))}


@pytest.mark.parametrize(
    "which, make, code, message",
    [
        ("static", lambda: torch.randn(2, 3, 224), "invalid_shape", r"4-D \[B, 3, 224, 224\], got 3-D"),
        ("static", lambda: torch.randn(2, 3, 224, 224, 1), "invalid_shape", "got 5-D"),
        ("static", lambda: torch.randn(2, 1, 224, 224), "invalid_shape", r"got \[2, 1, 224, 224\]"),
        ("static", lambda: torch.randn(2, 3, 112, 224), "invalid_shape", r"got \[2, 3, 112, 224\]"),
        ("static", lambda: torch.randn(2, 3, 224, 112), "invalid_shape", r"got \[2, 3, 224, 112\]"),
        ("static", lambda: torch.randn(3, 3, 224, 224), "invalid_batch", r"batch 3 is outside .*exactly 2"),
        ("dynamic", lambda: torch.randn(0, 3, 224, 224), "invalid_batch", r"batch 0 is outside .*1\.\.64"),
        ("dynamic", lambda: torch.randn(65, 3, 224, 224), "invalid_batch", r"batch 65 is outside .*1\.\.64"),
        ("static", lambda: torch.randn(2, 3, 224, 224, dtype=torch.float64), "invalid_dtype", "must be Float .*got Double"),
        ("static", lambda: torch.randn(2, 3, 224, 224).half(), "invalid_dtype", "got Half"),
        ("static", lambda: torch.randn(2, 3, 224, 224).numpy().astype(np.float64), "invalid_dtype", "got Double"),
        ("static", lambda: torch.empty(2, 3, 224, 224, device="meta"), "invalid_device", "images are on meta"),
        ("static", lambda: torch.randn(2, 224, 224, 3).permute(0, 3, 1, 2), "not_contiguous", "contiguous"),
        ("static", lambda: torch.randn(2, 3, 224, 448)[..., ::2], "not_contiguous", "contiguous"),
        ("static", lambda: np.asfortranarray(np.zeros((2, 3, 224, 224), dtype=np.float32)), "not_contiguous", "contiguous"),
        ("static", lambda: np.zeros((2, 3, 224, 224), dtype=np.float32)[::-1], "not_contiguous", "negative strides"),
        ("static", lambda: np.zeros((2, 3, 224, 224), dtype=">f4"), "invalid_dtype", "native byte order"),
        # The float field of [(float, byte)] records: strides of 5-byte steps.
        ("static", lambda: np.zeros((2, 3, 224, 224), dtype=[("x", "<f4"), ("pad", "u1")])["x"], "not_contiguous", "not whole elements"),
        ("static", lambda: np.empty((2, 3, 224, 224), dtype=object), "invalid_dtype", "numpy dtype object"),
        ("static", lambda: [[1.0, 2.0]], "invalid_type", "torch.Tensor or numpy.ndarray, got list"),
    ],
)
def test_bad_inputs_raise_runtime_errors(runtimes, which, make, code, message):
    with pytest.raises(ip_runtime.Error, match=message) as error:
        runtimes[which].run(make())
    assert error.value.code == code


def test_uint8_artifact_takes_pixels_as_torch_or_numpy_in_both_loaders(compiled):
    path = compiled.path("ti_imagepiece_uint8")
    runtime = ip_runtime.Runtime(path)
    info = runtime.info
    assert (info["input_format"], info["dtype"], info["precision"], info["input_shape"]) == ("uint8_nhwc", "uint8", "fp32", [3, 224, 224])
    pixels = random_pixels(2, seed=3)
    logits = runtime.run(pixels)
    assert logits.dtype == torch.float32 and logits.shape == (2, 1000)
    torch.testing.assert_close(load(path)(pixels), logits, rtol=0, atol=1e-6)
    assert np.array_equal(runtime.run(pixels.numpy()), logits.numpy())
    into = torch.empty(2, 1000)
    runtime.run(pixels, into)
    assert torch.equal(into, logits)


PIXELS = r"\[B, 224, 224, 3\] uint8 RGB pixels"


@pytest.mark.parametrize(
    "make, code, message",
    [
        (lambda: torch.randn(2, 224, 224, 3), "invalid_dtype", "must be .*uint8.*got .*[Ff]loat"),  # normalised floats
        (lambda: torch.randn(2, 3, 224, 224), "invalid_shape", PIXELS + r".*got \[2, 3, 224, 224\]"),
        (lambda: random_pixels(2).permute(0, 3, 1, 2).contiguous(), "invalid_shape", PIXELS + r".*got \[2, 3, 224, 224\]"),  # NCHW
        (lambda: random_pixels(2, 256, 256), "invalid_shape", r"got \[2, 256, 256, 3\]"),  # not resized/cropped
        (lambda: random_pixels(2, 224, 224, 4), "invalid_shape", r"got \[2, 224, 224, 4\]"),  # RGBA
        (lambda: random_pixels(1)[0], "invalid_shape", "4-D " + PIXELS + r".*got 3-D"),
        (lambda: random_pixels(3), "invalid_batch", "exactly 2"),
        (lambda: random_pixels(2).to(torch.int8), "invalid_dtype", r"got (Char|torch\.int8)"),
        (lambda: random_pixels(2).permute(0, 2, 1, 3), "not_contiguous", r"contiguous \(NHWC\)"),
    ],
)
@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
def test_uint8_artifact_refuses_what_is_not_its_pixels(compiled, loader, make, code, message):
    path = compiled.path("ti_imagepiece_uint8")
    model = ip_runtime.Runtime(path).run if loader == "ip_runtime" else load(path)
    with pytest.raises((ip_runtime.Error, ArtifactError), match=message) as error:
        model(make())
    assert error.value.code == code


def read_only_mmap(tmp_path):
    (tmp_path / "logits.f32").write_bytes(b"\0" * 2 * 1000 * 4)
    return np.memmap(tmp_path / "logits.f32", dtype=np.float32, mode="r", shape=(2, 1000))


def read_only_array():
    array = np.zeros((2, 1000), dtype=np.float32)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    "logits, message",
    [
        (lambda tmp: torch.zeros(2, 10), r"logits must be \[2, 1000\], got \[2, 10\]"),
        (lambda tmp: torch.zeros(2, 1000, dtype=torch.int32), "logits must be Float, got Int$"),
        (lambda tmp: torch.zeros(1000, 2).t(), "contiguous"),
        (lambda tmp: torch.zeros(2, 1000, requires_grad=True), "must not require grad"),
        (lambda tmp: read_only_array(), "writable"),
        (lambda tmp: np.frombuffer(bytes(2 * 1000 * 4), dtype=np.float32).reshape(2, 1000), "writable"),
        (read_only_mmap, "writable"),
        (lambda tmp: np.zeros((2, 1000), dtype=">f4"), "native byte order"),
        (lambda tmp: np.zeros((2, 1000), dtype=np.float32)[::-1], "negative strides"),
        (lambda tmp: [0.0] * 2000, "torch.Tensor or numpy.ndarray, got list"),
    ],
)
def test_bad_output_buffers_are_refused_and_left_untouched(runtimes, tmp_path, logits, message):
    buffer = logits(tmp_path)
    before = np.array(buffer, dtype=np.float32) if isinstance(buffer, (np.ndarray, list)) else buffer.detach().clone()
    with pytest.raises(ip_runtime.Error, match=message) as error:
        runtimes["static"].run(torch.randn(2, 3, 224, 224), buffer)
    assert error.value.code == "invalid_output"
    after = np.array(buffer, dtype=np.float32) if isinstance(buffer, (np.ndarray, list)) else buffer.detach()
    assert (np.array_equal(after, before) if isinstance(after, np.ndarray) else torch.equal(after, before))


def shrunk(tensor, nbytes):
    """`tensor` with its storage cut to `nbytes`: sizes and strides still claim the whole tensor."""
    tensor.untyped_storage().resize_(nbytes)
    return tensor


def fake_images():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(2, 3, 224, 224)


@pytest.mark.parametrize("make, message", [
    (lambda: shrunk(torch.randn(2, 3, 224, 224), 0), "no memory behind them"),
    (lambda: shrunk(torch.randn(2, 3, 224, 224), 1000), r"reach past their storage \(1204224 bytes needed, 1000 allocated\)"),
    (fake_images, "no memory behind them"),
])
def test_tensors_without_the_memory_their_shape_claims_are_refused(runtimes, make, message):
    """Shape, dtype and strides fit, but the memory is gone or short: reading it crashed or read past the end."""
    with pytest.raises(ip_runtime.Error, match=message) as error:
        runtimes["static"].run(make())
    assert error.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="no memory behind them") as error:
        runtimes["static"].run(torch.randn(2, 3, 224, 224), shrunk(torch.zeros(2, 1000), 0))
    assert error.value.code == "invalid_output"


def nested_images():
    return torch.nested.nested_tensor([torch.randn(3, 224, 224), torch.randn(3, 224, 224)])


@pytest.mark.parametrize("make, message", [
    (lambda: torch._neg_view(torch.randn(2, 3, 224, 224)), "lazily negated view"),  # was run as its memory, +x
    (lambda: shrunk(torch.randn(2, 3, 224, 224), 0), "no memory behind them"),  # SIGSEGV
    (lambda: torch._efficientzerotensor((2, 3, 224, 224)), "no memory"),  # SIGSEGV
    (nested_images, "nested tensor"),
])
def test_the_python_loader_refuses_what_the_runtime_refuses(compiled, make, message):
    model = load(compiled.path("ti_imagepiece"))
    with pytest.raises(ArtifactError, match=message) as error:
        model(make())
    assert error.value.code == "invalid_type"


def test_the_python_loader_runs_images_with_an_odd_stride_on_a_size_one_dimension(compiled):
    model = load(compiled.path("ti_imagepiece_dynamic"))
    image = torch.randn(1, 3, 224, 224)
    odd = image.as_strided(image.shape, (7, 224 * 224, 224, 1))  # still "contiguous" to PyTorch; AOTI compares strides
    torch.testing.assert_close(model(odd), model(image), rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_pixel_poisons_only_its_own_image(runtimes, value):
    """As the README says: inputs are not scanned, and images of a batch never mix."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    clean = runtimes["static"].run(images)
    images[0, 1, 5, 7] = value
    logits = runtimes["static"].run(images)
    assert not torch.isfinite(logits[0]).all() and torch.equal(logits[1], clean[1])


def test_output_made_in_inference_mode_is_filled_outside_it(runtimes):
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        logits = torch.empty(2, 1000)
    runtimes["static"].run(images, logits)
    assert torch.equal(logits, runtimes["static"].run(images))


@pytest.fixture(scope="module")
def broken_artifacts(compiled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    good = compiled.path("ti_imagepiece")
    truncated = folder / "truncated.so"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    corrupt = folder / "corrupt.so"
    corrupt.write_bytes(b"\x7fELF" + os.urandom(4096))
    not_artifact = folder / "libtorch_copy.so"
    shutil.copy(torch._C.__file__, not_artifact)
    text = folder / "notes.so"
    text.write_text("hello")
    # Edited and re-sealed (the digest is recomputed, as a tool or a forger can): the checks behind it.
    edited = folder / "edited_torch_version.so"
    shutil.copy(good, edited)
    metadata = read_metadata(good)
    write_metadata(edited, {**metadata, "torch_version": "2.0.0+cu118"})
    newer_format = folder / "format_99.so"
    shutil.copy(good, newer_format)
    write_metadata(newer_format, {**metadata, "format_version": 99})
    # Edited without re-sealing, as objcopy or a hex editor would.
    modified = folder / "modified.so"
    shutil.copy(good, modified)
    (folder / "metadata.json").write_text(json.dumps({**metadata, "num_classes": 10}, sort_keys=True))
    subprocess.run(["objcopy", "--update-section", f"{SECTION_NAME}={folder / 'metadata.json'}", str(modified)], check=True)
    return {
        "missing": (folder / "missing.so", "file_not_found", "does not exist"),
        "directory": (folder, "file_not_found", "not a file"),
        "truncated": (truncated, "not_an_artifact", "truncated"),
        "corrupt": (corrupt, "not_an_artifact", "corrupt|not a 64-bit"),
        "not_artifact": (not_artifact, "not_an_artifact", "no ImagePiece metadata"),
        "text": (text, "not_an_artifact", "not a shared library"),
        "suffix": (ROOT / "README.md", "not_an_artifact", "a .so or .pt2 file"),
        "torch_version": (edited, "incompatible", r"compiled with torch 2\.0\.0\+cu118 but this runtime uses torch"),
        "format": (newer_format, "incompatible", "format version 99"),
        "modified": (modified, "not_an_artifact", "modified or is corrupt"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "corrupt", "not_artifact", "text", "suffix", "torch_version", "format",
                                  "modified"])
def test_bad_artifacts_raise_runtime_errors(broken_artifacts, case):
    path, code, message = broken_artifacts[case]
    with pytest.raises(ip_runtime.Error, match=message) as error:
        ip_runtime.Runtime(str(path))
    assert error.value.code == code


@pytest.mark.parametrize(
    "options, code, message",
    [
        (dict(device="cuda"), "incompatible", "compiled for cpu and cannot run on cuda"),
        (dict(device="tpu:0"), "invalid_option", "not a device"),
        (dict(device="cpu:1"), "invalid_option", "there is one CPU device"),
        (dict(device="meta"), "invalid_option", "runs on cpu or cuda"),  # a torch device type, but not one to run on
        (dict(device="mps"), "invalid_option", "runs on cpu or cuda"),
        (dict(instances=0), "invalid_option", r"instances must be in \[1, 64\]"),
        (dict(cuda_graphs=True), "invalid_option", "cuda_graphs needs a CUDA device"),
        (dict(batch_buckets=[4]), "invalid_option", "outside the artifact's batch range"),
    ],
)
def test_bad_options_raise_runtime_errors(compiled, options, code, message):
    with pytest.raises(ip_runtime.Error, match=message) as error:
        ip_runtime.Runtime(str(compiled.path("ti_imagepiece")), **options)
    assert error.value.code == code
    if "device" in options:  # the Python loader decides where an artifact runs alike
        with pytest.raises(ArtifactError, match=message) as error:
            load(compiled.path("ti_imagepiece"), device=options["device"])
        assert error.value.code == code


def test_cpu_0_and_the_empty_name_are_the_cpu_for_both_loaders(compiled, images):
    # CPU tensors carry no index: "cpu:0" taken literally would call every input "on the wrong device".
    path = compiled.path("ti_imagepiece")
    expected = ip_runtime.Runtime(str(path)).run(images[:2])
    torch.testing.assert_close(ip_runtime.Runtime(str(path), device="cpu:0").run(images[:2]), expected, rtol=0, atol=0)
    torch.testing.assert_close(load(path, device="cpu:0")(images[:2]), expected, rtol=0, atol=0)
    assert load(path, device="").device == torch.device("cpu")  # "": the artifact's own, as RuntimeOptions says


class ArtifactPath:
    """An os.PathLike that is not a pathlib.Path."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return str(self.path)


def test_a_file_name_that_is_not_utf8_loads_and_a_nul_in_a_path_is_refused(compiled, tmp_path):
    name = os.fsencode(tmp_path) + b"/model-\xff\xfe.so"  # bytes the file system holds, no UTF-8
    shutil.copy(compiled.path("ti_imagepiece"), name)
    for artifact in (name, os.fsdecode(name), Path(os.fsdecode(name))):
        assert ip_runtime.Runtime(artifact).info["arch"] == "deit_tiny_patch16_224"
    # The C library reads up to the NUL: that would load another file than the one named.
    with pytest.raises(ip_runtime.Error, match="contains a NUL byte") as error:
        ip_runtime.Runtime(f"{compiled.path('ti_imagepiece')}\0/../other.so")
    assert error.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="not valid UTF-8") as error:
        ip_runtime.Runtime(compiled.path("ti_imagepiece"), device="\udcff")
    assert error.value.code == "invalid_option"


@pytest.mark.parametrize("use", [lambda r: ip_runtime.Runtime.run(r, torch.zeros(2, 3, 224, 224)),
                                 lambda r: ip_runtime.Runtime.info.fget(r), lambda r: ip_runtime.Runtime.options.fget(r)])
def test_a_runtime_made_without_init_is_refused_not_read(use):
    # Runtime.__new__(Runtime) holds no C++ object: its methods read garbage (MemoryError, nonsense shapes).
    with pytest.raises(ip_runtime.Error, match="ip_runtime.Runtime was made without __init__") as error:
        use(ip_runtime.Runtime.__new__(ip_runtime.Runtime))
    assert error.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="self must be an ip_runtime.Runtime, got object"):  # not a Runtime at all
        use(object())


def test_paths_and_options_of_any_accepted_type(compiled):
    path = compiled.path("ti_imagepiece")
    for artifact in (path, ArtifactPath(path), str(path).encode()):
        runtime = ip_runtime.Runtime(artifact, device=torch.device("cpu"), instances=np.int64(2), cuda_graphs=np.bool_(False))
        assert runtime.options.instances == 2 and runtime.options.device == "cpu"
    runtime = ip_runtime.Runtime(path, device="cpu:0")  # CPU tensors carry no index: "cpu:0" must take them
    assert runtime.options.device == "cpu"  # the device in effect, as for device="" (the artifact's)
    assert ip_runtime.Runtime(path).options.device == "cpu"
    assert runtime.run(torch.randn(runtime.info["batch_min"], *runtime.info["input_shape"])).shape[1] == 1000


def test_repr_says_what_was_loaded_and_how(compiled, tmp_path):
    path = tmp_path / "model-\udcff.so"  # a file name that is not UTF-8 is shown as os.fsdecode gives it
    shutil.copy(compiled.path("ti_imagepiece"), os.fsencode(path))
    runtime = ip_runtime.Runtime(path)
    info = runtime.info
    assert info["batch_min"] == info["batch_max"] == 2  # a static batch shows as one number, a range as min..max
    assert repr(runtime) == (f"<ip_runtime.Runtime artifact={str(path)!r} model={info['model_name']!r} device='cpu' batch=2 "
                             f"precision={info['precision']!r}>")
    assert " batch=1..64 " in repr(ip_runtime.Runtime(compiled.path("ti_imagepiece_dynamic")))
    assert repr(runtime.options) == "ip_runtime.RuntimeOptions(device='cpu', instances=1, cuda_graphs=False, batch_buckets=[])"
    options = ip_runtime.RuntimeOptions()
    options.device, options.instances, options.cuda_graphs, options.batch_buckets = "cuda:1", 4, True, (1, 8)
    assert repr(options) == "ip_runtime.RuntimeOptions(device='cuda:1', instances=4, cuda_graphs=True, batch_buckets=[1, 8])"
    # A debugger or a log shows a Runtime made without __init__ too: its repr must not raise.
    assert repr(ip_runtime.Runtime.__new__(ip_runtime.Runtime)) == "<ip_runtime.Runtime, not initialised>"


def test_options_are_a_copy_of_what_is_in_effect(compiled):
    runtime = ip_runtime.Runtime(compiled.path("ti_imagepiece"))
    runtime.options.device = "cuda"  # changes a copy: options are fixed at load (documented on the property)
    assert runtime.options.device == "cpu"
    assert "changes nothing" in ip_runtime.Runtime.options.__doc__


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(artifact=3), "artifact must be a path"),
        (dict(device=0), "device must be a str"),
        (dict(instances="2"), "instances must be an int, got str"),
        (dict(instances=2.0), "instances must be an int, got float"),
        (dict(instances=True), "instances must be an int, got bool"),
        (dict(cuda_graphs="no"), "cuda_graphs must be True or False"),
        (dict(batch_buckets="12"), "batch_buckets must be a sequence of ints"),
        (dict(batch_buckets=[1.5]), "batch_buckets item must be an int"),
    ],
)
def test_arguments_of_the_wrong_type_raise_runtime_errors(compiled, arguments, message):
    arguments = {"artifact": compiled.path("ti_imagepiece"), **arguments}
    with pytest.raises(ip_runtime.Error, match=message) as error:
        ip_runtime.Runtime(**arguments)
    assert error.value.code == "invalid_type"
    options = ip_runtime.RuntimeOptions()
    for name, value in arguments.items():
        if name != "artifact":
            with pytest.raises(ip_runtime.Error, match=message):
                setattr(options, name, value)


def test_an_error_made_by_the_caller_has_no_code_rather_than_no_attribute():
    # Wrappers and tests raise ip_runtime.Error themselves; code that handles them reads .code alike.
    assert ip_runtime.Error("made here").code is None
    assert issubclass(ip_runtime.Error, RuntimeError)


def test_out_of_range_instances_is_an_invalid_option(compiled):
    with pytest.raises(ip_runtime.Error, match="instances") as error:
        ip_runtime.Runtime(compiled.path("ti_imagepiece"), instances=2**40)
    assert error.value.code == "invalid_option"


@pytest.mark.parametrize("instances, calls", [(1, 60), (2, 40)])
def test_concurrent_runs_equal_sequential_runs(compiled, instances, calls):
    """8 threads x `calls` runs on one Runtime: one shared container, and two serving in parallel."""
    runtime = ip_runtime.Runtime(str(compiled.path("ti_imagepiece")), instances=instances)
    inputs = [images_for(runtime, 2, seed=s) for s in range(8)]
    expected = [runtime.run(x) for x in inputs]
    assert_threads_reproduce(runtime, inputs, expected, calls)


def assert_threads_reproduce(runtime, inputs, expected, calls):
    """One thread per input, each running it `calls` times: every result must equal `expected`."""
    mismatches, failures = [], []

    def worker(index):
        try:
            for _ in range(calls):
                if not torch.equal(runtime.run(inputs[index]), expected[index]):
                    mismatches.append(index)
        except Exception as error:  # surfaces in the main thread's assertion
            failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and mismatches == []


def test_cpp_example_top5_equals_python(compiled, classify_app, tmp_path):
    path = compiled.path("ti_imagepiece_dynamic")
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    images.numpy().tofile(tmp_path / "images.f32")
    result = subprocess.run([str(classify_app), str(path), "--input", str(tmp_path / "images.f32"), "--repeats", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = [[int(c) for c in re.findall(r" (\d+) \(", line)] for line in result.stdout.splitlines() if line.startswith("image ")]
    expected = ip_runtime.Runtime(str(path)).run(images).topk(5).indices.tolist()
    assert printed == expected
    assert re.search(r"latency: p50 [\d.]+ ms over 3 runs, batch 3 -> [\d.]+ img/s", result.stdout)


@pytest.mark.skipif(not Path("/lib64/ld-linux-x86-64.so.2").exists(), reason="x86-64 glibc loader")
def test_cpp_example_starts_without_the_loader_cache(compiled, classify_app):
    # As on a machine with the torch wheel and no CUDA toolkit in ld.so.conf: every library the app and
    # libimagepiece_runtime need (libcudart with a CUDA wheel) is found through their own search paths.
    result = subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--inhibit-cache", str(classify_app),
                             str(compiled.path("ti_imagepiece")), "--repeats", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_an_app_binds_to_the_versioned_api_so_one_built_against_other_headers_does_not_start(classify_app):
    # Wheels have no versioned soname: the inline namespace imagepiece::abi_v1 is what makes an app compiled
    # against another layout of Runtime stop at "undefined symbol" instead of running with it.
    library = Path(ip_runtime._core.__file__).parent / "lib" / "libimagepiece_runtime.so"

    def symbols(path, *flags):
        listing = subprocess.run(["nm", "-DC", *flags, str(path)], capture_output=True, text=True, check=True).stdout
        names = (re.sub(r"^\s*(?:[0-9a-f]+\s+)?\S\s+", "", line) for line in listing.splitlines())  # [address] type name
        return {name for name in names if name.startswith("imagepiece::")}

    used = symbols(classify_app, "--undefined-only")
    assert used and all(name.startswith("imagepiece::abi_v1::") for name in used), sorted(used)
    assert used <= symbols(library, "--defined-only")


def test_cpp_example_reports_errors_with_their_code(classify_app, compiled, tmp_path):
    result = subprocess.run([str(classify_app), str(tmp_path / "missing.so")], capture_output=True, text=True)
    assert result.returncode == 1 and "error [file_not_found]" in result.stderr
    (tmp_path / "short.f32").write_bytes(b"\0" * 100)
    result = subprocess.run([str(classify_app), str(compiled.path("ti_imagepiece")), "--input", str(tmp_path / "short.f32")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a whole number" in result.stderr
    for flag, value in (("--repeats", "0"), ("--batch", "abc")):
        result = subprocess.run([str(classify_app), str(compiled.path("ti_imagepiece")), flag, value], capture_output=True, text=True)
        assert result.returncode == 2 and f"{flag} needs a whole number >= 1, got '{value}'" in result.stderr
    for args, message in ((["--input", str(tmp_path)], f"--input {tmp_path} is not a file"),
                          (["--input", ""], "--input needs a file name"),  # an unset variable: not the synthetic batch
                          (["--input", str(tmp_path / "short.f32"), "--batch", "2"], "with --input the file's size sets it"),
                          ([str(tmp_path / "other.so")], "one ARTIFACT, got")):  # not silently the last one given
        result = subprocess.run([str(classify_app), str(compiled.path("ti_imagepiece")), *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stdout == "", "refused before the artifact is loaded"
    # Refused before the batch is made: 10^12 images would be 600 TB.
    result = subprocess.run([str(classify_app), str(compiled.path("ti_imagepiece_dynamic")), "--batch", str(10**12)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"error [invalid_batch]: a batch of {10**12} images; the artifact runs 1..64" in result.stderr


def test_cpp_example_feeds_a_uint8_artifact_pixels(classify_app, compiled, tmp_path):
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    pixels.numpy().tofile(tmp_path / "pixels.u8")
    path = compiled.path("ti_imagepiece_uint8")
    result = subprocess.run([str(classify_app), str(path), "--input", str(tmp_path / "pixels.u8"), "--repeats", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = [[int(c) for c in re.findall(r" (\d+) \(", line)] for line in result.stdout.splitlines() if line.startswith("image ")]
    assert printed == ip_runtime.Runtime(str(path)).run(pixels).topk(5).indices.tolist()
