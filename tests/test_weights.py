import pickle
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from imagepiece import CheckpointError, create_model

ARCH = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def deit_state():
    torch.manual_seed(0)
    return timm.create_model(ARCH).state_dict()


@pytest.fixture(scope="module")
def deit_files(tmp_path_factory, deit_state):
    """A random DeiT-Ti saved the three ways users have checkpoints."""
    folder = tmp_path_factory.mktemp("ckpt")
    files = {
        "pth_wrapped": folder / "deit_wrapped.pth",  # facebookresearch/deit layout: {"model": state}
        "pth_plain": folder / "deit_plain.pth",
        "safetensors": folder / "deit.safetensors",
    }
    torch.save({"model": deit_state, "epoch": 299}, files["pth_wrapped"])
    torch.save(deit_state, files["pth_plain"])
    save_file({k: v.contiguous() for k, v in deit_state.items()}, files["safetensors"])
    return files


@pytest.mark.parametrize("layout", ["pth_wrapped", "pth_plain", "safetensors"])
@pytest.mark.parametrize("method", ["plain", "tome", "evit", "imagepiece"])
def test_deit_checkpoint_loads_into_every_method(deit_files, deit_state, layout, method):
    model = create_model(ARCH, method, checkpoint=deit_files[layout])
    torch.testing.assert_close(model.state_dict()["blocks.5.attn.qkv.weight"], deit_state["blocks.5.attn.qkv.weight"])


def test_the_trained_weights_are_read_not_the_ema_copy_beside_them(deit_state, tmp_path):
    # DeiT's checkpoint.pth holds both; timm's reader preferred the EMA copy, silently.
    ema = {name: torch.zeros_like(value) for name, value in deit_state.items()}
    torch.save({"model": deit_state, "model_ema": ema, "epoch": 3}, tmp_path / "both.pth")
    torch.save({"state_dict_ema": deit_state}, tmp_path / "ema_only.pth")  # nothing else: the EMA copy is it
    for name in ("both.pth", "ema_only.pth"):
        model = create_model(ARCH, "imagepiece", checkpoint=tmp_path / name)
        torch.testing.assert_close(model.state_dict()["head.weight"], deit_state["head.weight"])


def test_a_plain_deit_checkpoint_fills_every_tensor_of_a_residual_lcb_model(deit_files, deit_state):
    residual = create_model(ARCH, "imagepiece", checkpoint=deit_files["pth_plain"], lcb="residual")
    loaded = residual.state_dict()
    assert set(loaded) - set(deit_state) == {key for key in loaded if key.startswith("lcb.")} != set()
    for key, value in deit_state.items():
        assert torch.equal(loaded[key], value), key


def test_residual_lcb_weights_round_trip(tmp_path):
    trained = create_model(ARCH, "imagepiece", lcb="residual")
    torch.nn.init.normal_(trained.lcb.proj.weight)
    torch.save(trained.state_dict(), tmp_path / "lcb.pth")
    loaded = create_model(ARCH, "imagepiece", lcb="residual", checkpoint=tmp_path / "lcb.pth")
    torch.testing.assert_close(loaded.lcb.proj.weight, trained.lcb.proj.weight)


def test_stem_lcb_needs_trained_weights(deit_files, tmp_path):
    with pytest.raises(CheckpointError, match="LCB 'stem'.*must be trained"):
        create_model(ARCH, "imagepiece", lcb="stem", checkpoint=deit_files["pth_plain"])
    with pytest.warns(UserWarning, match="untrained"):
        create_model(ARCH, "imagepiece", lcb="stem", checkpoint=deit_files["pth_plain"], allow_untrained_lcb=True)
    stem_model = create_model(ARCH, "imagepiece", lcb="stem")
    torch.save(stem_model.state_dict(), tmp_path / "stem.pth")
    loaded = create_model(ARCH, "evit", lcb="stem", checkpoint=tmp_path / "stem.pth")
    torch.testing.assert_close(loaded.patch_embed.proj.layers[0].weight, stem_model.patch_embed.proj.layers[0].weight)


def test_mismatched_checkpoints_list_every_problem(deit_state, tmp_path):
    broken = dict(deit_state)
    del broken["blocks.0.norm1.weight"]
    broken["blocks.0.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): blocks.0.norm1.weight; unexpected 1 key\(s\): blocks.0.extra"):
        create_model(ARCH, checkpoint=tmp_path / "broken.pth")
    # A DeiT-S checkpoint into DeiT-Ti: every width differs; the first few are named, not all 150 (a 10 KB line).
    torch.save(timm.create_model("deit_small_patch16_224").state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"\d+ shape mismatch\(es\): cls_token: checkpoint \(1, 1, 384\) vs model \(1, 1, 192\), .*"
                                              r"\.\.\. \(\d+ more\)") as error:
        create_model(ARCH, checkpoint=tmp_path / "small.pth")
    assert len(str(error.value)) < 1000 and "--num-classes" not in str(error.value)
    # Only the head differs (a timm model fine-tuned on 3 classes): the error names the flag that fits.
    three = {**deit_state, "head.weight": torch.zeros(3, deit_state["head.weight"].shape[1]), "head.bias": torch.zeros(3)}
    torch.save(three, tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match=r"Its head has 3 classes: pass --num-classes 3 \(num_classes=3 from Python, then model.reset_classifier"):
        create_model(ARCH, checkpoint=tmp_path / "three.pth")
    # A head as narrow as another model's features: not a class count to fix (the hint named the 1000 asked for).
    narrow = {**deit_state, "head.weight": torch.zeros(1000, 100)}
    torch.save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(1000, 100\) vs model \(1000, 192\)") as error:
        create_model(ARCH, checkpoint=tmp_path / "narrow.pth")
    assert "--num-classes" not in str(error.value)


def test_a_model_without_a_head_takes_a_checkpoint_with_one(deit_files, deit_state):
    # num_classes=0 (a feature model, as timm builds one): the checkpoint's classifier is dropped, as timm's loader does.
    model = create_model(ARCH, "imagepiece", num_classes=0, checkpoint=deit_files["pth_plain"])
    assert "head.weight" not in model.state_dict()
    torch.testing.assert_close(model.state_dict()["blocks.5.attn.qkv.weight"], deit_state["blocks.5.attn.qkv.weight"])


def test_a_checkpoint_with_nan_or_infinite_weights_is_refused(deit_state, tmp_path):
    # It would load, compile and answer NaN logits for every image.
    diverged = dict(deit_state)
    diverged["blocks.3.mlp.fc1.weight"] = deit_state["blocks.3.mlp.fc1.weight"].clone()
    diverged["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    diverged["head.bias"] = torch.full_like(deit_state["head.bias"], float("inf"))
    torch.save(diverged, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 2 tensor\(s\): blocks.3.mlp.fc1.weight, head.bias"):
        create_model(ARCH, checkpoint=tmp_path / "diverged.pth")
    float8 = {**deit_state, "head.weight": deit_state["head.weight"].to(torch.float8_e4m3fn)}  # no isfinite of its own
    torch.save(float8, tmp_path / "float8.pth")
    create_model(ARCH, checkpoint=tmp_path / "float8.pth")


def test_a_fine_tuned_checkpoint_that_does_not_fit_says_which_flags_rebuild_its_model(tmp_path):
    tuned = create_model(ARCH, "imagepiece", lcb="residual", num_classes=10)
    torch.save({"model": tuned.state_dict(), "epoch": 3, "arch": ARCH, "preset": "imagepiece", "lcb": "residual", "num_classes": 10},
               tmp_path / "best.pth")  # what scripts/finetune.py writes
    with pytest.raises(CheckpointError, match=rf"unexpected .*lcb.*shape mismatch.*head.weight.*"
                                              rf"fine-tuned \(scripts/finetune.py\) as --arch {ARCH} --lcb residual --num-classes 10"):
        create_model(ARCH, "imagepiece", checkpoint=tmp_path / "best.pth")
    create_model(ARCH, "evit", lcb="residual", num_classes=10, checkpoint=tmp_path / "best.pth")  # those flags: it loads
    torch.save({"model": tuned.state_dict(), "epoch": 3}, tmp_path / "other.pth")  # no record: no hint
    with pytest.raises(CheckpointError) as error:
        create_model(ARCH, "imagepiece", checkpoint=tmp_path / "other.pth")
    assert "fine-tuned" not in str(error.value)


def test_paths_that_are_not_checkpoints(deit_files, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model(ARCH, checkpoint=tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="does not exist or is not a file"):
        create_model(ARCH, checkpoint=tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint .not a torch.save checkpoint nor a safetensors file"):
        create_model(ARCH, checkpoint=tmp_path / "notes.txt")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'.*empty.pth' is empty \(0 bytes\)"):
        create_model(ARCH, checkpoint=tmp_path / "empty.pth")
    (tmp_path / "code.pth").write_bytes(b"\x80\x02csubprocess\nPopen\nq\x00.")  # a pickle that names a callable
    with pytest.raises(CheckpointError, match="pickled objects other than tensors") as error:
        create_model(ARCH, checkpoint=tmp_path / "code.pth")
    assert "weights_only=False" not in str(error.value) and len(str(error.value).splitlines()) == 1
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(deit_files["pth_plain"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        create_model(ARCH, checkpoint=truncated)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        create_model(ARCH, checkpoint=bad_safetensors)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pth")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        create_model(ARCH, checkpoint=tmp_path / "no_tensors.pth")


def test_a_file_that_is_no_pickle_says_so_and_safetensors_load_under_any_name(deit_files, tmp_path):
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"a pickle torch.save did not write, or no pickle at all \(Unsupported operand"):
        create_model(ARCH, checkpoint=tmp_path / "noise.pth")
    with open(tmp_path / "plain_pickle.pth", "wb") as handle:  # pickle.dump's protocol 4, which torch.load warned of
        pickle.dump({"a": 1}, handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"a pickle torch.save did not write"):
            create_model(ARCH, checkpoint=tmp_path / "plain_pickle.pth")
    renamed = tmp_path / "deit.pth"  # a safetensors file under a .pth name: timm chose its reader by the name alone
    renamed.write_bytes(deit_files["safetensors"].read_bytes())
    loaded = create_model(ARCH, "plain", checkpoint=renamed)
    assert torch.equal(loaded.state_dict()["head.weight"], create_model(ARCH, "plain", checkpoint=deit_files["safetensors"]).state_dict()["head.weight"])
