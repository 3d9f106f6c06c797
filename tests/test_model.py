import pytest
import timm
import torch

import imagepiece
from imagepiece import METHODS, ReductionConfig, create_model, token_schedule
from imagepiece.reduce import PRUNED_SOURCE
from inputs import random_images

NUM_PATCHES = 196


@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
def test_no_reduction_equals_timm_deit(arch, images):
    torch.manual_seed(0)
    reference = timm.create_model(arch).eval()
    model = create_model(arch, "plain")
    model.load_state_dict(reference.state_dict())
    with torch.inference_mode():
        assert (model(images) - reference(images)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "method, settings",
    [
        ("plain", dict(lcb="residual")),  # the residual LCB starts at zero: DeiT checkpoints fine-tune from DeiT itself
        ("imagepiece", dict(merge_ratio=0.0, keep_rate=1.0)),
        ("tome", dict(tome_r=0)),
        ("evit", dict(keep_rate=1.0)),
    ],
)
def test_every_reduction_off_equals_timm_deit(method, settings, images):
    # DESIGN.md section 2: with nothing merged or pruned (and LCB off or at its zero init) the model is timm's DeiT.
    arch = "deit_tiny_patch16_224"
    torch.manual_seed(0)
    reference = timm.create_model(arch).eval()
    model = create_model(arch, method, **settings)
    assert all(block.tokens_out == NUM_PATCHES + 1 for block in model.token_schedule())
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("lcb.") for key in missing)
    with torch.inference_mode():
        assert (model(images) - reference(images)).abs().max() <= 1e-5


def make_lcb_smooth(model, strength=5.0):
    """Give the residual LCB a job: add a 5x5-neighbourhood average of a random projection of
    the tokens (biases keep GELU in its linear range), as a trained LCB would make nearby
    patches alike."""
    lcb, generator = model.lcb, torch.Generator().manual_seed(0)
    hidden, dim = lcb.conv1.out_channels, lcb.conv1.in_channels
    with torch.no_grad():
        down = torch.randn(hidden, dim, generator=generator) / dim**0.5
        lcb.conv1.weight.copy_(down[:, :, None, None].expand(-1, -1, 3, 3) / 9)
        lcb.conv1.bias.fill_(10.0)
        lcb.conv2.weight.copy_(torch.eye(hidden)[:, :, None, None].expand(-1, -1, 3, 3) / 9)
        lcb.conv2.bias.zero_()
        up = torch.randn(dim, hidden, generator=generator) / hidden**0.5 * strength
        lcb.proj.weight.copy_(up[:, :, None, None])
        lcb.proj.bias.copy_(-10.0 * up.sum(dim=1))


def mean_merge_distance(model, images):
    """Mean grid (Manhattan) distance between the patches that block 0 merged into one token."""
    captured = []
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: captured.append(out[2]))
    with torch.inference_mode():
        model.forward_tokens(images, trace_source=True)
    hook.remove()
    distances = []
    for tokens in captured[0][:, :, 1:]:
        for patches in tokens:
            cells = [divmod(int(i), 14) for i in torch.nonzero(patches == 1)[:, 0]]
            distances += [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(cells, cells[1:])]
    return sum(distances) / len(distances)


def test_a_nonzero_lcb_residual_makes_neighbours_merge():
    images = random_images(4, seed=0)
    # Seeded: how local the merges get depends on the random rest of the model (at strength 5 the mean distance
    # ranged 1.6-6.2 over seeds 0-7; at 10, 1.2-3.0), and unseeded it depended on which tests ran before.
    torch.manual_seed(0)
    plain = create_model("deit_tiny_patch16_224", "imagepiece", lcb="residual")
    smooth = create_model("deit_tiny_patch16_224", "imagepiece", lcb="residual")
    smooth.load_state_dict(plain.state_dict())
    make_lcb_smooth(smooth, strength=10.0)
    # Noise images: without LCB, merged patches lie anywhere (~9 cells apart); with a local
    # averaging LCB, the merges are between neighbours.
    assert mean_merge_distance(plain, images) > 5
    assert mean_merge_distance(smooth, images) < 2


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


@pytest.mark.parametrize("method, options", [(method, {}) for method in METHODS] + [("imagepiece", {"reevaluation": "sum"})])
@pytest.mark.parametrize("lcb", [None, "stem", "residual"])
def test_every_method_and_lcb_exports_with_static_shapes(method, options, lcb, images):
    model = create_model("deit_tiny_patch16_224", method, lcb=lcb, **options)
    if lcb == "residual":
        make_lcb_smooth(model)  # a live branch, not the zero-init no-op
    exported = torch.export.export(model, (images,))
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(images), model(images))


def test_reevaluation_modes_share_the_schedule_and_differ_only_in_pruning_scores():
    attention = create_model("deit_small_patch16_224", "imagepiece")
    summed = create_model("deit_small_patch16_224", "imagepiece", reevaluation="sum")
    summed.load_state_dict(attention.state_dict())
    assert attention.token_schedule() == summed.token_schedule()
    images = random_images(4, seed=3)
    with torch.inference_mode():
        assert not torch.allclose(attention(images), summed(images))  # different tokens pruned
        # No pruning, no difference: the two modes only score tokens for pruning.
        no_prune = {"prune_blocks": ()}
        a, s = (create_model("deit_small_patch16_224", "imagepiece", reevaluation=mode, **no_prune) for mode in ("attention", "sum"))
        s.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(images), s(images))


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
        assert timm.list_models(f"{method}_deit*") == [f"{method}_deit_{size}_patch16_224" for size in ("base", "small", "tiny")]
        assert timm.list_models(f"{method}_deit*", pretrained=True) == []  # no hub weights claimed
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", p=0.4, reevaluation="sum")
    assert isinstance(model, imagepiece.ImagePieceViT) and model.reduction_config.p == 0.4
    assert model.reduction_config.reevaluation == "sum"
    assert model.pretrained_cfg["architecture"] == "imagepiece_deit_tiny_patch16_224"
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and model.pretrained_cfg["interpolation"] == "bicubic"
    stem = timm.create_model("evit_deit_tiny_patch16_224", lcb="stem")
    assert isinstance(stem.patch_embed, imagepiece.lcb.ConvStemPatchEmbed)  # chosen as timm's embed_layer


def test_the_old_method_name_none_still_builds_plain_deit_with_a_warning():
    with pytest.warns(FutureWarning, match="'none' is now called 'plain'"):
        model = create_model("deit_tiny_patch16_224", "none")
    assert model.reduction_config.method == "plain"


def test_timm_feature_extraction_follows_the_token_schedule(images):
    features = timm.create_model("imagepiece_deit_tiny_patch16_224", features_only=True, out_indices=(0, 3, 11))
    schedule = token_schedule(ReductionConfig())
    with torch.inference_mode():
        outputs = features(images)
    assert [tuple(t.shape) for t in outputs] == [(2, schedule[i].tokens_out - 1, 192) for i in (0, 3, 11)]
    plain = timm.create_model("plain_deit_tiny_patch16_224", features_only=True, out_indices=(11,))
    with torch.inference_mode():
        assert plain(images)[0].shape == (2, 192, 14, 14)  # only unreduced tokens keep the patch grid
    model = create_model("deit_tiny_patch16_224", "tome")
    with pytest.raises(ValueError, match="use 'NLC'"):
        model.forward_intermediates(images, output_fmt="NCHW")


def test_timm_feature_extraction_takes_a_checkpoint_of_any_head(images, tmp_path):
    trained = create_model("deit_tiny_patch16_224", "imagepiece", num_classes=10)  # as finetune.py saves one
    torch.nn.init.normal_(trained.blocks[0].mlp.fc1.weight)
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    features = timm.create_model("imagepiece_deit_tiny_patch16_224", features_only=True, out_indices=(0,),
                                 checkpoint=tmp_path / "trained.pth").eval()
    with torch.inference_mode():
        expected = trained.forward_intermediates(images, indices=(0,), intermediates_only=True, output_fmt="NLC")
        torch.testing.assert_close(features(images)[0], expected[0])


def test_timm_options_at_deits_own_values_are_taken():
    # timm's validate.py passes img_size and in_chans from the model's cfg: the same layout, no reason to refuse.
    for options in (dict(img_size=224), dict(img_size=(224, 224)), dict(in_chans=3), dict(global_pool="token"),
                    dict(pretrained_strict=True), dict(features_only=True, feature_cls="getter")):
        timm.create_model("tome_deit_tiny_patch16_224", **options)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: create_model("deit_huge_patch16_224"), "unknown arch"),
        (lambda: create_model("deit_small_patch16_224", "dynamicvit"), "unknown method"),
        (lambda: create_model("deit_small_patch16_224.tome", "evit"), "says method"),
        (lambda: create_model("deit_small_patch16_224", ratio=0.1), "unknown option"),
        (lambda: create_model("deit_small_patch16_224", keep_rate=2.0), "keep_rate"),
        (lambda: create_model("deit_tiny_patch16_224", "tome", config=ReductionConfig(method="evit")),
         "method='tome' but config is for method 'evit'"),
        (lambda: timm.create_model("imagepiece_deit_small_patch16_224", pretrained=True), "no hub weights"),
        # They change the tokens the static schedule counts: refused, not run with the wrong schedule.
        (lambda: timm.create_model("imagepiece_deit_tiny_patch16_224", reg_tokens=4), "reg_tokens=4 is not supported"),
        (lambda: timm.create_model("tome_deit_tiny_patch16_224", global_pool="avg"), "global_pool='avg' is not supported"),
        # ... nor later: an average over merged tokens would ignore their sizes.
        (lambda: timm.create_model("imagepiece_deit_tiny_patch16_224").reset_classifier(10, "avg"), "global_pool='avg' is not supported"),
        (lambda: timm.create_model("evit_deit_tiny_patch16_224", img_size=384), "img_size=384 is not supported"),
        (lambda: timm.create_model("evit_deit_tiny_patch16_224", features_only=True, feature_cls="hook"), "'getter' only"),
    ],
)
def test_bad_model_requests_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_config_takes_its_methods_earlier_name_too():
    with pytest.warns(FutureWarning, match="now called 'plain'"):
        assert create_model("deit_tiny_patch16_224", "none", config=ReductionConfig(method="plain")).reduction_config.method == "plain"


def test_reset_classifier_replaces_the_head_as_timms_does():
    model = timm.create_model("imagepiece_deit_tiny_patch16_224")
    model.reset_classifier(10, "token")
    assert model.head.out_features == 10 and model.global_pool == "token"
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 192)  # features, as timm's num_classes=0


@pytest.mark.parametrize("method", ["imagepiece", "evit"])
def test_grad_checkpointing_keeps_fewer_activations_and_the_same_gradients(method):
    """timm's set_grad_checkpointing(True) recomputes each block in the backward pass (it was a flag nothing read)."""
    model = create_model("deit_tiny_patch16_224", method).train()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def saved_tensors_and_gradients():
        saved = []
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(images).square().mean()
        loss.backward()
        return sum(saved), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    kept, expected = saved_tensors_and_gradients()
    model.set_grad_checkpointing(True)
    kept_checkpointed, gradients = saved_tensors_and_gradients()
    assert kept_checkpointed < kept / 4
    for got, want in zip(gradients, expected, strict=True):
        torch.testing.assert_close(got, want)


def reference_block(block, x, size, proportional):
    """One block written out the plain way: timm's pre-norm block with the full N x N attention (+ log(size) on the
    logits where proportional attention is on), the reducer between the attention residual and the MLP, as
    DESIGN.md places it. The reducer's inputs are taken off that attention: its [CLS] row (the same arithmetic as
    reduce.class_attention, so that the decisions match bit for bit), the keys averaged over heads, the [CLS] query
    and per-head keys. The reducers themselves are held to naive references in test_reduce_reference.py."""
    from imagepiece.blocks import AttentionSummary
    from imagepiece.reduce import class_attention

    attention = block.attn
    batch, count, width = x.shape
    q, k, v = attention.qkv(block.norm1(x)).reshape(batch, count, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    bias = size.log().view(batch, 1, 1, count) if proportional else torch.zeros(batch, 1, 1, count)
    weights = ((q @ k.transpose(-2, -1)) * attention.scale + bias).softmax(dim=-1)
    x = x + attention.proj((weights @ v).transpose(1, 2).reshape(batch, count, width))
    summary = AttentionSummary(scores=class_attention(q[:, :, :1], k, attention.scale, bias if proportional else None),
                               metric=k.mean(dim=1), cls_query=q[:, :, :1], keys=k.transpose(1, 2).reshape(batch, count, width),
                               scale=attention.scale)
    x, size, _ = block.reduction(x, size, summary)
    return x + block.mlp(block.norm2(x)), size


@pytest.mark.parametrize("method, settings", [("tome", {}), ("tome", {"prop_attn": False}), ("evit", {}), ("imagepiece", {}),
                                              ("imagepiece", {"reevaluation": "sum"}), ("imagepiece", {"prop_attn": False})])
def test_each_block_reduces_between_the_attention_residual_and_the_mlp(method, settings, images):
    """Every block of the model against `reference_block` on the same input: catches a reduction moved after the MLP,
    proportional attention left out of the attention (or applied where it is off), scores or metric taken off other
    tensors (the reducer tests alone, on synthetic inputs, see none of that)."""
    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", method, **settings)
    for block in model.blocks:  # q and k x4: random attention is near-uniform, all near-ties; trained attention is peaked
        block.attn.qkv.weight.data[: 2 * block.attn.qkv.in_features] *= 4
    calls = []
    hooks = [block.register_forward_hook(lambda module, args, out: calls.append((module, args[0], args[1], out)))
             for block in model.blocks]
    with torch.inference_mode():
        model(images)
        for hook in hooks:
            hook.remove()
        assert len(calls) == len(model.blocks)
        proportional = model.reduction_config.prop_attn and method != "evit"
        assert any(size.max() > 1 for _, _, size, _ in calls) == (method != "evit")  # later blocks do see pieces
        for index, (block, x, size, (out, out_size, _)) in enumerate(calls):
            want, want_size = reference_block(block, x, size, proportional)
            assert torch.equal(out_size, want_size), f"block {index}: other tokens merged or pruned"
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4, msg=f"block {index}")
