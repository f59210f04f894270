"""The contract kit catches the bugs a plugin written from the docs actually had.

Each broken decomposer below is a real, plausible mistake: a ``build()`` that drops
dilation, swaps the height stride onto the width, ignores the stride, or a decomposer
written with the once-documented ``rank_matrices(weight)`` signature (no ``options``)
that every spectral selector then crashed on. The kit must fail each of them, naming
the layer, the ranks and what went wrong; the default sample layers are what makes
the geometry bugs visible (the old set had no dilation and only equal strides).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn as nn
from fixtures.plugin_env import plugin_env  # noqa: F401  (pytest fixture)

import rankopt
from rankopt.cli import main
from rankopt.contract.decomposer import Decomposer
from rankopt.plugins.decomposers.tucker2 import Tucker2Decomposer
from rankopt.plugins.selectors.energy import EnergyRankSelector
from rankopt.plugins.selectors.fixed import FixedRankSelector
from rankopt.testing import CheckResult, check_decomposer, check_rank_selector, sample_layers
from rankopt.testing.installed import check_installed_plugins


def failed(results: list[CheckResult]) -> dict[str, str]:
    return {r.check: r.reason for r in results if not r.passed}


# -- geometry bugs in build() ------------------------------------------------------------


class DropsDilation(Tucker2Decomposer):
    def build(self, module, ranks, *, options=None, initialize=True):
        built = super().build(module, ranks, options=options, initialize=initialize)
        built.core.dilation = (1, 1)
        return built


class HeightStrideAlongWidth(Tucker2Decomposer):
    def build(self, module, ranks, *, options=None, initialize=True):
        built = super().build(module, ranks, options=options, initialize=initialize)
        built.core.stride = (module.stride[0], module.stride[0])
        return built


class IgnoresStride(Tucker2Decomposer):
    def build(self, module, ranks, *, options=None, initialize=True):
        built = super().build(module, ranks, options=options, initialize=initialize)
        built.core.stride = (1, 1)
        return built


# the default sample layers before issue 16: square strides, no dilation
OLD_DEFAULTS = {
    "conv3x3": nn.Conv2d(6, 8, 3, padding=1),
    "conv3x3_stride2_nobias": nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    "conv1x1": nn.Conv2d(8, 4, 1),
    "conv1x3": nn.Conv2d(4, 6, (1, 3), padding=(0, 1)),
}


@pytest.mark.parametrize(
    ("broken", "layer"),
    [(DropsDilation, "conv3x3_dilation2x1"), (HeightStrideAlongWidth, "conv3x3_stride2x1")],
)
def test_geometry_bugs_pass_the_old_layers_but_fail_the_default_ones(broken: type, layer: str) -> None:
    assert failed(check_decomposer(broken(), OLD_DEFAULTS, input_hw=(7, 7))) == {}
    problems = failed(check_decomposer(broken()))
    assert "full_rank_equivalence" in problems
    reason = problems["full_rank_equivalence"]
    assert reason.startswith(f"{layer}: at ranks (4, 6), output shape"), reason
    assert "differs from the original layer's" in reason
    # the other layers are fine, so only the broken geometry is named
    assert [p.split(":")[0] for p in reason.split("; ")] == [layer]


def test_a_wrong_stride_says_which_shapes_differ_not_a_torch_size_error() -> None:
    problems = failed(check_decomposer(IgnoresStride()))
    reason = problems["full_rank_equivalence"]
    assert (
        "conv3x3_stride2_nobias: at ranks (4, 6), output shape (2, 6, 7, 7) differs from the "
        "original layer's (2, 6, 4, 4)"
    ) in reason
    assert "conv3x3_stride2x1: at ranks (4, 6), output shape (2, 6, 7, 6) differs from the original layer's (2, 6, 4, 6)" in reason
    assert "must match the size of tensor" not in reason
    assert "output shape" in problems["build_matches_projection"]


def test_the_default_layers_cover_the_geometry_the_issue_names() -> None:
    convs = [la.module for la in sample_layers() if isinstance(la.module, nn.Conv2d)]
    assert any(m.dilation != (1, 1) for m in convs)
    assert any(m.stride[0] != m.stride[1] for m in convs)
    assert any(m.kernel_size[0] != m.kernel_size[1] for m in convs)
    assert any(p > k // 2 for m in convs for p, k in zip(m.padding, m.kernel_size))
    assert any(m.bias is None for m in convs) and any(m.bias is not None for m in convs)
    assert any(m.in_channels % 2 and m.out_channels % 2 for m in convs)
    assert any(isinstance(la.module, nn.Linear) for la in sample_layers())


# -- rank matrices, called the way the selectors call them -----------------------------------


class DocumentedWithoutOptions(Decomposer):
    """Written from the old docs: rank_matrices(weight), ranks_from_matrix_ranks(module, matrix_ranks)."""

    name = "doc_linear"
    rank_names = ("r",)
    module_types = (nn.Linear,)

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        self.check_module(module)
        return (min(module.in_features, module.out_features),)

    def cost(self, module, ranks, input_hw=None, options=None):
        (r,) = self.check_ranks(module, ranks)
        s, t = module.in_features, module.out_features
        return rankopt.Cost(r * (s + t) + (t if module.bias is not None else 0), 2 * r * (s + t))

    def build(self, module, ranks, *, options=None, initialize=True):
        self.check_module(module)
        (r,) = self.check_ranks(module, ranks)
        first = nn.Linear(module.in_features, r, bias=False)
        second = nn.Linear(r, module.out_features, bias=module.bias is not None)
        if initialize:
            u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
            with torch.no_grad():
                first.weight.copy_(s[:r, None] * vh[:r])
                second.weight.copy_(u[:, :r])
                if module.bias is not None:
                    second.bias.copy_(module.bias.detach())
        return nn.Sequential(first, second)

    def project(self, weight, ranks, options=None):
        (r,) = ranks
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r]).to(weight.dtype)

    def rank_matrices(self, weight):  # type: ignore[override]
        return [weight.detach()]

    def ranks_from_matrix_ranks(self, module, matrix_ranks):  # type: ignore[override]
        return tuple(int(r) for r in matrix_ranks)


class WithOptions(DocumentedWithoutOptions):
    def rank_matrices(self, weight, options=None):
        return [weight.detach()]

    def ranks_from_matrix_ranks(self, module, matrix_ranks, options=None):
        return tuple(int(r) for r in matrix_ranks)


def test_the_documented_signature_without_options_fails_the_kit_as_it_fails_the_selectors() -> None:
    # the kit draws its own sample Linear from torch's global generator: seed it, or the two
    # random 12x10 layers below may fall on either side of an energy rank (7 vs 8)
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    with pytest.raises(TypeError):  # what a study hit
        EnergyRankSelector().select(linear, DocumentedWithoutOptions())
    problems = failed(check_decomposer(DocumentedWithoutOptions()))
    assert set(problems) == {"rank_matrices"}, problems
    assert problems["rank_matrices"].startswith("linear: rank_matrices(weight, options) raised TypeError")
    assert "declare rank_matrices(self, weight, options=None)" in problems["rank_matrices"]

    results = check_decomposer(WithOptions())
    assert failed(results) == {}
    (rm,) = [r for r in results if r.check == "rank_matrices"]
    assert rm.reason == f"linear: 1 matrix; energy selects {EnergyRankSelector().select(linear, WithOptions())}"


def test_only_ranks_from_matrix_ranks_without_options_fails_too() -> None:
    class HalfFixed(WithOptions):
        def ranks_from_matrix_ranks(self, module, matrix_ranks):  # type: ignore[override]
            return tuple(matrix_ranks)

    reason = failed(check_decomposer(HalfFixed()))["rank_matrices"]
    assert "ranks_from_matrix_ranks(module, matrix_ranks, options) raised TypeError" in reason


def test_no_rank_matrices_is_a_named_skip_and_skipped_layers_say_why() -> None:
    class NoMatrices(WithOptions):
        rank_matrices = Decomposer.rank_matrices  # type: ignore[assignment]

    results = check_decomposer(NoMatrices())
    skipped = {r.check: r.reason for r in results if r.skipped}
    assert all(r.passed for r in results)
    assert "use the fixed selector" in skipped["rank_matrices"]
    convs = [la.name for la in sample_layers() if isinstance(la.module, nn.Conv2d)]
    for name in convs:
        assert skipped[f"sample_layer {name}"] == "supports() rejects it: Conv2d is not supported (supported: Linear)"
    assert str(next(r for r in results if r.skipped)).startswith("[skip] sample_layer conv3x3: ")


# -- cost() without an input size ---------------------------------------------------------------


def test_a_conv_cost_without_input_hw_must_raise_a_config_error() -> None:
    class GuessesSize(Tucker2Decomposer):
        def cost(self, module, ranks, input_hw=None, options=None):
            return super().cost(module, ranks, input_hw or (8, 8), options)

    assert "cost_without_input_hw" not in failed(check_decomposer(Tucker2Decomposer(), OLD_DEFAULTS))
    reason = failed(check_decomposer(GuessesSize(), OLD_DEFAULTS))["cost_without_input_hw"]
    assert "raise ConfigError naming input_hw" in reason


# -- declared refusals --------------------------------------------------------------------------


class RefusesDilation(Tucker2Decomposer):
    def unsupported_reason(self, module):
        if isinstance(module, nn.Conv2d) and module.dilation != (1, 1):
            return f"dilation {module.dilation} is not supported"
        return super().unsupported_reason(module)

    def contract_refusals(self):
        return {"dilated": nn.Conv2d(4, 6, 3, dilation=2), "linear": nn.Linear(4, 3)}


def test_declared_refusals_are_checked_with_their_reason() -> None:
    results = check_decomposer(RefusesDilation(), OLD_DEFAULTS)
    assert failed(results) == {}
    (row,) = [r for r in results if r.check == "declared_refusals"]
    assert row.reason == "refused ['dilated', 'linear'] with a reason" and not row.skipped

    (plain,) = [r for r in check_decomposer(Tucker2Decomposer(), OLD_DEFAULTS) if r.check == "declared_refusals"]
    assert plain.skipped and "none declared" in plain.reason


def test_a_declared_refusal_that_is_accepted_or_refused_without_reason_fails() -> None:
    class Forgets(RefusesDilation):
        def unsupported_reason(self, module):
            return Tucker2Decomposer.unsupported_reason(self, module)

    reason = failed(check_decomposer(Forgets(), OLD_DEFAULTS))["declared_refusals"]
    assert reason == "dilated: supports() accepts it"

    class Mute(RefusesDilation):
        def build(self, module, ranks, *, options=None, initialize=True):
            if not self.supports(module):
                raise rankopt.UnsupportedModuleError("no")
            return super().build(module, ranks, options=options, initialize=initialize)

        def max_ranks(self, module, options=None):
            if not self.supports(module):
                raise rankopt.UnsupportedModuleError("no")
            return super().max_ranks(module, options)

    reason = failed(check_decomposer(Mute(), OLD_DEFAULTS, refuses=[nn.Conv2d(4, 4, 3, dilation=(1, 3))]))["declared_refusals"]
    assert "dilated: max_ranks() raised UnsupportedModuleError without the reason 'dilation (2, 2) is not supported': no" in reason
    assert "conv2d_0: max_ranks() raised UnsupportedModuleError without the reason" in reason


def test_non_zero_padding_modes_are_refused_by_the_base_class() -> None:
    reflect = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    assert Tucker2Decomposer().unsupported_reason(reflect) == "padding_mode='reflect' is not supported (only 'zeros')"
    (row,) = [r for r in check_decomposer(Tucker2Decomposer(), OLD_DEFAULTS) if r.check == "refuses_unsupported"]
    assert "reflect_padded_conv" in row.reason


# -- selectors against several decomposers ------------------------------------------------------


class WithoutMatrices(Tucker2Decomposer):
    name = "tucker2_nomat"
    rank_matrices = Decomposer.rank_matrices  # type: ignore[assignment]


class UndeclaredSpectral(EnergyRankSelector):
    needs_rank_matrices = False  # claims every decomposer, but reads rank matrices


class SpectralThatAcceptsAnything(FixedRankSelector):
    needs_rank_matrices = True  # claims it refuses decomposers without rank matrices, but does not


def test_a_selector_is_checked_against_each_decomposer_it_claims() -> None:
    decs = [Tucker2Decomposer(), WithoutMatrices()]
    ok = check_rank_selector(EnergyRankSelector(), decs)
    assert failed(ok) == {}
    names = [r.check for r in ok]
    assert "ranks_within_bounds [tucker2]" in names and "refuses_without_rank_matrices [tucker2_nomat]" in names
    assert "ranks_within_bounds [tucker2_nomat]" not in names

    problems = failed(check_rank_selector(UndeclaredSpectral(), decs))
    assert set(problems) == {"ranks_within_bounds [tucker2_nomat]"}
    assert "does not expose rank matrices" in problems["ranks_within_bounds [tucker2_nomat]"]

    problems = failed(check_rank_selector(SpectralThatAcceptsAnything(), decs))
    assert set(problems) == {"refuses_without_rank_matrices [tucker2_nomat]"}
    assert "raise ConfigError, or set needs_rank_matrices = False" in problems["refuses_without_rank_matrices [tucker2_nomat]"]


def test_installed_selectors_are_checked_with_every_installed_decomposer() -> None:
    rankopt.reset_registry()
    rows = check_installed_plugins(("rank_selectors",), only="energy")
    assert {r["name"] for r in rows} == {"energy"} and all(r["passed"] for r in rows)
    (which,) = [r for r in rows if r["check"] == "decomposers"]
    decs = rankopt.plugin_names()["decomposers"]
    with_matrices = [d for d in decs if type(rankopt.decomposer(d)).rank_matrices is not Decomposer.rank_matrices]
    assert which["reason"].startswith(f"valid ranks expected with {with_matrices} (it needs rank_matrices)")
    checked = {r["check"].split(" [")[1].rstrip("]") for r in rows if " [" in r["check"]}
    assert checked == set(decs)


def test_a_third_party_selector_is_checked_with_its_own_distributions_decomposer(plugin_env) -> None:  # noqa: F811
    plugin_env.activate("good")
    rows = check_installed_plugins(("decomposers", "rank_selectors"), only="rankopt_fixture_good")
    assert {r["distribution"] for r in rows} == {"rankopt-fixture-good 0.3.1"}
    assert {r["name"] for r in rows} == {"fixture_lowrank", "fixture_half"}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    (which,) = [r for r in rows if r["check"] == "decomposers"]
    assert which["reason"].endswith("its own distribution's: ['fixture_lowrank']")
    assert any(r["check"] == "ranks_within_bounds [fixture_lowrank]" for r in rows)


# -- the command line -------------------------------------------------------------------------------


def test_plugins_check_one_name_shows_progress_and_ends_with_a_summary(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rankopt.reset_registry()
    capsys.readouterr()
    assert main(["plugins", "--check", "tucker2", "--format", "json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert {r["name"] for r in out["checks"]} == {"tucker2"}
    assert captured.err.strip() == "checking decomposer tucker2 (rankopt 0.1.0) ..."
    n, skipped = len(out["checks"]), sum(r["skipped"] for r in out["checks"])
    assert out["summary"] == f"{n} checks, 0 failed, {skipped} skipped" and skipped >= 2

    assert main(["plugins", "--check", "tucker2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[-1] == out["summary"]
    assert any("sample_layer linear" in ln and "skip" in ln and "Linear is not supported" in ln for ln in text)


def test_plugins_check_of_an_unknown_name_or_without_check_is_a_usage_error(capsys) -> None:
    assert main(["plugins", "--check", "tuker2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no installed plugin or distribution is named 'tuker2'" in err and "'tucker2'" in err
    assert "Traceback" not in err
    assert main(["plugins", "tucker2"]) == 2
    assert "NAME_OR_DIST ('tucker2') only applies with --check" in capsys.readouterr().err


def test_progress_line_for_each_plugin_and_every_row_counted() -> None:
    seen: list[tuple[str, str, str]] = []
    rows = check_installed_plugins(("decomposers",), only="svd", progress=lambda *a: seen.append(a))
    assert seen == [("decomposer", "svd", "rankopt 0.1.0")]
    assert rows and all(r["name"] == "svd" for r in rows)


def test_a_decomposer_that_fits_no_layer_of_the_tiny_model_is_a_named_skip_not_a_failure() -> None:
    class Conv1dOnly(Tucker2Decomposer):
        name = "conv1d_only"
        module_types = (nn.Conv1d,)

    results = check_rank_selector(FixedRankSelector(), [Tucker2Decomposer(), Conv1dOnly()])
    assert failed(results) == {}
    (skip,) = [r for r in results if r.skipped]
    assert skip.check == "ranks_within_bounds [conv1d_only]"
    assert skip.reason == "not checked with 'conv1d_only': decomposer 'conv1d_only' supports none of the model's layers"
    assert "setup" in failed(check_rank_selector(FixedRankSelector(), Conv1dOnly()))


def test_a_name_claimed_twice_tells_users_to_uninstall_and_authors_to_rename(plugin_env) -> None:  # noqa: F811
    plugin_env.activate("good", "duplicate")
    rows = check_installed_plugins(("decomposers",), only="rankopt-fixture-duplicate")
    (row,) = [r for r in rows if r["check"] == "unique_name"]
    assert not row["passed"]
    assert "rankopt-fixture-good 0.3.1" in row["reason"] and "rankopt-fixture-duplicate 0.5.0" in row["reason"]
    assert row["reason"].endswith("users: uninstall one of them; authors: rename your decomposer")
