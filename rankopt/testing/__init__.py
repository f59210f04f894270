"""Contract checks for rankopt plugins, to run from a plugin author's own test suite.

Built-in and third-party plugins are held to the same contract::

    from rankopt.testing import assert_decomposer, assert_rank_selector, assert_strategy

    def test_my_decomposer_honours_the_contract():
        assert_decomposer(MyDecomposer())

    def test_my_selector_honours_the_contract():
        assert_rank_selector(MySelector())          # with the registered tucker2

    def test_my_strategy_honours_the_contract():
        assert_strategy(MyStrategy())               # runs one tiny trial on CPU

Each ``check_*`` function returns a list of :class:`CheckResult` (``check``,
``passed``, ``reason``) instead of raising, for tools (``rankopt plugins --check``
prints them as a table via :func:`check_installed_plugins`). The checks use small
layers and a tiny model, so a plugin's check costs what its methods cost there: a
fraction of a second for SVD-based decomposers, selectors and strategies, seconds for
an iterative method such as CP-ALS (``benchmarks/bench_contract_kit.py``). They restore
the caller's torch RNG state and do not touch the plugin registry.
"""

from __future__ import annotations

from rankopt.testing._core import CheckResult
from rankopt.testing.decomposers import DEFAULT_RTOL, assert_decomposer, check_decomposer
from rankopt.testing.installed import CHECKED_FAMILIES, check_installed_plugins
from rankopt.testing.samples import (
    SampleLayer,
    sample_layers,
    tiny_model,
    tiny_splits,
    unsupported_probes,
)
from rankopt.testing.selectors import assert_rank_selector, check_rank_selector
from rankopt.testing.strategies import assert_strategy, check_strategy, tiny_trial_context

__all__ = [
    "CheckResult",
    "check_decomposer",
    "assert_decomposer",
    "check_rank_selector",
    "assert_rank_selector",
    "check_strategy",
    "assert_strategy",
    "check_installed_plugins",
    "CHECKED_FAMILIES",
    "DEFAULT_RTOL",
    "SampleLayer",
    "sample_layers",
    "unsupported_probes",
    "tiny_model",
    "tiny_splits",
    "tiny_trial_context",
]
