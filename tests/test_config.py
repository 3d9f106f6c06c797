import dataclasses

import pytest
import torch

from imagepiece.config import FIELDS_READ_BY, METHODS, ReductionConfig, fields_without_effect, format_schedule, token_schedule

DESIGN_SCHEDULE = [197, 182, 168, 155, 116, 107, 99, 75, 70, 65, 50, 47]


def tokens_in(config):
    return [block.tokens_in for block in token_schedule(config)]


def test_default_imagepiece_schedule_matches_the_design_card():
    schedule = token_schedule(ReductionConfig())
    assert tokens_in(ReductionConfig()) == DESIGN_SCHEDULE
    assert schedule[-1].tokens_out == 44
    assert [b.fused for b in schedule] == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_baseline_schedules():
    assert tokens_in(ReductionConfig(method="plain")) == [197] * 12
    # ToMe removes r=13 per block.
    assert tokens_in(ReductionConfig(method="tome")) == [197 - 13 * i for i in range(12)]
    # EViT keep 0.7 at blocks 3, 6, 9 with a fused token: 196 -> 138+1 -> 98+1 -> 70+1 image tokens.
    assert tokens_in(ReductionConfig(method="evit")) == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2


def test_schedule_rows_are_consistent():
    for method in METHODS:
        schedule = token_schedule(ReductionConfig(method=method))
        for block, following in zip(schedule, schedule[1:]):
            assert following.tokens_in == block.tokens_out
        for block in schedule:
            assert block.tokens_out == block.tokens_in - block.merged - block.pruned + block.fused
            assert block.tokens_out >= 2  # [CLS] and at least one image token survive
            if method == "imagepiece":
                assert block.merged <= block.candidates // 2


def test_keep_rate_default_depends_on_method():
    assert ReductionConfig(method="evit").keep_rate == 0.7
    assert ReductionConfig(method="imagepiece").keep_rate == 0.8
    assert ReductionConfig(method="tome").keep_rate == 1.0


@pytest.mark.parametrize("config", [ReductionConfig(), ReductionConfig(method="evit"), ReductionConfig(method="tome", tome_r=5)])
def test_format_schedule_prints_each_row_of_the_schedule(config):
    schedule = token_schedule(config)
    _, *rows, share = format_schedule(schedule).splitlines()
    parsed = [row.replace("(+", " ").replace(")", "").split() for row in rows]
    for index, (cells, block) in enumerate(zip(parsed, schedule, strict=True)):
        pruned = [block.pruned, block.fused] if block.fused else [0]
        assert [int(cell) for cell in cells] == [index, block.tokens_in, block.candidates, block.merged, *pruned, block.tokens_out]
    average = sum(block.tokens_in for block in schedule) / len(schedule)
    assert share == f"tokens per block: {round(100 * average / 197)}% of the plain model's 197"


def test_reevaluation_defaults_to_the_papers_step_and_is_validated():
    assert ReductionConfig().reevaluation == "attention"
    assert tokens_in(ReductionConfig(reevaluation="sum")) == DESIGN_SCHEDULE
    with pytest.raises(ValueError, match="reevaluation must be one of"):
        ReductionConfig(reevaluation="recompute")


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(method="dynamicvit"), "method"),
        (dict(p=0.0), "p"),
        (dict(p=1.5), "p"),
        (dict(merge_ratio=0.2), "merge_ratio"),
        (dict(merge_ratio=-0.1), "merge_ratio"),
        (dict(keep_rate=0.0), "keep_rate"),
        (dict(keep_rate=1.2), "keep_rate"),
        (dict(prune_blocks=(3, 12)), "prune_blocks"),
        (dict(prune_blocks=(6, 3)), "prune_blocks"),
        (dict(prune_blocks=(3.5,)), "prune_blocks"),
        (dict(tome_r=-1), "tome_r"),
        (dict(tome_r=2.5), "tome_r"),
        (dict(lcb="conv"), "lcb"),
        (dict(prop_attn="yes"), "prop_attn"),
        (dict(method="tome", keep_rate=0.5), "keep_rate"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        ReductionConfig(**fields)


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown config field"):
        ReductionConfig().replace(ratio=0.1)
    assert ReductionConfig().replace(p=0.4).p == 0.4


def test_fields_read_by_names_real_fields_and_methods():
    field_names = {field.name for field in dataclasses.fields(ReductionConfig)}
    assert set(FIELDS_READ_BY) <= field_names
    assert {method for methods in FIELDS_READ_BY.values() for method in methods} <= set(METHODS)
    assert fields_without_effect("tome", {"p": 0.5, "tome_r": 5}) == {"p": ("imagepiece",)}
    assert fields_without_effect("imagepiece", ["p", "merge_ratio", "keep_rate", "lcb"]) == {}


# A value each field of FIELDS_READ_BY can take for the methods that read it.
CHANGED_VALUES = {"p": 0.5, "merge_ratio": 0.12, "tome_r": 5, "keep_rate": 0.5, "prune_blocks": (1, 2), "reevaluation": "sum",
                  "prop_attn": False}
# Fields every method reads (or that name the method): nothing to refuse.
READ_BY_EVERY_METHOD = {"method", "lcb", "depth", "num_patches"}


def test_every_field_is_either_read_by_every_method_or_in_the_table():
    assert {field.name for field in dataclasses.fields(ReductionConfig)} == READ_BY_EVERY_METHOD | set(FIELDS_READ_BY)
    assert set(CHANGED_VALUES) == set(FIELDS_READ_BY)


def output_with(method, **fields):
    from imagepiece import create_model  # the model, for fields that change its scores but not its token counts

    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", method, **fields)
    with torch.inference_mode():
        return model(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("field", sorted(CHANGED_VALUES))
def test_a_field_is_refused_by_methods_that_do_not_read_it_and_changes_those_that_do(field):
    value = CHANGED_VALUES[field]
    for method in set(METHODS) - set(FIELDS_READ_BY[field]):  # it would change nothing but the record: refused
        with pytest.raises(ValueError, match=f"{field} .*method '{method}'"):
            ReductionConfig(method=method, **{field: value})
    for method in FIELDS_READ_BY[field]:  # and it changes what a method that reads it does, so the table is not too wide
        changed = ReductionConfig(method=method, **{field: value})
        if token_schedule(changed) == token_schedule(ReductionConfig(method=method)):  # scores, not counts
            assert not torch.equal(output_with(method, **{field: value}), output_with(method)), (field, method)
    assert ReductionConfig(method="tome", p=0.3).p == 0.3  # the default itself is no change
