"""An artifact is exactly what it says, or it does not load: the digest, private copies, hostile files.

Every case runs through both loaders, the C++ runtime (ip_runtime) and imagepiece.export.load, which
must agree. Cases that used to crash the process (SIGSEGV in dlopen, SIGBUS, out-of-bounds reads) or
hang it run in a subprocess with a timeout.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import ip_runtime
from imagepiece.artifact import DIGEST_KEY, SECTION_NAME, ArtifactError, read_metadata, write_metadata
from imagepiece.artifact_containers import elf_section, stored_zip_members
from imagepiece.export import load
from imagepiece.private_copy import SealedFile

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def load_with(loader, path):
    return ip_runtime.Runtime(path) if loader == "ip_runtime" else load(path)


def run_with(model, images):
    return model.run(images) if isinstance(model, ip_runtime.Runtime) else model(images)


def refusal(loader, path):
    """(code, message) of the loader's refusal of `path` (fails the test when it loads)."""
    with pytest.raises((ip_runtime.Error, ArtifactError)) as error:
        load_with(loader, path)
    return error.value.code, str(error.value)


def copy(compiled, name, folder, as_name=None):
    source = compiled.path(name)
    target = folder / (as_name or source.name)
    shutil.copy(source, target)
    return target


def patch(path, offset, data):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def metadata_span(path):
    """(offset, size) of the metadata inside a .so or .pt2 file."""
    data = SealedFile.copy_of(Path(path))
    try:
        if path.suffix == ".so":
            return elf_section(data, SECTION_NAME)
        members = stored_zip_members(data)
        return next(span for name, span in members.items() if name.endswith(b"imagepiece/metadata.json"))
    finally:
        data.close()


def library_span(path):
    """(offset, size) of the loaded library inside a .so (the whole file) or .pt2 (its member)."""
    if path.suffix == ".so":
        return 0, path.stat().st_size
    data = SealedFile.copy_of(path)
    try:
        return next(span for name, span in stored_zip_members(data).items() if name.endswith(b".so"))
    finally:
        data.close()


def test_a_seal_refused_while_the_kernel_still_holds_written_pages_is_retried(tmp_path, monkeypatch):
    # EBUSY from F_SEAL_WRITE is transient (freshly written pages still referenced): seen once in CI while sealing a
    # compiled library; the compile failed. Now waited out; any other refusal still fails at once.
    import errno
    import fcntl

    from imagepiece import private_copy

    (tmp_path / "bytes").write_bytes(b"artifact bytes")
    real, refusals = fcntl.fcntl, iter([errno.EBUSY, errno.EBUSY])

    def busy_at_first(fd, command, *args):
        if command == fcntl.F_ADD_SEALS:
            code = next(refusals, None)
            if code is not None:
                raise OSError(code, os.strerror(code))
        return real(fd, command, *args)

    monkeypatch.setattr(private_copy.fcntl, "fcntl", busy_at_first)
    copy = SealedFile.copy_of(tmp_path / "bytes")
    try:
        assert copy.read(0, copy.size) == b"artifact bytes"
    finally:
        copy.close()
    refusals = iter([errno.EPERM])
    with pytest.raises(PermissionError):
        SealedFile.copy_of(tmp_path / "bytes")


def run_isolated(script, timeout=240, **kwargs):
    """`script` in a fresh interpreter (tests/ importable); a crash or hang fails only this test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.update(kwargs.pop("env", {}))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


IMAGES = "torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))"


# --- 1. The digest binds payload and metadata --------------------------------------------------------

@pytest.mark.parametrize("name", ["ti_imagepiece", "ti_tome_pt2"])
@pytest.mark.parametrize("edit", ["batch_max", "input_shape", "dtype"])
def test_edited_metadata_is_refused_as_modified(compiled, tmp_path, name, edit):
    path = copy(compiled, name, tmp_path)
    offset, size = metadata_span(path)
    text = path.read_bytes()[offset : offset + size]
    old, new = {"batch_max": (b'"max": 2', b'"max": 9'), "input_shape": (b"[3, 224, 224]", b"[3, 224, 112]"),
                "dtype": (b'"dtype": "fp32"', b'"dtype": "bf16"')}[edit]
    assert text.count(old) == 1
    patch(path, offset + text.index(old), new)
    for loader in ("ip_runtime", "python"):
        code, message = refusal(loader, path)
        assert code == "not_an_artifact" and "modified or is corrupt" in message


@pytest.mark.parametrize("name", ["ti_imagepiece", "ti_tome_pt2"])
def test_flipped_weight_bytes_are_refused(compiled, tmp_path, name):
    """4 KiB flipped in the middle of the weights: the old runtime returned all-NaN logits."""
    path = copy(compiled, name, tmp_path)
    start, size = library_span(path)
    middle = start + size // 2
    original = path.read_bytes()[middle : middle + 4096]
    patch(path, middle, bytes(b ^ 0xFF for b in original))
    for loader in ("ip_runtime", "python"):
        code, message = refusal(loader, path)
        assert code == "not_an_artifact" and "modified or is corrupt" in message


def test_corrupt_program_headers_are_refused_before_dlopen(compiled, tmp_path):
    """The old runtime handed such a file to dlopen, which crashed (SIGSEGV)."""
    path = copy(compiled, "ti_imagepiece", tmp_path)
    header = path.read_bytes()[:64]
    table_at, count = int.from_bytes(header[0x20:0x28], "little"), int.from_bytes(header[0x38:0x3A], "little")
    patch(path, table_at, os.urandom(56 * count))
    out = run_isolated(f"""
        import ip_runtime, torch
        from imagepiece.export import load
        from imagepiece.artifact import ArtifactError
        for make in (ip_runtime.Runtime, load):
            try:
                make({str(path)!r})
            except (ip_runtime.Error, ArtifactError) as error:
                print(error.code, "modified or is corrupt" in str(error))
    """)
    assert out.split("\n")[:2] == ["not_an_artifact True", "not_an_artifact True"]


FORGERIES = {  # metadata lies, and images that fit the lie
    "batch": ({"batch": {"min": 2, "max": 64, "dynamic": True}}, "torch.randn(3, 3, 224, 224)"),
    "input_shape": ({"input_shape": [3, 112, 112]}, "torch.randn(2, 3, 112, 112)"),
    "dtype": ({"dtype": "bf16", "precision": "bf16"}, "torch.randn(2, 3, 224, 224, dtype=torch.bfloat16)"),
    "input_format": ({"input_format": "uint8_nhwc", "dtype": "uint8"}, "torch.zeros(2, 224, 224, 3, dtype=torch.uint8)"),
    "num_classes": ({"num_classes": 10}, "torch.randn(2, 3, 224, 224)"),
}


def test_metadata_with_a_nan_is_refused_when_written_not_after_a_compile(compiled, tmp_path):
    path = copy(compiled, "ti_imagepiece", tmp_path, "nan.so")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metadata cannot hold a NaN or infinite number"):
        write_metadata(path, {**read_metadata(path), "quantization": {"max_abs_diff": float("nan")}})
    assert path.read_bytes() == before  # nothing half-written


def test_forged_metadata_cannot_make_the_compiled_code_read_out_of_bounds(compiled, tmp_path):
    """Re-sealed (a forger can recompute the digest): the compiled code checks its own inputs, and the
    runtimes check its output, so a lie is an error, never a silent wrong answer or a crash."""
    cases = []
    for name, (forged, images) in FORGERIES.items():
        path = copy(compiled, "ti_imagepiece", tmp_path, f"{name}.so")
        write_metadata(path, {**read_metadata(path), **forged})
        cases.append((str(path), images))
    out = run_isolated(f"""
        import ip_runtime, torch
        from imagepiece.export import load
        from imagepiece.artifact import ArtifactError
        for path, images in {cases!r}:
            for make, call in ((ip_runtime.Runtime, lambda m, x: m.run(x)), (load, lambda m, x: m(x))):
                try:
                    call(make(path), eval(images))
                    print("ran")
                except (ip_runtime.Error, ArtifactError) as error:
                    print(error.code)
    """)
    assert out.split() == ["run_failed"] * 2 * len(FORGERIES)


# --- 2. One strict reader: C++ and Python accept exactly the same metadata ---------------------------

def resealed_text(compiled, tmp_path, transform, name="ti_imagepiece"):
    """A copy of the artifact whose metadata text is `transform(text)`, sealed with a valid digest."""
    path = copy(compiled, name, tmp_path)
    metadata = {key: value for key, value in read_metadata(path).items() if key != DIGEST_KEY}
    text = json.dumps({**metadata, DIGEST_KEY: "0" * 64}, sort_keys=True).encode()
    write_metadata(path, transform(text))
    return path


def replace(old: bytes, new: bytes):
    def transform(text: bytes) -> bytes:
        assert text.count(old) == 1, old
        return text.replace(old, new)

    return transform


def nested(depth):
    return replace(b'"config": {', b'"deep": ' + b"[" * depth + b"]" * depth + b', "config": {')


def class_names(names: bytes):
    """Metadata whose class_names (null in a test artifact: no fine-tune) is `names`; num_classes is 1000."""
    return replace(b'"class_names": null', b'"class_names": ' + names)


def json_list(items) -> bytes:
    return json.dumps(list(items)).encode()


READER_CASES = {
    # accepted by both
    "local_torch_build": (replace(f'"torch_version": "{torch.__version__}"'.encode(), f'"torch_version": "{torch.__version__.split("+")[0]}+other"'.encode()), None),
    "unknown_field": (replace(b'"config": {', b'"zzz_extra": {"x": [1, 2.5, null]}, "config": {'), None),
    "huge_integer_field": (replace(b'"config": {', b'"extra": ' + b"9" * 30 + b', "config": {'), None),
    "nesting_32": (nested(30), None),
    "cpu_capability_default": (replace(b'"cpu_capability": "', b'"cpu_capability": "DEFAULT", "built_on": "'), None),
    "class_names_null": (class_names(b"null"), None),
    "class_names_of_every_class": (class_names(json_list(f"class {i}" for i in range(1000))), None),
    # refused by both, with the same code
    "format_1": (replace(b'"format_version": 2', b'"format_version": 1'), "incompatible"),
    "format_1_9": (replace(b'"format_version": 2', b'"format_version": 1.9'), "not_an_artifact"),
    "format_string": (replace(b'"format_version": 2', b'"format_version": "2"'), "not_an_artifact"),
    "other_torch": (replace(f'"torch_version": "{torch.__version__}"'.encode(), b'"torch_version": "2.0.0"'), "incompatible"),
    "invalid_utf8": (replace(b'"model_name": "deit_tiny_patch16_224.imagepiece"', b'"model_name": "deit\xff"'), "not_an_artifact"),
    "hex_number": (replace(b'"num_classes": 1000', b'"num_classes": 0x8'), "not_an_artifact"),
    "nan": (replace(b'"crop_pct": 0.9', b'"crop_pct": NaN'), "not_an_artifact"),
    "overflowing_number": (replace(b'"crop_pct": 0.9', b'"crop_pct": 1e400'), "not_an_artifact"),
    "overflowing_integer": (replace(b'"config": {', b'"extra": ' + b"9" * 400 + b', "config": {'), "not_an_artifact"),
    "duplicate_key": (replace(b'"arch": ', b'"arch": "x", "arch": '), "not_an_artifact"),
    "byte_order_mark": (lambda text: b"\xef\xbb\xbf" + text, "not_an_artifact"),
    "nul_after_json": (lambda text: text + b"\0garbage", "not_an_artifact"),
    "lone_surrogate": (replace(b'"model_name": "deit_tiny_patch16_224.imagepiece"', b'"model_name": "\\ud800"'), "not_an_artifact"),
    "nesting_40": (nested(40), "not_an_artifact"),
    "float_integer": (replace(b'"num_classes": 1000', b'"num_classes": 1000.0'), "not_an_artifact"),
    "bool_integer": (replace(b'"min": 2', b'"min": true'), "not_an_artifact"),
    "zero_classes": (replace(b'"num_classes": 1000', b'"num_classes": 0'), "not_an_artifact"),
    "too_large": (replace(b'"config": {', b'"pad": "' + b" " * MiB + b'", "config": {'), "not_an_artifact"),
    "input_format_unknown": (replace(b'"input_format": "float_nchw"', b'"input_format": "rgb"'), "not_an_artifact"),
    "dtype_not_the_formats": (replace(b'"dtype": "fp32"', b'"dtype": "uint8"'), "not_an_artifact"),
    "dtype_not_the_precisions": (replace(b'"dtype": "fp32"', b'"dtype": "bf16"'), "not_an_artifact"),
    "precision_unknown": (replace(b'"precision": "fp32"', b'"precision": "fp64"'), "not_an_artifact"),
    "cpu_capability_missing": (replace(b'"cpu_capability": ', b'"built_for": '), "not_an_artifact"),
    "cpu_capability_null": (replace(b'"cpu_capability": "', b'"cpu_capability": null, "built_for": "'), "not_an_artifact"),
    "cpu_features_not_strings": (replace(b'"cpu_features": [', b'"cpu_features": [1, '), "not_an_artifact"),
    # a list Python callers (predict, serve) index by class: one short of num_classes failed them with IndexError
    "class_names_too_short": (class_names(json_list(f"class {i}" for i in range(999))), "not_an_artifact"),
    "class_names_not_strings": (class_names(json_list([*(f"class {i}" for i in range(999)), 7])), "not_an_artifact"),
    "class_names_not_a_list": (class_names(b'"cats"'), "not_an_artifact"),
    "cuda_artifact_with_cpu_fields": (lambda text: replace(b'"device_type": "cpu"', b'"device_type": "cuda"')(
        replace(b'"cuda_capability": null', b'"cuda_capability": "8.0"')(text)), "not_an_artifact"),
    # refused as incompatible by both: code for CPUs this one is not
    "cpu_capability_of_another_arch": (replace(b'"cpu_capability": "', b'"cpu_capability": "SVE256", "built_for": "'), "incompatible"),
    "cpu_feature_this_cpu_lacks": (replace(b'"cpu_features": [', b'"cpu_features": ["avx1024", '), "incompatible"),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_cpp_and_python_read_metadata_alike(compiled, tmp_path, case):
    transform, code = READER_CASES[case]
    path = resealed_text(compiled, tmp_path, transform)
    outcomes = {}
    for loader in ("ip_runtime", "python"):
        try:
            load_with(loader, path)
            outcomes[loader] = None
        except (ip_runtime.Error, ArtifactError) as error:
            outcomes[loader] = error.code
    assert outcomes == {"ip_runtime": code, "python": code}


@pytest.mark.parametrize("case, message", [
    ("class_names_too_short", "class_names must be an array of 1000..1000 items"),
    ("class_names_not_strings", "class_names[999] must be a string, got 7"),
])
def test_cpp_and_python_name_the_same_metadata_fault(compiled, tmp_path, case, message):
    path = resealed_text(compiled, tmp_path, READER_CASES[case][0])
    for loader in ("ip_runtime", "python"):
        assert message in refusal(loader, path)[1], loader


def as_cuda_artifact(text: bytes) -> bytes:
    """Metadata a CUDA artifact could have (its library stays a CPU one: it must never get as far as loading)."""
    cuda_fields = {"device_type": "cuda", "cuda_capability": "9.0", "cpu_capability": None, "cpu_features": None}
    return json.dumps({**json.loads(text), **cuda_fields}, sort_keys=True).encode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU answers")
@pytest.mark.parametrize("device", [None, "cuda", "cuda:7"])
def test_a_cuda_artifact_on_a_machine_without_a_gpu_says_there_is_none(compiled, tmp_path, device):
    # With GPUs, a cuda:N past the last one is invalid_option (tests/test_runtime_cuda.py); with none at all,
    # the absence of a GPU is what the answer names, whatever the index.
    path = resealed_text(compiled, tmp_path, as_cuda_artifact)
    options = {} if device is None else {"device": device}
    for attempt in (lambda: ip_runtime.Runtime(path, **options), lambda: load(path, device)):
        with pytest.raises((ip_runtime.Error, ArtifactError), match="no CUDA device is available|built without CUDA support") as error:
            attempt()
        assert error.value.code == "incompatible"


@pytest.mark.parametrize("crafted", ["section_size", "section_count", "zip_member_size", "zip_entries"])
def test_crafted_container_sizes_are_refused_without_memory_errors(compiled, tmp_path, crafted):
    name = "ti_tome_pt2" if crafted.startswith("zip") else "ti_imagepiece"
    path = copy(compiled, name, tmp_path)
    data = path.read_bytes()
    if crafted == "section_size":  # the metadata section claims 2**62 bytes
        table_at = int.from_bytes(data[0x28:0x30], "little")
        count = int.from_bytes(data[0x3C:0x3E], "little")
        offset, _ = metadata_span(path)
        index = next(i for i in range(count) if int.from_bytes(data[table_at + i * 64 + 0x18 : table_at + i * 64 + 0x20], "little") == offset)
        patch(path, table_at + index * 64 + 0x20, (1 << 62).to_bytes(8, "little"))
    elif crafted == "section_count":  # 65535 section headers from the last byte on
        patch(path, 0x28, (len(data) - 1).to_bytes(8, "little") + data[0x30:0x3C] + (0xFFFF).to_bytes(2, "little"))
    else:
        end = len(data) - 22
        directory_at = int.from_bytes(data[end + 16 : end + 20], "little")
        if crafted == "zip_member_size":  # the first member claims 4 GiB - 1
            patch(path, directory_at + 20, (0xFFFFFFFE).to_bytes(4, "little") * 2)
        else:  # the end record claims 65534 entries
            patch(path, end + 8, (0xFFFE).to_bytes(2, "little") * 2)
    for loader in ("ip_runtime", "python"):
        code, _ = refusal(loader, path)
        assert code == "not_an_artifact"


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="counts the bytes read through /proc/self/io (Linux)")
@pytest.mark.parametrize("suffix, message", [(".so", "not a shared library"), (".pt2", "not a zip file")])
def test_a_large_file_that_is_no_artifact_is_refused_before_it_is_copied(tmp_path, suffix, message):
    """A data file given an artifact's name is refused from its first bytes, not copied into memory first (a file
    larger than the memory left would end the process). rchar counts what read() and sendfile() read."""
    path = tmp_path / f"table{suffix}"
    with open(path, "wb") as handle:
        handle.truncate(512 * MiB)  # sparse: costs no disk
    for loader in ("ip_runtime", "python"):
        before = read_characters()
        code, text = refusal(loader, path)
        assert code == "not_an_artifact" and message in text
        assert read_characters() - before < 64 * MiB, f"{loader} read the file before refusing it"


def read_characters() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


# --- 3. What is loaded is exactly the checked bytes --------------------------------------------------

def test_a_bare_name_loads_the_file_it_names(compiled, tmp_path):
    """With LD_LIBRARY_PATH holding another model.so, the old runtime read this file's metadata but
    dlopen ran the other one's code."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    copy(compiled, "ti_imagepiece", here, "model.so")
    copy(compiled, "ti_evit", elsewhere, "model.so")
    out = run_isolated(f"""
        import torch, ip_runtime
        from imagepiece.export import load
        images = {IMAGES}
        direct = ip_runtime.Runtime({str(compiled.path("ti_imagepiece"))!r}).run(images)
        print(torch.equal(ip_runtime.Runtime("model.so").run(images), direct), torch.equal(load("model.so")(images), direct))
    """, cwd=here, env={"LD_LIBRARY_PATH": str(elsewhere)})
    assert out.split() == ["True", "True"]


def package_of(compiled, library, folder):
    """A .pt2 like ti_tome_pt2 whose compiled library is `library`'s (another model's code)."""
    package, target = compiled.path("ti_tome_pt2"), folder / f"{library}.pt2"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as out:
        for member in source.namelist():
            if not member.endswith("imagepiece/metadata.json"):
                out.writestr(member, compiled.path(library).read_bytes() if member.endswith(".so") else source.read(member))
    write_metadata(target, {**read_metadata(compiled.path(library)), "artifact_format": "pt2"})
    return target


@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
@pytest.mark.parametrize("suffix", [".so", ".pt2"])
def test_replacing_an_artifact_and_loading_it_again_runs_the_new_code(compiled, tmp_path, loader, suffix):
    """The old runtime ran the first library's code with the second one's metadata (glibc kept it)."""
    first = compiled.path("ti_imagepiece") if suffix == ".so" else compiled.path("ti_tome_pt2")
    second = compiled.path("ti_evit") if suffix == ".so" else package_of(compiled, "ti_evit", tmp_path)
    path = tmp_path / f"model{suffix}"
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    shutil.copy(first, path)
    old = load_with(loader, path)
    old_logits = run_with(old, images)
    shutil.copy(second, tmp_path / "staged")
    os.replace(tmp_path / "staged", path)
    new = load_with(loader, path)
    assert (new.info["metadata"] if loader == "ip_runtime" else new.metadata) == read_metadata(second)
    new_logits = run_with(new, images)
    assert torch.equal(new_logits, run_with(load_with(loader, compiled.path("ti_evit")), images))
    assert not torch.allclose(new_logits, old_logits)
    assert torch.equal(run_with(old, images), old_logits)  # the first model keeps its own code


@pytest.mark.parametrize("name", ["ti_imagepiece", "ti_tome_pt2"])
def test_rewriting_or_deleting_a_loaded_artifact_changes_nothing(compiled, tmp_path, name):
    """The old runtime mapped the file itself: rewriting it in place killed the process (SIGBUS)."""
    path = copy(compiled, name, tmp_path)
    out = run_isolated(f"""
        import os, torch, ip_runtime
        from imagepiece.export import load
        from imagepiece.artifact import ArtifactError
        images = {IMAGES}
        models = {{"ip_runtime": ip_runtime.Runtime({str(path)!r}), "python": load({str(path)!r})}}
        calls = {{"ip_runtime": lambda m, x: m.run(x), "python": lambda m, x: m(x)}}
        before = {{loader: calls[loader](model, images) for loader, model in models.items()}}
        with open({str(path)!r}, "r+b") as handle:
            handle.truncate(0)
            handle.write(os.urandom(1 << 20))
        for loader, model in models.items():
            print(torch.equal(calls[loader](model, images), before[loader]))
        for make in (ip_runtime.Runtime, load):
            try:
                make({str(path)!r})
            except (ip_runtime.Error, ArtifactError) as error:
                print(error.code)
        os.remove({str(path)!r})
        for loader, model in models.items():
            print(torch.equal(calls[loader](model, images), before[loader]))
    """)
    assert out.split() == ["True", "True", "not_an_artifact", "not_an_artifact", "True", "True"]


def resident_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def private_copies():
    """Mappings of the runtimes' private copies in this process (memfd names start with imagepiece:)."""
    return sum("/memfd:imagepiece:" in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
@pytest.mark.parametrize("name", ["ti_imagepiece", "ti_tome_pt2"])
def test_load_unload_cycles_keep_memory_flat(compiled, loader, name):
    """The old runtime kept every .pt2 load mapped (~23 MiB each). 15 cycles after warm-up must grow
    RSS by less than 1 MiB a load on average (`python -m imagepiece.bench artifact-load` reports 200 cycles)."""
    path, cycles = compiled.path(name), 15
    images = torch.randn(2, 3, 224, 224)
    for _ in range(3):  # allocator pools and lazy library state settle first
        run_with(load_with(loader, path), images)
    before, mappings = resident_mib(), private_copies()
    for _ in range(cycles):
        model = load_with(loader, path)
        run_with(model, images)
        del model
    growth = resident_mib() - before
    assert growth < cycles * 1.0, f"RSS grew {growth:.1f} MiB over {cycles} loads"
    assert private_copies() == mappings  # every load reused the one loaded copy


# --- 4. Threads and fork --------------------------------------------------------------------------------

@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
def test_an_artifact_runs_with_the_thread_count_of_the_process_running_it(compiled, loader):
    """Not the build machine's: with one thread, a run starts no OpenMP worker (torch 2.11's Inductor
    baked the build machine's count into each kernel unless asked not to)."""
    path = compiled.path("ti_imagepiece")
    out = run_isolated(f"""
        import os, torch, ip_runtime
        from imagepiece.export import load
        torch.set_num_threads(1)
        model = ip_runtime.Runtime({str(path)!r}) if {loader!r} == "ip_runtime" else load({str(path)!r})
        call = model.run if {loader!r} == "ip_runtime" else model
        before = len(os.listdir("/proc/self/task"))
        call({IMAGES})
        print(before, len(os.listdir("/proc/self/task")))
    """)
    before, after = out.split()
    assert after == before, f"threads before the run {before}, after {after}"


@pytest.mark.parametrize("loader", ["ip_runtime", "python"])
def test_a_child_forked_after_runs_runs_too(compiled, loader):
    """The old runtime's child hung in its first run (libgomp cannot rebuild its thread pool)."""
    path = compiled.path("ti_imagepiece")
    out = run_isolated(f"""
        import os, threading, torch, ip_runtime
        from imagepiece.export import load
        make = ip_runtime.Runtime if {loader!r} == "ip_runtime" else load
        call = (lambda m, x: m.run(x)) if {loader!r} == "ip_runtime" else (lambda m, x: m(x))
        torch.set_num_threads(2)
        images = {IMAGES}
        model = make({str(path)!r})
        expected = call(model, images)
        stop = threading.Event()

        def keep_running():  # forks happen while another thread is inside run()
            while not stop.is_set():
                call(model, images)

        worker = threading.Thread(target=keep_running)
        worker.start()
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                same = torch.equal(call(model, images), expected) and torch.equal(call(make({str(path)!r}), images), expected)
                os._exit(0 if same else 3)
            _, status = os.waitpid(pid, 0)
            print(os.waitstatus_to_exitcode(status))
        stop.set()
        worker.join()
    """, timeout=300)
    assert out.split() == ["0", "0"]
