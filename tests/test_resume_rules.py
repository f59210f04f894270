"""The rules of resume (issue 26, item 7) on a bare Optuna study: which lost trials are
enqueued again, the dead streak that counts towards max_failures, and the training seed
that follows a trial's parameters and rung rather than its number."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from rankopt.search.repeats import training_seed
from rankopt.search.resume import dead_streak, requeue_lost_trials
from rankopt.search.rundir import INTERRUPTED_REASON
from rankopt.search.storage import STALE_REASON
from rankopt.search.watchdog import TIMEOUT_REASON

DIST = {"energy.p": FloatDistribution(0.5, 1.0)}


def add(study: optuna.Study, p: float, state: TrialState, reason: str | None = None, **attrs: object) -> None:
    user_attrs = {**attrs, **({"reason": reason} if reason else {})}
    study.add_trial(create_trial(
        state=state, params={"energy.p": p}, distributions=DIST, user_attrs=user_attrs,
        values=[0.9, 10.0] if state == TrialState.COMPLETE else None))


def test_lost_search_trials_are_enqueued_again_once_with_their_own_parameters() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0.60, TrialState.COMPLETE)
    add(study, 0.61, TrialState.FAIL, INTERRUPTED_REASON)  # Ctrl-C / SIGTERM
    add(study, 0.62, TrialState.FAIL, STALE_REASON)  # SIGKILL / crash
    add(study, 0.63, TrialState.FAIL, f"{TIMEOUT_REASON}: ran longer than trial_timeout")
    add(study, 0.64, TrialState.FAIL, "PluginError: a bug")  # its own failure: not retried
    add(study, 0.65, TrialState.FAIL, INTERRUPTED_REASON, continued_from=0, fidelity=1)

    assert requeue_lost_trials(study) == [1, 2]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.user_attrs["retry_of"], t.system_attrs["fixed_params"]) for t in waiting] == [
        (1, {"energy.p": 0.61}), (2, {"energy.p": 0.62})]
    assert requeue_lost_trials(study) == []  # a second rerun does not enqueue them twice


def test_no_more_are_enqueued_than_the_trial_count_has_room_for() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0.60, TrialState.COMPLETE)
    add(study, 0.61, TrialState.FAIL, INTERRUPTED_REASON)
    add(study, 0.62, TrialState.FAIL, STALE_REASON)
    add(study, 0.63, TrialState.COMPLETE, continued_from=0, fidelity=1)  # not a search trial
    study.enqueue_trial({"energy.p": 0.7})  # a proposal still waiting
    assert requeue_lost_trials(study, wanted=2) == []  # 1 complete + 1 waiting: full
    assert requeue_lost_trials(study, wanted=3) == [1]  # the earliest first
    assert requeue_lost_trials(study, wanted=9) == [2]


def test_a_trial_that_died_in_its_own_retry_is_not_tried_a_third_time() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0.61, TrialState.FAIL, STALE_REASON)
    add(study, 0.61, TrialState.FAIL, STALE_REASON, retry_of=0)
    assert requeue_lost_trials(study) == []
    # an interrupted retry (the user's Ctrl-C, not the parameters) is tried again
    add(study, 0.62, TrialState.FAIL, STALE_REASON)
    add(study, 0.62, TrialState.FAIL, INTERRUPTED_REASON, retry_of=2)
    assert requeue_lost_trials(study) == [3]


def test_the_dead_streak_counts_deaths_since_the_last_completed_trial() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0.60, TrialState.FAIL, STALE_REASON)
    add(study, 0.61, TrialState.COMPLETE)
    assert dead_streak(study) == 0
    add(study, 0.62, TrialState.FAIL, STALE_REASON)
    add(study, 0.63, TrialState.FAIL, "ValueError: bad")  # not a death
    add(study, 0.64, TrialState.FAIL, INTERRUPTED_REASON)  # nor an interruption
    add(study, 0.65, TrialState.FAIL, STALE_REASON)
    assert dead_streak(study) == 2


def test_the_training_seed_follows_what_is_trained_and_the_rung_not_the_number() -> None:
    params = {"strategy": "finetune", "energy.p": 0.05, "finetune.lr": 0.01}
    seed = training_seed(0, params)
    assert 0 <= seed < 2**32
    # the same parameters (up to a sampler's last-digit noise, in any order) give the same seed
    assert training_seed(0, {"finetune.lr": 0.01, "energy.p": 0.05000000000000001, "strategy": "finetune"}) == seed
    others = {training_seed(1, params), training_seed(0, params, fidelity=1),
              training_seed(0, {**params, "energy.p": 0.06}), training_seed(0, '{"strategy": "finetune"}')}
    assert seed not in others and len(others) == 4
