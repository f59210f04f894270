"""The refining sampler: after the proposals, moves the front's own models.

A study's first trials are the one-shot proposals (:mod:`rankopt.search.seeding`): good
points, but each a rule applied to every layer alike. Optuna's TPE learns little in a
space with one fraction per layer from a few dozen trials, so most of what it samples
there lands behind the proposals. :class:`RefiningSampler` wraps the study's sampler
and spends a share of the trials the sampler proposes (``refinement.share``; the
enqueued points are never touched) on moves from the current front, in the ``fixed``
selector's per-layer space, on the rank ladders of :mod:`rankopt.search.refine_plan`:

- ``cut_params``: the front member with the fewest params among those within
  ``refinement.near`` of the best accuracy, cut by ``refinement.cut`` of its params,
  one ladder step at a time where the least energy is lost per param saved (trading
  params between layers by sensitivity: the discarded share of each layer's output
  energy on real inputs when the study calibrates);
- ``cut_flops``: the same for FLOPs, from the member with the fewest FLOPs near the
  best accuracy: the FLOPs end of the front, which the params-oriented proposals leave;
- ``swap``: a member near the best accuracy keeps its params and moves a step from the
  layer that loses least per param saved to the layer that gains most per param spent;
- ``local``: a random front member with one to three layers moved one or two steps (an
  evolutionary mutation).

A move whose ranks some trial already has (run, running or waiting) is perturbed again,
up to :data:`TRIES` times, and otherwise left to the wrapped sampler: the refinement
adds no repeats. Each trial it proposes gets the user attr ``proposed_by``
(``"refinement:<move>:<parent trial>"``); the wrapped sampler's own trials get its name.

Why a sampler of our own: Optuna's samplers mutate parameters independently (NSGA-II)
or model them jointly (TPE), but none moves along per-layer rank ladders under a
params/FLOPs trade-off, and ``enqueue_trial`` cannot react to the front as it grows.
The wrapper keeps Optuna's sampler contract, so the local and the Ray backend use it alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from rankopt.contract.selector import ceil_fraction
from rankopt.search.refine_plan import RefinePlan

__all__ = ["RefiningSampler", "refine_sampler", "MOVES", "TRIES", "PROPOSED_BY", "refinement_state", "with_refinement"]

MOVES = ("cut_params", "cut_flops", "swap", "local")
TRIES = 20
PROPOSED_BY = "proposed_by"

State = dict[str, tuple[str, int]]  # layer -> (decomposer, ladder index)


class RefiningSampler(BaseSampler):
    """``base`` with a share of its trials replaced by moves from the front (see the
    module docstring). ``share``: the share of the sampler's own trials refined, in
    (0, 1]; ``near``: the accuracy window (absolute) below the best accuracy in which
    members count as "near the line"; ``cut``: the share of params or FLOPs a cut
    move removes."""

    def __init__(self, base: BaseSampler, plan: RefinePlan, *, share: float = 0.5, near: float = 0.02,
                 cut: float = 0.1, seed: int | None = None) -> None:
        self.base = base
        self.plan = plan
        self.share, self.near, self.cut, self.seed = share, near, cut, seed
        self._points: dict[int, dict[str, Any]] = {}
        # the wrapped sampler's relative point, drawn in before_trial to screen it for repeats
        self._relative: dict[int, tuple[dict[str, BaseDistribution], dict[str, Any]]] = {}
        from rankopt.search.sampler import SAMPLER_CONFIG_ATTR

        if hasattr(base, SAMPLER_CONFIG_ATTR):
            setattr(self, SAMPLER_CONFIG_ATTR, getattr(base, SAMPLER_CONFIG_ATTR))

    # -- Optuna's sampler contract: a refined trial takes its point, others go to base ------
    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        point = self._points.get(trial.number)
        if point is not None:
            return {k: d for k, d in self.plan.distributions.items() if k in point}
        if trial.number in self._relative:
            return self._relative[trial.number][0]
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        point = self._points.get(trial.number)
        if point is not None:
            return {k: point[k] for k in search_space if k in point}
        if trial.number in self._relative:
            return self._relative.pop(trial.number)[1]
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        point = self._points.get(trial.number)
        if point is not None and param_name in point:
            return point[param_name]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs or trial.params or "continued_from" in trial.user_attrs:
            return  # enqueued (a proposal or the user's point) or a continuation: runs as given
        found = self._propose(study, trial)
        if found is None:
            found = self._screen_base(study, trial)
        if found is None:
            label = type(self.base).__name__
        else:
            self._points[trial.number], label = found
        study._storage.set_trial_user_attr(trial._trial_id, PROPOSED_BY, label)
        trial.user_attrs[PROPOSED_BY] = label  # the Trial's cached copy (it was read before)

    def _screen_base(self, study: optuna.Study, trial: FrozenTrial) -> tuple[dict[str, Any], str] | None:
        """The wrapped sampler's joint (relative) point, drawn here rather than when the
        trial asks; when it names per-layer ranks some trial already has, a ``local`` move
        from the front replaces it (no repeats). Its point is then handed to the trial."""
        space = self.base.infer_relative_search_space(study, trial)
        relative = self.base.sample_relative(study, trial, space)
        self._relative[trial.number] = (space, relative)
        if relative.get("selector", "fixed") != "fixed" or not all(
                k in relative for k in self.plan.fraction_keys.values()):
            return None
        params = {k: v for k, v in relative.items() if k in space}
        probe = optuna.trial.create_trial(params=params, distributions={k: space[k] for k in params},
                                          values=[0.0] * len(study.directions))
        trials = study.get_trials(deepcopy=False)
        seen = {k for k in (self._trained(t) for t in trials) if k is not None}
        if self._trained(probe) not in seen:
            return None
        del self._relative[trial.number]
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
                and t.user_attrs.get("continued_from") is None and "ranks" in t.user_attrs]
        front = _front(done, study.directions)
        rng = random.Random(None if self.seed is None else self.seed * 1_000_003 + trial.number)
        for _ in range(TRIES if front else 0):
            made = self._move("local", front, rng)
            if made is not None and self._key(made[1]) not in seen:
                return self._point(made[0], made[1]), f"refinement:local:{made[0].number}"
        return None

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._points.pop(trial.number, None)
        self._relative.pop(trial.number, None)
        self.base.after_trial(study, trial, state, values)

    # -- pickling (Ray Tune copies the searcher; Optuna 5's samplers hold a lock) ----------
    def __getstate__(self) -> dict[str, Any]:
        from rankopt.search.sampler import SAMPLER_CONFIG_ATTR

        state = {k: v for k, v in self.__dict__.items() if k != "base"}
        state["_base_config"] = getattr(self.base, SAMPLER_CONFIG_ATTR, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from rankopt.search.sampler import make_sampler

        config = state.pop("_base_config")
        self.__dict__.update(state)
        self.base = make_sampler(config) if config is not None else optuna.samplers.TPESampler()

    # -- the moves ---------------------------------------------------------------------------
    def _refines(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Whether the sampler's i-th own trial is refined: ``ceil((i+1) s) > ceil(i s)``
        spreads a share ``s`` evenly, the first own trial refined."""
        own = sum(1 for t in study.get_trials(deepcopy=False)
                  if t.number < trial.number and "fixed_params" not in t.system_attrs
                  and t.user_attrs.get("continued_from") is None)
        return math.ceil((own + 1) * self.share) > math.ceil(own * self.share)

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> tuple[dict[str, Any], str] | None:
        if not self._refines(study, trial):
            return None
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
                and t.user_attrs.get("continued_from") is None and "ranks" in t.user_attrs]
        front = _front(done, study.directions)
        if not front:
            return None
        seen = {k for k in (self._trained(t) for t in trials) if k is not None}
        rng = random.Random(None if self.seed is None else self.seed * 1_000_003 + trial.number)
        refined = sum(1 for t in trials if str(t.user_attrs.get(PROPOSED_BY, "")).startswith("refinement"))
        move = MOVES[refined % len(MOVES)]
        for attempt in range(TRIES):
            made = self._move(move if attempt == 0 else "local", front, rng)
            if made is None:
                continue
            parent, state = made
            if self._key(state) not in seen:
                return self._point(parent, state), f"refinement:{move}:{parent.number}"
        return None

    def _move(self, move: str, front: list[FrozenTrial], rng: random.Random) -> tuple[FrozenTrial, State] | None:
        acc = self._accuracy_index()
        near = front
        if acc is not None:
            best = max(t.values[acc] for t in front)
            near = [t for t in front if t.values[acc] >= best - self.near]
        if move in ("cut_params", "cut_flops"):
            measure = "params" if move == "cut_params" else "flops"
            parent = min(near, key=lambda t: float(t.user_attrs.get(measure, math.inf)))
            state = self._state_of(parent)
            return None if state is None else (parent, self._cut(state, measure))
        if move == "swap":
            parent = rng.choice(near)
            state = self._state_of(parent)
            return None if state is None else (parent, self._swap(state, rng))
        parent = rng.choice(front)
        state = self._state_of(parent)
        if state is None:
            return None
        layers = list(state)
        for layer in rng.sample(layers, k=min(len(layers), rng.randint(1, 3))):
            dec, i = state[layer]
            top = len(self.plan.ladders[layer][dec]) - 1
            state[layer] = (dec, min(top, max(0, i + rng.choice((-2, -1, 1, 2)))))
        return parent, state

    def _cost(self, state: State, measure: str) -> float:
        return float(sum(getattr(self.plan.ladders[layer][dec][i], measure) for layer, (dec, i) in state.items()))

    def _cut(self, state: State, measure: str) -> State:
        """Down one step at a time where the energy lost per unit of ``measure`` saved is
        least, until ``cut`` of the start's cost is gone (or nothing is left to cut)."""
        state = dict(state)
        goal = self._cost(state, measure) * (1.0 - self.cut)
        while self._cost(state, measure) > goal:
            best: tuple[float, str] | None = None
            for layer, (dec, i) in state.items():
                if i == 0:
                    continue
                hi, lo = self.plan.ladders[layer][dec][i], self.plan.ladders[layer][dec][i - 1]
                saved = getattr(hi, measure) - getattr(lo, measure)
                if saved > 0:
                    rate = (lo.loss - hi.loss) / saved
                    if best is None or rate < best[0]:
                        best = (rate, layer)
            if best is None:
                break
            dec, i = state[best[1]]
            state[best[1]] = (dec, i - 1)
        return state

    def _swap(self, state: State, rng: random.Random) -> State:
        """One step down where least energy is lost per param saved and one up where most
        is gained per param spent (a random pair when that gains nothing)."""
        ladders = self.plan.ladders
        downs = [((ladders[l][d][i - 1].loss - ladders[l][d][i].loss)
                  / max(1, ladders[l][d][i].params - ladders[l][d][i - 1].params), l)
                 for l, (d, i) in state.items() if i > 0]
        ups = [((ladders[l][d][i].loss - ladders[l][d][i + 1].loss)
                / max(1, ladders[l][d][i + 1].params - ladders[l][d][i].params), l)
               for l, (d, i) in state.items() if i + 1 < len(ladders[l][d])]
        state = dict(state)
        if downs and ups:
            down, up = min(downs), max(ups)
            if down[1] != up[1] and up[0] > down[0]:
                pair = (down[1], up[1])
            else:
                pair = tuple(rng.sample(list(state), 2)) if len(state) > 1 else (down[1], down[1])
            for layer, step in zip(pair, (-1, 1)):
                dec, i = state[layer]
                state[layer] = (dec, min(len(ladders[layer][dec]) - 1, max(0, i + step)))
        return state

    # -- trials as ladder states ------------------------------------------------------------
    def _accuracy_index(self) -> int | None:
        objectives = list(self.plan.objectives)
        return objectives.index("accuracy") if "accuracy" in objectives else None

    def _state_of(self, trial: FrozenTrial) -> State | None:
        """A trial's ranks as ladder indices (nearest step by params where the ranks are
        not on the ladder: another selector's), or None when it has neither ranks nor a
        per-layer point."""
        ranks: Mapping[str, Any] | None = trial.user_attrs.get("ranks")
        decs: Mapping[str, str] = trial.user_attrs.get("decomposers") or {}
        params = trial.system_attrs.get("fixed_params") or trial.params
        if ranks is None:
            if params.get("selector", "fixed") != "fixed" or not all(k in params for k in self.plan.fraction_keys.values()):
                return None
        state: State = {}
        for layer, by_dec in self.plan.ladders.items():
            key = self.plan.decomposer_keys.get(layer)
            dec = decs.get(layer) or (params.get(key) if key else None) or next(iter(by_dec))
            if dec not in by_dec:
                dec = next(iter(by_dec))
            ladder = by_dec[dec]
            if ranks is not None:
                got = ranks.get(layer)
                target = None if got is None else tuple(int(r) for r in got)
                index = next((i for i, s in enumerate(ladder) if s.ranks == target), None)
                if index is None:  # off the ladder (another selector's ranks): the nearest step
                    index = len(ladder) - 1 if target is None else _nearest(ladder, target)
            else:
                f = float(params[self.plan.fraction_keys[layer]])
                index = max([i for i, s in enumerate(ladder) if s.fraction <= f + 1e-12] or [0])
            state[layer] = (dec, index)
        return state

    def _trained(self, trial: FrozenTrial) -> tuple[Any, ...] | None:
        """What ``trial`` trains (or will), as :meth:`_key` writes a ladder state: from its
        ranks when it ran, else from its per-layer fractions as the ``fixed`` selector and
        the study's alignment realize them (None: neither)."""
        ranks: Mapping[str, Any] | None = trial.user_attrs.get("ranks")
        decs: Mapping[str, str] = trial.user_attrs.get("decomposers") or {}
        params = trial.system_attrs.get("fixed_params") or trial.params
        if ranks is None and (params.get("selector", "fixed") != "fixed"
                              or not all(k in params for k in self.plan.fraction_keys.values())):
            return None
        out = []
        for layer, by_dec in sorted(self.plan.ladders.items()):
            key = self.plan.decomposer_keys.get(layer)
            dec = decs.get(layer) or (params.get(key) if key else None) or next(iter(by_dec))
            if ranks is not None:
                got = ranks.get(layer)
                out.append((layer, None, None) if got is None else (layer, dec, tuple(int(r) for r in got)))
                continue
            if dec not in by_dec:
                dec = next(iter(by_dec))
            f = float(params[self.plan.fraction_keys[layer]])
            largest = self.plan.largest[layer][dec]
            made = self.plan.alignment.apply([max(1, ceil_fraction(f, hi)) for hi in largest], largest)
            out.append((layer, dec, made) if made in self.plan.saving[layer][dec] else (layer, None, None))
        return tuple(out)

    def _key(self, state: State) -> tuple[Any, ...]:
        out = []
        for layer, (dec, i) in sorted(state.items()):
            ranks = self.plan.ladders[layer][dec][i].ranks
            out.append((layer, None if ranks is None else dec, ranks))
        return tuple(out)

    def _point(self, parent: FrozenTrial, state: State) -> dict[str, Any]:
        dists = self.plan.distributions
        point: dict[str, Any] = {k: v for k, v in parent.params.items()
                                 if k in dists and dists[k]._contains(dists[k].to_internal_repr(v))}
        point.update(self.plan.head)
        for layer, (dec, i) in state.items():
            key = self.plan.fraction_keys[layer]
            dist: Any = dists[key]
            point[key] = min(float(dist.high), max(float(dist.low), self.plan.ladders[layer][dec][i].fraction))
            if layer in self.plan.decomposer_keys:
                point[self.plan.decomposer_keys[layer]] = dec
        return point


def _nearest(ladder: Sequence[Any], ranks: tuple[int, ...]) -> int:
    """The factorized ladder step whose ranks' sum is closest to that of ``ranks``."""
    total = sum(ranks)
    return min(range(len(ladder) - 1) or [0],
               key=lambda i: abs(sum(ladder[i].ranks or ()) - total))


def _front(trials: list[FrozenTrial], directions: Sequence[Any]) -> list[FrozenTrial]:
    """The non-dominated trials (first fidelity only: ``Study.best_trials`` would mix in
    the continued models, trained longer)."""
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in directions]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        va = [s * v for s, v in zip(signs, a.values)]
        vb = [s * v for s, v in zip(signs, b.values)]
        return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]


def refinement_state(sampler: BaseSampler) -> tuple[RefinePlan, dict[str, Any]] | None:
    """What :func:`with_refinement` needs to wrap a rebuilt sampler again (or None)."""
    if isinstance(sampler, RefiningSampler):
        return sampler.plan, {"share": sampler.share, "near": sampler.near, "cut": sampler.cut,
                              "seed": sampler.seed}
    return None


def with_refinement(sampler: BaseSampler, state: tuple[RefinePlan, dict[str, Any]] | None) -> BaseSampler:
    """``sampler`` wrapped as ``state`` says (unchanged when ``state`` is None)."""
    if state is None:
        return sampler
    plan, settings = state
    return RefiningSampler(sampler, plan, **settings)


def refine_sampler(study: optuna.Study, env: Any) -> None:
    """Wrap ``study``'s sampler in a :class:`RefiningSampler` as the study's ``refinement``
    says (a no-op when it is off or the study has no per-layer ``fixed`` space)."""
    from rankopt.config.schema import resolve_rank_multiple
    from rankopt.contract.selector import RankAlignment
    from rankopt.search.refine_plan import build_refine_plan
    from rankopt.search.sampler import sampler_config

    config = env.config
    settings = config.refinement
    if settings is None or isinstance(study.sampler, RefiningSampler):
        return
    multiple = resolve_rank_multiple(config)
    plan = build_refine_plan(
        env.space, env.reference, env.targets, cache=env.cache,
        alignment=multiple if isinstance(multiple, RankAlignment) else RankAlignment(int(multiple)),
        min_saving=config.targets.min_saving, min_in_channels=config.targets.dense_input_channels + 1,
        objectives=config.objectives)
    if plan is None:
        return
    seed = sampler_config(study.sampler, config).sampler.seed
    study.sampler = RefiningSampler(study.sampler, plan, share=settings.share, near=settings.near,
                                    cut=settings.cut, seed=seed)
