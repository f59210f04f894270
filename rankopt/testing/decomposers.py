"""The contract checks of a :class:`~rankopt.Decomposer`."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from rankopt.compression.accounting import Cost, count_flops
from rankopt.core.errors import ConfigError, InvalidRanksError
from rankopt.contract.decomposer import Decomposer
from rankopt.testing._core import (
    CheckFailed,
    CheckResult,
    Checks,
    raise_on_failures,
    relative_error,
    require,
    require_identity,
    require_json,
    seeded,
)
from rankopt.testing._refusals import (
    check_refusals,
    provides_rank_matrices,
    rank_matrices_like_selectors,
    refuses_unsupported,
    supports,
    why_unsupported,
)
from rankopt.testing.samples import SampleLayer, sample_layers

__all__ = ["check_decomposer", "assert_decomposer", "DEFAULT_RTOL"]

DEFAULT_RTOL = 1e-6
"""Relative (Frobenius) tolerance of the numerical checks, which run in float64."""


def _mid_ranks(largest: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, (r + 1) // 2) for r in largest)


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _built(dec: Decomposer, layer: SampleLayer, ranks: Sequence[int], *, initialize: bool = True) -> nn.Module:
    # as rankopt.compress does: the built module takes the original's dtype
    new = dec.build(layer.module, tuple(ranks), initialize=initialize)
    require(isinstance(new, nn.Module), f"build() must return an nn.Module, got {type(new).__name__}")
    return new.to(dtype=torch.float64).eval()


def _compare(new: nn.Module, reference: nn.Module, x: torch.Tensor, ranks: Sequence[int]) -> float:
    """Relative error of ``new``'s output against ``reference``'s; a shape mismatch fails
    with both shapes (not torch's size error)."""
    ref = _forward(reference, x)
    try:
        out = _forward(new, x)
    except Exception as exc:
        raise CheckFailed(
            f"at ranks {tuple(ranks)}, the built module's forward on an input of shape "
            f"{tuple(x.shape)} raised {type(exc).__name__}: {exc}"
        ) from None
    require(
        out.shape == ref.shape,
        f"at ranks {tuple(ranks)}, output shape {tuple(out.shape)} differs from the original "
        f"layer's {tuple(ref.shape)} (check stride, padding and dilation, per axis, in build())",
    )
    return relative_error(out, ref)


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.weight.copy_(weight)  # type: ignore[operator]
    return other


def _per_layer(
    layers: Sequence[SampleLayer], body: Callable[[SampleLayer], str | None]
) -> Callable[[], str]:
    """Run ``body`` on every layer; fail naming each layer that failed."""

    def run() -> str:
        problems, notes = [], []
        for layer in layers:
            try:
                note = body(layer)
            except CheckFailed as exc:
                problems.append(f"{layer.name}: {exc}")
                continue
            except Exception as exc:
                problems.append(f"{layer.name}: raised {type(exc).__name__}: {exc}")
                continue
            if note:
                notes.append(f"{layer.name}: {note}")
        if problems:
            raise CheckFailed("; ".join(problems))
        return "; ".join(notes) or f"{len(layers)} layer(s)"

    return run


def check_decomposer(
    decomposer: Decomposer,
    modules: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
    *,
    input_hw: tuple[int, int] = (8, 8),
    rtol: float | None = None,
    seed: int = 0,
    refuses: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
) -> list[CheckResult]:
    """Run ``decomposer`` through the decomposer contract.

    Args:
        decomposer: an instance (e.g. ``MyDecomposer()`` or ``rankopt.decomposer("tucker2")``).
        modules: the layers to try (default: :func:`~rankopt.testing.sample_layers`,
            small Conv2d layers with 1x1, square and non-square kernels, stride 2 and
            (2, 1), dilation (2, 1), large padding, with and without bias, odd channel
            counts, and a Linear layer). Those ``supports()`` rejects are skipped, each
            reported as a skipped ``sample_layer <name>`` result with the reason.
        input_hw: input size for the given Conv2d ``modules``.
        rtol: relative tolerance of the numerical checks, default the decomposer's
            ``contract_rtol`` attribute if it has one, else :data:`DEFAULT_RTOL`. An
            iterative decomposition (e.g. CP by ALS) may declare a looser one. The
            projection checks use ``projection_rtol`` if the decomposer declares it.
            A decomposer whose ``project`` is not idempotent by nature (ALS finds a
            local optimum) declares ``projection_idempotent = False``; re-projecting
            then only has to move a projected weight no more than projecting moved
            the original, or than its ``projection_rtol``.
        seed: seeds weights and inputs (the caller's RNG state is restored).
        refuses: layers the decomposer must refuse, in addition to those its
            ``contract_refusals()`` declares.

    Checks, each on every supported layer: ``max_ranks`` are positive integers that
    ``check_ranks`` accepts and out-of-range, wrong-length and non-integer ranks raise
    :class:`~rankopt.InvalidRanksError`; the module built at the largest ranks computes
    the original layer (float64) and ``project`` at the largest ranks returns the weight;
    ``cost()`` equals the built module's parameter count and the FLOPs that
    ``torch.utils.flop_counter`` counts, at the largest, the smallest and middle ranks;
    ``build(initialize=False)`` has the same state_dict keys, shapes and dtypes and
    computes the same function once that state_dict is loaded; ``project`` keeps shape
    and dtype, leaves its input untouched and is idempotent; the module built from a
    projected weight computes that projection; ``default_options`` are JSON; the
    ``rank_matrices`` (when provided) are 2-D, called as the spectral selectors call
    them (``rank_matrices(weight, options)``, ``ranks_from_matrix_ranks(module,
    matrix_ranks, options)``) and drive the ``energy`` selector to valid ranks;
    ``cost()`` of a conv without ``input_hw`` raises ConfigError; modules that
    ``supports()`` rejects, and the declared refusals, raise
    :class:`~rankopt.UnsupportedModuleError` with the reason.
    """
    tol = float(rtol if rtol is not None else getattr(decomposer, "contract_rtol", DEFAULT_RTOL))
    checks = Checks(f"decomposer {getattr(decomposer, 'name', decomposer)!r}")

    def name_ok() -> str:
        require_identity(decomposer, Decomposer)
        require(bool(decomposer.module_types), "module_types must name at least one module type")
        return f"name {decomposer.name!r}, supports {[t.__name__ for t in decomposer.module_types]}"

    checks.run("identity", name_ok)

    all_layers = sample_layers(modules, input_hw=input_hw, seed=seed)
    layers = [la for la in all_layers if supports(decomposer, la.module)]
    for la in all_layers:
        if la not in layers:
            checks.skip(f"sample_layer {la.name}", why_unsupported(decomposer, la.module))
    if not layers:
        checks.fail(
            "sample_layers",
            f"supports() rejects every sample layer ({[la.name for la in all_layers]}); "
            "pass modules= with layers this decomposer handles",
        )
        checks.run("refuses_unsupported", refuses_unsupported(decomposer))
        check_refusals(checks, decomposer, refuses)
        return checks.results

    def largest(layer: SampleLayer) -> tuple[int, ...]:
        return tuple(decomposer.max_ranks(layer.module))

    # iterative decompositions (CP-ALS) are slow: compute each projection once
    memo: dict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, bool]] = {}

    def projected(layer: SampleLayer, ranks: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        """project(W, ranks) in float64, and whether it modified W in place."""
        key = (layer.name, ranks)
        if key not in memo:
            original = layer.module.weight.detach()  # type: ignore[union-attr]
            w = original.clone()  # a projection that writes into its input must not spoil the layer
            p = decomposer.project(w, ranks)
            memo[key] = (p, not torch.equal(w, original))
        return memo[key]

    exact = bool(getattr(decomposer, "projection_idempotent", True))
    proj_tol = float(getattr(decomposer, "projection_rtol", tol))

    def mid_projection(layer: SampleLayer) -> tuple[tuple[int, ...], torch.Tensor, float]:
        """Middle ranks, project(W) at them, and how far a declared-inexact projection
        may move: as far as projecting moved W (relative to project(W)), or projection_rtol."""
        ranks = _mid_ranks(largest(layer))
        w = layer.module.weight.detach()  # type: ignore[union-attr]
        once = projected(layer, ranks)[0]
        inexact_bound = max(relative_error(once, w) * float(w.norm() / once.norm().clamp_min(1e-300)), proj_tol)
        return ranks, once, inexact_bound

    def max_ranks_ok(layer: SampleLayer) -> str:
        top = largest(layer)
        require(len(top) > 0, "max_ranks() returned an empty tuple")
        require(
            all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in top),
            f"max_ranks() must be positive ints, got {top!r}",
        )
        if decomposer.rank_names:
            require(
                len(top) == len(decomposer.rank_names),
                f"max_ranks() has {len(top)} entries but rank_names is {decomposer.rank_names}",
            )
        require(tuple(decomposer.check_ranks(layer.module, top)) == top, "check_ranks(max_ranks) changed the ranks")
        require(tuple(decomposer.check_ranks(layer.module, (1,) * len(top))) == (1,) * len(top), "check_ranks(ones) failed")
        return f"max {top}"

    def rejects_invalid(layer: SampleLayer) -> None:
        top = largest(layer)
        bad: list[object] = [
            (0,) + top[1:],
            (top[0] + 1,) + top[1:],
            top + (1,),
            (1.5,) + top[1:],
            (True,) + top[1:],
        ]
        if len(top) > 1:
            bad.append(top[:-1])
        for ranks in bad:
            try:
                decomposer.check_ranks(layer.module, ranks)  # type: ignore[arg-type]
            except InvalidRanksError:
                continue
            raise CheckFailed(f"check_ranks accepted invalid ranks {ranks!r} (largest {top})")

    def full_rank(layer: SampleLayer) -> str:
        top = largest(layer)
        with seeded(seed):
            x = layer.example()
        err = _compare(_built(decomposer, layer, top), layer.module, x, top)
        require(err <= tol, f"output at the largest ranks {top} differs from the layer's by {err:.2e} > rtol {tol:.0e}")
        return f"rel. error {err:.1e}"

    def project_full_rank(layer: SampleLayer) -> str:
        top = largest(layer)
        w = layer.module.weight.detach()  # type: ignore[union-attr]
        err = relative_error(projected(layer, top)[0], w)
        require(err <= tol, f"project(weight, largest ranks {top}) differs from the weight by {err:.2e} > rtol {tol:.0e}")
        return f"rel. error {err:.1e}"

    def cost_ok(layer: SampleLayer) -> str:
        top = largest(layer)
        seen = []
        for ranks in dict.fromkeys([top, _mid_ranks(top), (1,) * len(top)]):
            claimed = decomposer.cost(layer.module, ranks, input_hw=layer.input_hw)
            require(isinstance(claimed, Cost), f"cost() must return rankopt.Cost, got {type(claimed).__name__}")
            built = _built(decomposer, layer, ranks, initialize=False)
            params = sum(p.numel() for p in built.parameters())
            with seeded(seed):
                example = layer.example(batch=1)
            flops = count_flops(built, example)
            actual = Cost(params, flops)
            require(claimed == actual, f"at ranks {ranks} cost() says {claimed} but the built module has {actual} (flop_counter)")
            seen.append(f"{ranks}: {actual.params} params, {actual.flops} FLOPs")
        return ", ".join(seen)

    def uninitialized_ok(layer: SampleLayer) -> None:
        ranks = _mid_ranks(largest(layer))
        full = _built(decomposer, layer, ranks)
        empty = _built(decomposer, layer, ranks, initialize=False)
        a, b = full.state_dict(), empty.state_dict()
        require(list(a) == list(b), f"state_dict keys differ: {list(a)} vs {list(b)} (initialize=False)")
        for k in a:
            require(
                a[k].shape == b[k].shape and a[k].dtype == b[k].dtype,
                f"{k}: {tuple(a[k].shape)}/{a[k].dtype} vs {tuple(b[k].shape)}/{b[k].dtype} with initialize=False",
            )
        empty.load_state_dict(a, strict=True)
        with seeded(seed):
            x = layer.example()
        err = relative_error(_forward(empty, x), _forward(full, x))
        require(err <= 1e-12, f"after loading the state_dict, outputs differ by {err:.2e}")

    def project_shape(layer: SampleLayer) -> None:
        ranks = _mid_ranks(largest(layer))
        w64 = layer.module.weight.detach()  # type: ignore[union-attr]
        p64, modified = projected(layer, ranks)
        require(not modified, "project() modified its input in place")
        before = w64.float()
        w32 = before.clone()
        p32 = decomposer.project(w32, ranks)
        require(torch.equal(w32, before), "project() modified its input in place")
        for w, p in ((w64, p64), (w32, p32)):
            require(isinstance(p, torch.Tensor), f"project() must return a tensor, got {type(p).__name__}")
            require(p.shape == w.shape, f"project() changed the shape {tuple(w.shape)} -> {tuple(p.shape)}")
            require(p.dtype == w.dtype, f"project() changed the dtype {w.dtype} -> {p.dtype}")
            require(p.device == w.device, f"project() moved the weight from {w.device} to {p.device}")
            require(bool(torch.isfinite(p).all()), "project() returned non-finite values")

    def idempotent(layer: SampleLayer) -> str:
        ranks, once, bound = mid_projection(layer)
        twice = decomposer.project(once.clone(), ranks)
        err = relative_error(twice, once)
        if exact:
            require(err <= proj_tol, f"at ranks {ranks}, project(project(W)) differs from project(W) by {err:.2e} > rtol {proj_tol:.0e}")
            return f"rel. change {err:.1e}"
        # declared inexact (e.g. ALS): re-projecting must move no more than projecting did
        # (or than the declared projection_rtol)
        require(
            err <= bound,
            f"at ranks {ranks}, re-projecting changes project(W) by {err:.2e}, more than "
            f"projecting changed W or projection_rtol ({bound:.2e}), although projection_idempotent = False",
        )
        return f"rel. change {err:.1e} <= {bound:.1e} (declared not idempotent)"

    def build_matches_projection(layer: SampleLayer) -> str:
        ranks, once, inexact_bound = mid_projection(layer)
        target = _with_weight(layer.module, once)
        target_layer = SampleLayer(layer.name, target, layer.input_hw)
        with seeded(seed):
            x = layer.example()
        err = _compare(_built(decomposer, target_layer, ranks), target, x, ranks)
        bound = proj_tol if exact else inexact_bound
        require(
            err <= bound,
            f"at ranks {ranks}, the module built from project(W) computes something else than "
            f"the conv with project(W) (rel. error {err:.2e} > {bound:.0e})",
        )
        return f"rel. error {err:.1e}"

    def options_ok(layer: SampleLayer) -> None:
        opts = decomposer.default_options(layer.module)
        require(isinstance(opts, dict), f"default_options() must return a dict, got {type(opts).__name__}")
        require_json(opts, "default_options()")
        require(json.loads(json.dumps(opts)) == opts, "default_options() does not survive a JSON round trip")
        with_opts = tuple(decomposer.max_ranks(layer.module, opts or None))
        require(with_opts == largest(layer), f"max_ranks with the default options {opts} is {with_opts}, without {largest(layer)}")

    def rank_matrices_ok(layer: SampleLayer) -> str | None:
        return rank_matrices_like_selectors(decomposer, layer, largest(layer))

    def cost_without_hw(layer: SampleLayer) -> str | None:
        if not isinstance(layer.module, nn.Conv2d):
            return None  # a Linear layer's cost never needs it (cost_matches_built passes None)
        try:
            got = decomposer.cost(layer.module, (1,) * len(largest(layer)), None)
        except ConfigError as exc:
            require("input_hw" in str(exc), f"the ConfigError does not name input_hw: {exc}")
            return None
        raise CheckFailed(
            f"cost(conv, ranks, input_hw=None) returned {got!r}; a conv's FLOPs depend on its "
            "input size, so raise ConfigError naming input_hw (rankopt passes a nominal size "
            "when the real one is unknown)"
        )

    with seeded(seed):  # building modules draws random initial weights
        _run_all(checks, layers, [
            ("max_ranks", max_ranks_ok),
            ("check_ranks_rejects_invalid", rejects_invalid),
            ("full_rank_equivalence", full_rank),
            ("project_full_rank", project_full_rank),
            ("cost_matches_built", cost_ok),
            ("build_uninitialized", uninitialized_ok),
            ("project_shape_dtype", project_shape),
            ("project_idempotent", idempotent),
            ("build_matches_projection", build_matches_projection),
            ("default_options", options_ok),
            ("cost_without_input_hw", cost_without_hw),
        ])
        if provides_rank_matrices(decomposer):
            checks.run("rank_matrices", _per_layer(layers, rank_matrices_ok))
        else:
            checks.skip(
                "rank_matrices",
                "not provided: the spectral rank selectors (energy, vbmf, approx_ratio, budget) "
                "refuse this decomposer with a ConfigError; use the fixed selector with it",
            )
        checks.run("refuses_unsupported", refuses_unsupported(decomposer))
        check_refusals(checks, decomposer, refuses)
    return checks.results


def _run_all(checks: Checks, layers: Sequence[SampleLayer], bodies: Sequence[tuple[str, Callable[[SampleLayer], str | None]]]) -> None:
    for name, body in bodies:
        checks.run(name, _per_layer(layers, body))


def assert_decomposer(decomposer: Decomposer, modules: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None, **kwargs: object) -> None:
    """:func:`check_decomposer`, raising one AssertionError that lists every failed check."""
    raise_on_failures(
        f"decomposer {getattr(decomposer, 'name', decomposer)!r}",
        check_decomposer(decomposer, modules, **kwargs),  # type: ignore[arg-type]
    )
