"""Behaviour shared by the four built-in decomposers: exactness, exact cost, structure, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from _decomposer_cases import (
    CONV_CASES,
    LINEAR_CASES,
    Case,
    flops_of,
    half,
    ids,
    params_of,
    rel_error,
    with_cp_rank,
)

import rankopt
from rankopt.compression.accounting import Cost
from rankopt.core.errors import ConfigError, InvalidRanksError, UnsupportedModuleError
from rankopt.plugins.decomposers.cp import CPDecomposer
from rankopt.plugins.decomposers.svd import SVDDecomposer
from rankopt.plugins.decomposers.tt import TTDecomposer
from rankopt.plugins.decomposers.tucker2 import Tucker2Decomposer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels

EXACT = {"tucker2": Tucker2Decomposer, "svd": SVDDecomposer, "tt": TTDecomposer}
ALL = {**EXACT, "cp": CPDecomposer}


def test_builtins_are_registered() -> None:
    names = rankopt.plugin_names()["decomposers"]
    assert {"tucker2", "cp", "tt", "svd"} <= set(names)
    for name, cls in ALL.items():
        assert type(rankopt.decomposer(name)) is cls


# -- exactness at full ranks -----------------------------------------------------------------
@pytest.mark.parametrize("dec_name", sorted(EXACT))
@pytest.mark.parametrize("case", CONV_CASES, ids=ids(CONV_CASES))
def test_full_ranks_reproduce_the_conv(dec_name: str, case: Case) -> None:
    dec = EXACT[dec_name]()
    conv = case.module()
    x = case.example(conv)
    full = dec.build(conv, dec.max_ranks(conv))
    with torch.no_grad():
        assert rel_error(full(x), conv(x)) < 1e-6
    assert rel_error(dec.project(conv.weight, dec.max_ranks(conv)), conv.weight) < 1e-6


@pytest.mark.parametrize("case", LINEAR_CASES, ids=ids(LINEAR_CASES))
def test_svd_full_rank_reproduces_the_linear(case: Case) -> None:
    dec = SVDDecomposer()
    lin = case.module()
    x = case.example(lin)
    full = dec.build(lin, dec.max_ranks(lin))
    assert isinstance(full[0], nn.Linear) and full[0].bias is None
    with torch.no_grad():
        assert rel_error(full(x), lin(x)) < 1e-6


@pytest.mark.parametrize("case", CONV_CASES, ids=ids(CONV_CASES))
def test_cp_recovers_a_kernel_of_known_cp_rank(case: Case) -> None:
    dec = CPDecomposer()
    conv = with_cp_rank(case.module(), rank=3)
    x = case.example(conv)
    built = dec.build(conv, (3,))
    with torch.no_grad():
        assert rel_error(built(x), conv(x)) < 1e-4
    assert rel_error(built.reconstruct_weight(), conv.weight) < 1e-4


# -- exact cost --------------------------------------------------------------------------------
def _rank_levels(dec: rankopt.Decomposer, module: nn.Module) -> list[tuple[int, ...]]:
    top = tuple(dec.max_ranks(module))
    levels = [top, half(top), (1,) * len(top)]
    if isinstance(dec, CPDecomposer):  # its max is large; price the ranks people use too
        levels.append((min(max(module.in_channels, module.out_channels), top[0]),))
    return list(dict.fromkeys(levels))


@pytest.mark.parametrize("dec_name", sorted(ALL))
@pytest.mark.parametrize("case", CONV_CASES, ids=ids(CONV_CASES))
def test_cost_equals_built_params_and_flop_counter(dec_name: str, case: Case) -> None:
    dec = ALL[dec_name]()
    conv = case.module()
    x = case.example(conv, batch=1)
    for ranks in _rank_levels(dec, conv):
        built = dec.build(conv, ranks, initialize=False)  # the structure is what is priced
        assert dec.cost(conv, ranks, input_hw=case.input_hw) == Cost(params_of(built), flops_of(built, x)), ranks


@pytest.mark.parametrize("case", LINEAR_CASES, ids=ids(LINEAR_CASES))
def test_svd_cost_of_linear(case: Case) -> None:
    dec = SVDDecomposer()
    lin = case.module()
    x = case.example(lin, batch=1)
    for ranks in _rank_levels(dec, lin):
        built = dec.build(lin, ranks)
        assert dec.cost(lin, ranks) == Cost(params_of(built), flops_of(built, x))


def test_tucker2_cost_formula_by_hand() -> None:
    # S=64 -> r_in=16, 3x3 core 16->32 at stride 2, 32->128 with bias; 32x32 input -> 16x16
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1)
    cost = Tucker2Decomposer().cost(conv, (16, 32), input_hw=(32, 32))
    params = 64 * 16 + 16 * 32 * 9 + 32 * 128 + 128
    flops = 2 * (64 * 16 * 32 * 32 + 16 * 32 * 9 * 16 * 16 + 32 * 128 * 16 * 16)
    assert cost == Cost(params, flops)


@pytest.mark.parametrize("dec_name", sorted(ALL))
def test_conv_cost_needs_input_hw(dec_name: str) -> None:
    dec = ALL[dec_name]()
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ConfigError, match="input_hw"):
        dec.cost(conv, (1,) * len(dec.max_ranks(conv)))


# -- structure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dec_name", sorted(EXACT))
@pytest.mark.parametrize("case", CONV_CASES[:5], ids=ids(CONV_CASES[:5]))
def test_uninitialized_build_has_the_same_state_dict(dec_name: str, case: Case) -> None:
    dec = EXACT[dec_name]()
    conv = case.module()
    ranks = half(dec.max_ranks(conv))
    full = dec.build(conv, ranks)
    empty = dec.build(conv, ranks, initialize=False)
    a, b = full.state_dict(), empty.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in a.items()] == [(k, v.shape, v.dtype) for k, v in b.items()]
    empty.load_state_dict(a)
    x = case.example(conv)
    with torch.no_grad():
        assert torch.equal(empty(x), full(x))


@pytest.mark.parametrize("dec_name", sorted(EXACT))
def test_built_module_equals_the_projection(dec_name: str) -> None:
    dec = EXACT[dec_name]()
    case = CONV_CASES[4]
    conv = case.module()
    ranks = half(dec.max_ranks(conv))
    built = dec.build(conv, ranks)
    projected = nn.Conv2d(6, 4, (3, 5), stride=2, padding=(1, 2), dilation=2).double()
    with torch.no_grad():
        projected.weight.copy_(dec.project(conv.weight, ranks))
        projected.bias.copy_(conv.bias)
    x = case.example(conv)
    with torch.no_grad():
        assert rel_error(built(x), projected(x)) < 1e-10
        assert rel_error(built(x), conv(x)) > 1e-3  # truncation did something


def test_factorized_modules_read_well() -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1)
    text = {n: repr(rankopt.decomposer(n).build(conv, half(rankopt.decomposer(n).max_ranks(conv)))) for n in ALL}
    assert text["tucker2"].startswith("Tucker2Conv2d(") and "(core): Conv2d(4, 6" in text["tucker2"]
    assert text["cp"].startswith("CPConv2d(") and "groups=" in text["cp"]
    assert text["tt"].startswith("TTConv2d(") and "in_factors=[2, 4]" in text["tt"]
    assert text["svd"].startswith("SVDConv2d(")
    keys = {n: list(rankopt.decomposer(n).build(conv, (1,) * len(rankopt.decomposer(n).max_ranks(conv))).state_dict()) for n in ALL}
    assert keys["tucker2"] == ["pointwise_in.weight", "core.weight", "pointwise_out.weight", "pointwise_out.bias"]
    assert keys["svd"] == ["spatial.weight", "pointwise_out.weight", "pointwise_out.bias"]


@pytest.mark.parametrize("dec_name", sorted(EXACT))
def test_float32_weights_stay_float32(dec_name: str) -> None:
    dec = EXACT[dec_name]()
    conv = nn.Conv2d(6, 8, 3, padding=1)
    ranks = half(dec.max_ranks(conv))
    built = dec.build(conv, ranks)
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    p = dec.project(conv.weight, ranks)
    assert p.dtype == torch.float32 and p.shape == conv.weight.shape and p.device == conv.weight.device


# -- truncation error is monotone -------------------------------------------------------------
def _weight_error(dec: rankopt.Decomposer, w: torch.Tensor, ranks: tuple[int, ...]) -> float:
    return rel_error(dec.project(w, ranks), w)


def test_tucker2_error_never_grows_with_either_rank() -> None:
    dec = Tucker2Decomposer()
    conv = CONV_CASES[3].module()  # 4 -> 8, 3x3
    r_in_max, r_out_max = dec.max_ranks(conv)
    grid = list(itertools.product(range(1, r_in_max + 1), range(1, r_out_max + 1)))
    err = {r: _weight_error(dec, conv.weight, r) for r in grid}
    for a, b in itertools.product(grid, grid):
        if a[0] <= b[0] and a[1] <= b[1]:
            assert err[b] <= err[a] + 1e-12, (a, b)
    assert err[(r_in_max, r_out_max)] < 1e-12 < err[(1, 1)]


def test_svd_error_never_grows_with_rank() -> None:
    dec = SVDDecomposer()
    for module in (CONV_CASES[2].module(), LINEAR_CASES[0].module()):
        (top,) = dec.max_ranks(module)
        errs = [_weight_error(dec, module.weight, (r,)) for r in range(1, top + 1)]
        assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
        assert errs[-1] < 1e-12 < errs[0]


def test_tt_error_never_grows_with_ranks() -> None:
    dec = TTDecomposer()
    conv = nn.Conv2d(12, 16, 3).double()
    top = dec.max_ranks(conv)
    fractions = [i / 10 for i in range(1, 11)]
    errs = [
        _weight_error(dec, conv.weight, tuple(max(1, round(f * r)) for r in top)) for f in fractions
    ]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12 < errs[0]


# -- refusals ------------------------------------------------------------------------------------
UNSUPPORTED = {
    "grouped_conv": nn.Conv2d(4, 8, 3, groups=2),
    "depthwise_conv": nn.Conv2d(4, 4, 3, groups=4),
    "batchnorm": nn.BatchNorm2d(4),
    "reflect_padding": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
}
REASONS = {
    "grouped_conv": "groups=2",
    "depthwise_conv": "groups=4",
    "batchnorm": "BatchNorm2d is not supported",
    "reflect_padding": "padding_mode='reflect'",
}


@pytest.mark.parametrize("dec_name", sorted(ALL))
@pytest.mark.parametrize("probe", sorted(UNSUPPORTED))
def test_unsupported_modules_are_refused_with_the_reason(dec_name: str, probe: str) -> None:
    dec = ALL[dec_name]()
    module = UNSUPPORTED[probe]
    assert not dec.supports(module)
    for call in (
        lambda: dec.max_ranks(module),
        lambda: dec.build(module, (1,) * 4),
        lambda: dec.cost(module, (1,), input_hw=(8, 8)),
    ):
        with pytest.raises(UnsupportedModuleError, match=REASONS[probe].replace("(", r"\(")):
            call()


@pytest.mark.parametrize("dec_name", ["tucker2", "cp", "tt"])
def test_conv_only_decomposers_refuse_linear(dec_name: str) -> None:
    with pytest.raises(UnsupportedModuleError, match="Linear is not supported"):
        ALL[dec_name]().check_module(nn.Linear(4, 4), name="fc")


def test_compress_refuses_an_unsupported_layer_before_building_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8))
    built: list[str] = []
    original = Tucker2Decomposer.build

    def spy(self: Tucker2Decomposer, module: nn.Module, ranks: object, **kw: object) -> nn.Module:
        built.append(repr(module))
        return original(self, module, ranks, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Tucker2Decomposer, "build", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ("1", "2"):
        spec = {"0": {"decomposer": "tucker2", "ranks": [2, 2]}, bad: {"decomposer": "tucker2", "ranks": [2, 2]}}
        with pytest.raises(UnsupportedModuleError, match=f"layer '{bad}'"):
            rankopt.compress(model, spec)
    assert built == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dec_name", sorted(ALL))
def test_out_of_range_ranks_are_refused(dec_name: str) -> None:
    dec = ALL[dec_name]()
    conv = nn.Conv2d(4, 6, 3)
    top = dec.max_ranks(conv)
    with pytest.raises(InvalidRanksError, match=rf"\[1, {top[0]}\]"):
        dec.build(conv, (top[0] + 1, *top[1:]))
    with pytest.raises(InvalidRanksError, match=f"must have {len(top)} entries"):
        dec.cost(conv, (*top, 1), input_hw=(8, 8))
    with pytest.raises(InvalidRanksError, match=rf"\[1, {top[0]}\]"):
        dec.project(conv.weight, (0, *top[1:]))


@pytest.mark.parametrize("dec_name", sorted(ALL))
def test_unknown_options_are_refused(dec_name: str) -> None:
    dec = ALL[dec_name]()
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ConfigError, match=r"unknown .* option\(s\) \['colour'\]; known options are"):
        dec.build(conv, (1,) * len(dec.max_ranks(conv)), options={"colour": "red"})


def test_bad_option_values_name_the_option() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ConfigError, match=r"init must be one of \['hosvd', 'hooi'\], got 'als'"):
        Tucker2Decomposer().build(conv, (2, 2), options={"init": "als"})
    with pytest.raises(ConfigError, match=r"split must be one of"):
        SVDDecomposer().project(conv.weight, (2,), options={"split": "middle"})
    with pytest.raises(ConfigError, match=r"n_iter_max must be an integer >= 1, got 0"):
        CPDecomposer().build(conv, (2,), options={"n_iter_max": 0})
