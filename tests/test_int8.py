"""int8 artifacts (PT2E, X86InductorQuantizer, Linear layers only): one DeiT-Ti ImagePiece compile per
session (tests/artifacts.py "ti_imagepiece_int8", timm-init weights, synthetic calibration).

The artifact takes fp32 images (its metadata's "dtype") and computes in int8 ("precision"). Agreement
with the fp32 eager model is measured, not exactness: int8 noise moves scores, and on random weights
with noise images that alone reshuffles merges (as bf16 does; see `python -m imagepiece.bench
precision`), so top-1 agrees on most images, not all. The thresholds hold with or without VNNI
(oneDNN's slower int8 path on CPUs without it computes the same products).
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao", reason="int8 artifacts need torchao: pip install 'imagepiece[int8]'")

from imagepiece.environment import int8_support  # noqa: E402
from imagepiece.export import load  # noqa: E402
from inputs import random_images, write_image_folder  # noqa: E402

NAME = "ti_imagepiece_int8"
MIN_TOP1_AGREEMENT = 0.6
MIN_MEAN_COSINE = 0.99


def test_int8_metadata_says_fp32_images_int8_arithmetic_how_it_was_calibrated_and_how_close_it_is(compiled):
    metadata = load(compiled.path(NAME)).metadata
    assert (metadata["dtype"], metadata["precision"]) == ("fp32", "int8")
    assert metadata["quantization"]["calibration"] == {"source": "synthetic (N(0,1) images, seed 0)", "images": 32}
    assert "nn.Linear" in metadata["quantization"]["scheme"]
    agreement = metadata["quantization"]["agreement_with_fp32"]  # measured at compile time, on the calibration images
    assert agreement["images"] == 32 and agreement["top1_agree"] >= MIN_TOP1_AGREEMENT * 32, agreement
    assert agreement["cosine_mean"] >= MIN_MEAN_COSINE and agreement["max_abs_logit_diff"] >= agreement["median_abs_logit_diff"] > 0


def test_int8_artifact_runs_through_ip_runtime_and_agrees_with_fp32(compiled):
    import ip_runtime

    runtime = ip_runtime.Runtime(str(compiled.path(NAME)), device="cpu")
    eager = compiled.eager(NAME)
    images = random_images(64, seed=1)
    with torch.inference_mode():
        expected = torch.cat([eager(chunk) for chunk in images.split(2)])
        actual = torch.cat([runtime.run(chunk) for chunk in images.split(2)])
        python_loader = load(compiled.path(NAME))(images[:2])
    torch.testing.assert_close(python_loader, actual[:2], rtol=0, atol=0)  # one library, two loaders
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    cosine = F.cosine_similarity(actual, expected).mean().item()
    summary = f"top-1 agreement {agreement:.3f}, mean cosine {cosine:.5f} ({int8_support().reason})"
    assert agreement >= MIN_TOP1_AGREEMENT and cosine >= MIN_MEAN_COSINE, summary


def test_profile_mode_times_an_int8_artifact_with_fp32_images_and_files_its_int8_gemms_as_linear(compiled):
    """`bench profile --dtype int8` feeds the artifact what it takes (fp32 images), and oneDNN's int8 GEMMs land
    in the "linear" part, so its report compares like with like against plain DeiT. The session's artifact was
    not compiled with kernel profiling (the CLI's are), so the GEMM names are the ones a profiled one records."""
    from imagepiece.bench.profiling import group_of, median_times, profile_interleaved

    samples, _ = profile_interleaved({"int8": compiled.path(NAME)}, batch=2, runs=1, dtype="int8")
    assert median_times(samples["int8"])["total"] > 0
    profiled_gemms = ("aoti_torch_cpu__qlinear_pointwise_tensor", "aoti_torch_cpu__qlinear_pointwise_binary_tensor")
    assert {group_of(name) for name in profiled_gemms} == {"linear"}


def test_int8_artifact_refuses_low_precision_images(compiled):
    import ip_runtime

    runtime = ip_runtime.Runtime(str(compiled.path(NAME)), device="cpu")
    with pytest.raises(ip_runtime.Error) as error:
        runtime.run(torch.randn(2, 3, 224, 224, dtype=torch.bfloat16))
    assert error.value.code == "invalid_dtype"


def test_folder_calibration_prepares_images_as_predict_does(tmp_path):
    from imagepiece.quantize import folder_calibration, image_files, spread_over_folders

    write_image_folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "notes.txt").write_text("not an image")
    preprocessing = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
                     "crop_pct": 0.9, "crop_mode": "center"}
    assert len(image_files(tmp_path)) == 6
    calibration = folder_calibration(tmp_path, preprocessing, (3, 224, 224), count=4)
    assert calibration.images.shape == (4, 3, 224, 224) and calibration.images.dtype == torch.float32
    assert calibration.describe() == {"source": f"folder {tmp_path.name!r}", "images": 4}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        folder_calibration(tmp_path / "empty", preprocessing, (3, 224, 224))
    with pytest.raises(ValueError, match="does not exist"):
        folder_calibration(tmp_path / "missing", preprocessing, (3, 224, 224))
    # An ImageNet-style val/<class>/ folder: every class in turn, not the first class's images only.
    classes = sorted(path for path in tmp_path.iterdir() if path.is_dir() and any(path.iterdir()))
    picked = spread_over_folders(image_files(tmp_path), 4)
    assert [path.parent for path in picked] == [classes[0], classes[1], classes[0], classes[1]]
    # A file that is no usable image is named: a bad request (exit 2), not "could not write" the artifact.
    (classes[0] / "aaa_broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="calibration image .*aaa_broken.jpg' cannot be used: not an image"):
        folder_calibration(tmp_path, preprocessing, (3, 224, 224), count=8)


def test_the_calibration_folder_is_listed_as_predict_lists_a_folder(tmp_path):
    from image_files import huge_png
    from imagepiece.quantize import calibration_files, folder_calibration

    write_image_folder(tmp_path, classes=1, per_class=2)
    # Hidden files and folders are left out, as predict leaves them out (its walk: deep trees too, test_predict.py).
    (tmp_path / "class_000" / "._photo.jpg").write_bytes(b"macOS metadata, not a jpeg")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.jpg").write_bytes(b"not a jpeg either")
    assert [path.name for path in calibration_files(tmp_path, 32)] == sorted(p.name for p in (tmp_path / "class_000").glob("[!.]*"))
    # The decompression-bomb refusal names no --max-pixels: aot_compile has no such flag.
    (tmp_path / "class_000" / "bomb.png").write_bytes(huge_png(20_000, 20_000))
    preprocessing = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
                     "crop_pct": 0.9, "crop_mode": "center"}
    with pytest.raises(ValueError, match="decompression-bomb guard") as error:
        folder_calibration(tmp_path / "class_000", preprocessing, (3, 224, 224), count=4)
    assert "--max-pixels" not in str(error.value)


def test_int8_calibrates_on_whole_batches_by_default_and_refuses_fewer_images_than_a_batch(capsys):
    from imagepiece.quantize import default_calibration_images
    from script_runs import load_script

    assert [default_calibration_images(batch, dynamic=False) for batch in (1, 8, 20, 64)] == [32, 32, 40, 64]
    assert default_calibration_images(64, dynamic=True) == 32
    aot_compile = load_script("aot_compile")
    for args, message in ((["--calibration-images", "1", "--batch", "2"], "--calibration-images 1 is fewer than one batch"),
                          (["--calibration-images", "1000000000"], "must be an integer <= 4,096")):
        with pytest.raises(SystemExit):
            aot_compile.parse_args(["--dtype", "int8", *args, "--out", "q.so"])
        assert message in capsys.readouterr().err


def test_importing_torchao_leaves_stderr_to_the_commands_own_lines():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "from imagepiece.quantize import require_torchao; require_torchao()"],
                            capture_output=True, text=True, check=True)
    assert result.stderr == ""


def test_calibration_runs_and_records_the_images_a_graph_can_take():
    from imagepiece.quantize import Calibration, calibration_chunks, quantize_int8, usable_calibration

    # A static batch of 2 takes whole batches: 5 images calibrate on 4, and the metadata must say 4, not 5.
    assert calibration_chunks(5, 2, dynamic=False) == [slice(0, 2), slice(2, 4)]
    assert len(usable_calibration(Calibration(torch.randn(5, 3, 8, 8), "x"), 2, dynamic=False).images) == 4
    with pytest.raises(ValueError, match="static batch-4 artifact needs at least 4 images, got 3"):
        usable_calibration(Calibration(torch.randn(3, 3, 8, 8), "x"), 4, dynamic=False)
    # A dynamic batch takes the rest too: one image is enough (it once asked for "one batch of 2").
    assert calibration_chunks(5, 2, dynamic=True) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
    quantized = quantize_int8(model, torch.randn(2, 3, 2, 2), Calibration(torch.randn(1, 3, 2, 2), "one"), batch=2,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    assert quantized(torch.randn(3, 3, 2, 2)).shape == (3, 4)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp32", "--calibration", "."], "--calibration and --calibration-images apply only to --dtype int8"),
    (["--dtype", "int8", "--calibration", "/nonexistent/images"], "does not exist"),
])
def test_aot_compile_refuses_bad_int8_requests_before_compiling(tmp_path, capsys, args, message):
    from script_runs import call_script

    out = tmp_path / "model.so"
    result = call_script("aot_compile", capsys, "--arch", "deit_tiny_patch16_224", "--device", "cpu", "--batch", "2", *args, "--out", out)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not out.exists()
