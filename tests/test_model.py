import pytest
import timm
import torch

import imagepiece
from imagepiece import METHODS, ReductionConfig, create_model, token_schedule
from imagepiece.reduce import PRUNED_SOURCE

NUM_PATCHES = 196


@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
@pytest.mark.parametrize("lcb", [None, "residual"])
def test_no_reduction_equals_timm_deit(arch, lcb, images):
    torch.manual_seed(0)
    reference = timm.create_model(arch).eval()
    model = create_model(arch, "none", lcb=lcb)
    model.load_state_dict(reference.state_dict(), strict=lcb is None)  # residual LCB: zero-init extras
    with torch.inference_mode():
        assert (model(images) - reference(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_forward_shapes_follow_the_token_schedule(method, images):
    model = create_model("deit_tiny_patch16_224", method)
    seen = []
    hooks = [block.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[1], out[0].shape[1]))) for block in model.blocks]
    with torch.inference_mode():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, 1000)
    assert seen == [(block.tokens_in, block.tokens_out) for block in model.token_schedule()]
    assert model.token_schedule() == token_schedule(ReductionConfig(method=method))


@pytest.mark.parametrize("method, overrides", [("tome", {}), ("imagepiece", {"prune_blocks": ()})])
def test_merging_only_sizes_sum_to_the_patch_count_and_sources_partition_patches(method, overrides, images):
    model = create_model("deit_tiny_patch16_224", method, **overrides)
    sums = []
    hooks = [block.register_forward_hook(lambda mod, args, out: sums.append(out[1].sum(dim=(1, 2)))) for block in model.blocks]
    with torch.inference_mode():
        _, size, source = model.forward_tokens(images, trace_source=True)
    for hook in hooks:
        hook.remove()
    for block_sums in sums:
        torch.testing.assert_close(block_sums, torch.full((2,), NUM_PATCHES + 1.0))  # +1: [CLS]
    # Every patch lies in exactly one token, and a token's size is the number of its patches.
    assert (source.sum(dim=1) == 1).all()
    torch.testing.assert_close(size[..., 0], source.sum(dim=-1))


def test_pruning_keeps_every_patch_in_exactly_one_token(images):
    """With pruning, dropped patches live on in the fused token (size 1, see reduce.prune_and_fuse)."""
    model = create_model("deit_tiny_patch16_224", "imagepiece")
    with torch.inference_mode():
        tokens, size, source = model.forward_tokens(images, trace_source=True)
    assert tokens.shape[1] == model.token_schedule()[-1].tokens_out
    assert ((source > 0).sum(dim=1) == 1).all()
    merged_patches = (source == 1).sum(dim=-1).float()
    holds_pruned = (source == PRUNED_SOURCE).any(dim=-1)
    # Patches were pruned at each of the three pruning blocks; fused tokens may merge later.
    assert holds_pruned.sum(dim=1).ge(1).all() and holds_pruned.sum(dim=1).le(len(model.reduction_config.prune_blocks)).all()
    # A token's size counts the patches merged into it, plus 1 per fused token it absorbed.
    assert (size[..., 0] >= merged_patches).all()
    torch.testing.assert_close(size[..., 0][~holds_pruned], merged_patches[~holds_pruned])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lcb", [None, "stem", "residual"])
def test_every_method_and_lcb_exports_with_static_shapes(method, lcb, images):
    model = create_model("deit_tiny_patch16_224", method, lcb=lcb)
    exported = torch.export.export(model, (images,))
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(images), model(images))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.randn(3, 224, 224), ValueError, r"shape \[B, 3, 224, 224\]"),
        (torch.randn(1, 3, 192, 192), ValueError, r"got \[1, 3, 192, 192\]"),
        (torch.randn(1, 1, 224, 224), ValueError, "shape"),
        (torch.randn(1, 224, 224, 3), ValueError, "shape"),
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), TypeError, "floating-point"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_wrong_input_gets_a_clear_error(bad, error, message):
    model = create_model("deit_tiny_patch16_224", "imagepiece")
    with pytest.raises(error, match=message):
        model(bad)


def test_model_names_and_timm_registry():
    assert imagepiece.parse_model_name("deit_small_patch16_224.tome") == ("deit_small_patch16_224", "tome")
    assert imagepiece.parse_model_name("evit_deit_base_patch16_224") == ("deit_base_patch16_224", "evit")
    for method in METHODS:
        assert f"{method}_deit_small_patch16_224" in timm.list_models(f"{method}_deit*")
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", p=0.4)
    assert isinstance(model, imagepiece.ImagePieceViT) and model.reduction_config.p == 0.4
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and model.pretrained_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: create_model("deit_huge_patch16_224"), "unknown arch"),
        (lambda: create_model("deit_small_patch16_224", "dynamicvit"), "unknown method"),
        (lambda: create_model("deit_small_patch16_224.tome", "evit"), "says method"),
        (lambda: create_model("deit_small_patch16_224", ratio=0.1), "unknown option"),
        (lambda: create_model("deit_small_patch16_224", keep_rate=2.0), "keep_rate"),
        (lambda: timm.create_model("imagepiece_deit_small_patch16_224", pretrained=True), "no hub weights"),
    ],
)
def test_bad_model_requests_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
