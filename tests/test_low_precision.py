"""Low-precision support detection: bf16 and int8 say whether this CPU runs them natively, and a request
that would be emulated is refused or warned about, with the reason."""
import pytest

from imagepiece import environment


@pytest.mark.parametrize("flags, native", [
    ({"avx512f", "avx512_bf16"}, True),
    ({"avx512f", "amx_bf16", "amx_tile"}, True),
    ({"avx2", "avx512f", "avx512_vnni"}, False),
    (set(), False),  # flags unreadable (not Linux): assume nothing
])
def test_bf16_support_follows_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset(flags))
    support = environment.bf16_support()
    assert support.native is native
    assert ("emulated" in support.reason) is not native


def test_int8_support_names_vnni(monkeypatch):
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert environment.int8_support().native and "avx_vnni" in environment.int8_support().reason
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not environment.int8_support().native and "slow path" in environment.int8_support().reason


def test_machine_info_records_the_low_precision_flags_it_found():
    info = environment.machine_info()
    assert set(info["cpu_low_precision"]) <= environment.LOW_PRECISION_FLAGS


def test_cpu_bf16_compile_warns_where_it_would_be_emulated(monkeypatch):
    from imagepiece import export

    monkeypatch.setattr(export, "bf16_support", lambda: environment.LowPrecisionSupport(False, "no bf16 here: emulated"))
    with pytest.warns(UserWarning, match="no bf16 here"):
        export.check_device_and_dtype("cpu", "bf16")


def test_int8_is_a_cpu_precision():
    from imagepiece import export

    assert "int8" in export.PRECISIONS
    with pytest.raises(ValueError, match="dtype must be one of"):
        export.check_device_and_dtype("cpu", "int4")


def test_openvino_bf16_is_refused_without_bf16_instructions(monkeypatch, tmp_path):
    pytest.importorskip("openvino", reason="the peers are optional extras: pip install 'imagepiece[peers]'")
    from imagepiece import peers

    monkeypatch.setattr(environment, "bf16_support", lambda: environment.LowPrecisionSupport(False, "no bf16 here: emulated"))
    with pytest.raises(ValueError, match="no bf16 here"):
        peers.OpenVinoModel(tmp_path / "never_read.onnx", "bf16")


def test_exact_ties_are_broken_by_position():
    """The cheap stabilisation: equal scores rank by token position (as ONNX's TopK does), so every backend
    takes the same choice on an exact tie."""
    import torch

    from imagepiece.reduce import prune_and_fuse, split_candidates

    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.1, 0.3, 0.1]]).repeat(2, 1)  # [CLS], then two tie groups
    a_index, b_index, semantic = split_candidates(scores, num_candidates=4)
    assert (a_index.tolist(), b_index.tolist(), semantic.tolist()) == ([[1, 4]] * 2, [[3, 6]] * 2, [[2, 5]] * 2)
    x = torch.arange(2 * 7, dtype=torch.float32).view(2, 7, 1)
    kept, _, _ = prune_and_fuse(x, torch.ones(2, 7, 1), scores, num_kept=3)
    torch.testing.assert_close(kept[:, :4], x[:, [0, 2, 5, 1]])  # [CLS], the two 0.3s, then the first 0.1
