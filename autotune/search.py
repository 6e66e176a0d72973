"""Measured search over a kernel's legal configurations, seeded by the cost model.

The analytic model (kernels.Tunable.cost) orders tile shapes and occupancy, but it cannot see
everything that decides a kernel's time: the warp count and pipeline depth of the latency-bound
state loops, say, tie in the model and are left to measurement. Measuring the whole legal space
(hundreds of configurations for the linear family, each a fresh compile) costs minutes per
shape, so the search measures the model's best few (the seeds) and then walks from the
fastest configuration found so far along one variable at a time: for each variable, the
nearest legal value below and above with the others held (a coordinate descent over the legal
set), stepping on in the same direction while that helps. It moves when a neighbour is faster
by more than ``tolerance`` (timing noise must not steer it). When a walk stops, the next walk
starts from the next seed, then from the best-ranked configuration two or more variables away
from everything measured (constraints that couple variables, like a register budget over two
tile sizes, wall off corners that one-variable moves cannot reach). It never measures more
than ``max_measured`` configurations; the winner is the fastest configuration measured.

On synthetic landscapes (tests/test_autotune.py: a smooth bowl per variable with pairwise
couplings over the model's ranking, 40 draws) it ends within 3% of the best of the H100
delta-rule space (35208 legal, ten variables) in 25 draws measuring 70, where measuring the
model's first 70 does in none; rnn (486 legal, 48 measured): 38 against 10. Each variable the
model cannot rank costs hits there: with nine variables (17604 legal) 31 draws at 63.

``measure(config)`` returns seconds, or None when the configuration failed (it then counts as
measured and is never chosen). Configurations are plain dicts; they are compared by their
sorted items.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def config_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def measurement_cap(legal: int, variables: int, fraction: float = 0.1, floor: int = 4, ceiling: int = 48,
                    per_variable: int = 7) -> int:
    """How many configurations the search may measure in a space of ``legal`` configurations of
    ``variables`` variables: ``fraction`` of it, but at least ``floor`` (or all of a smaller space:
    a dozen is cheap to measure) and at most ``ceiling``, or ``per_variable`` a variable where that
    is more (variables the model cannot rank multiply a space, not the measuring it needs; a walk's
    round tries each variable's two neighbours, so the measuring grows with the variables: with a
    ninth, the delta rule's backward state tile, 48 measured ended within 3% of the best in 26 of
    the 40 synthetic draws where eight variables had 31, and 63 in 31; with a tenth, the backward
    walk's pipeline depth, 70 in 25, and even 100 only in 28)."""
    return min(max(math.ceil(fraction * legal), min(legal, floor)), max(ceiling, per_variable * variables))


def movable_variables(legal: Sequence[dict]) -> int:
    """How many variables take more than one value among the ``legal`` configurations (those a walk
    can move; measurement_cap's ``variables``)."""
    return sum(len({config[name] for config in legal}) > 1 for name in (legal[0] if legal else ()))


class Neighbourhood:
    """For each variable, the legal values it can take with every other variable held: the
    one-variable moves of the search (built once per space, O(legal * variables)). A line is
    keyed by the variable's position and the other variables' values in the space's variable
    order (tuple slices: the H100 delta-rule space's 35208 configurations of eleven variables in
    0.7 s, where sorting each configuration's other items took 2.1 s, once a bucket's search)."""

    def __init__(self, legal: Sequence[dict]):
        self.variables = list(legal[0]) if legal else []
        self._position = {name: i for i, name in enumerate(self.variables)}
        self._lines: dict[tuple[int, tuple], list[int]] = {}
        for config in legal:
            values = self._values(config)
            for i, value in enumerate(values):
                self._lines.setdefault((i, values[:i] + values[i + 1:]), []).append(value)
        for line in self._lines.values():
            line.sort()

    def _values(self, config: dict) -> tuple:
        """``config``'s values in the space's variable order (None where it lacks one: on no line)."""
        return tuple(config.get(name) for name in self.variables)

    def moves(self, config: dict, name: str, excluded: frozenset | set = frozenset()) -> list[dict]:
        """The legal configurations that differ from ``config`` only in ``name``, at the nearest
        legal value below and the nearest above (none past the ends of the line), stepping over
        configurations whose config_key is in ``excluded`` (those that failed)."""
        i, values = self._position[name], self._values(config)
        line = [v for v in self._lines.get((i, values[:i] + values[i + 1:]), [])
                if config_key(dict(config, **{name: v})) not in excluded]
        value = config[name]
        below = [v for v in line if v < value]
        above = [v for v in line if v > value]
        return [dict(config, **{name: v}) for v in (below[-1:] + above[:1])]


@dataclass
class SearchResult:
    best: dict | None
    seconds: float | None
    timings: dict[tuple, float | None] = field(default_factory=dict)  # config_key -> seconds (None: failed)

    @property
    def measured(self) -> int:
        return len(self.timings)


class _Walks:
    """The state of one coordinate_search: what was measured, the fastest so far, the budget."""

    def __init__(self, ranked, measure, max_measured, tolerance, should_stop, prepare, neighbourhood):
        self.neighbourhood = neighbourhood or Neighbourhood(ranked)
        self.measure, self.max_measured, self.tolerance, self.should_stop = measure, max_measured, tolerance, should_stop
        self.prepare = prepare
        self.result = SearchResult(None, None)
        self.walked: set[tuple] = set()  # configurations a walk has stood on

    def timed(self, config: dict) -> float | None:
        """Seconds of ``config``, measured once (None: it failed)."""
        timings, key = self.result.timings, config_key(config)
        if key not in timings:
            timings[key] = seconds = self.measure(config)
            if seconds is not None and (self.result.seconds is None or seconds < self.result.seconds):
                self.result.best, self.result.seconds = config, seconds
        return timings[key]

    def affordable(self, config: dict) -> bool:
        """Measured already, or the budget allows one more measurement."""
        return config_key(config) in self.result.timings or not (
            self.result.measured >= self.max_measured or self.should_stop())

    def prepare_unmeasured(self, configs: list[dict]) -> None:
        """Hand ``prepare`` the configurations the walk may measure next (no more than the budget
        has left), so that they compile side by side."""
        left = self.max_measured - self.result.measured
        fresh = [c for c in configs if config_key(c) not in self.result.timings]
        if fresh[:left]:
            self.prepare(fresh[:left])

    def far_from_measured(self, config: dict) -> bool:
        """Two or more variables away from everything measured: one move from a measured
        configuration is what the walks have already tried or passed over."""
        return all(sum(config[n] != v for n, v in key) >= 2 for key in self.result.timings)

    def step_along(self, name: str, current: dict, seconds: float) -> tuple[dict, float] | None:
        """Walk along ``name`` from ``current`` while it helps, past failing configurations; the
        configuration reached, or None when the budget ran out."""
        direction = 0  # once a step helps, keep stepping the same way
        while True:
            failed = {key for key, s in self.result.timings.items() if s is None}
            candidates = self.neighbourhood.moves(current, name, failed)
            if direction:
                candidates = [c for c in candidates if (c[name] - current[name]) * direction > 0]
            for candidate in candidates:
                if not self.affordable(candidate):
                    return None
                new = config_key(candidate) not in self.result.timings
                candidate_seconds = self.timed(candidate)
                if candidate_seconds is not None and candidate_seconds < seconds * (1.0 - self.tolerance):
                    direction = 1 if candidate[name] > current[name] else -1
                    current, seconds = candidate, candidate_seconds
                    break
                if candidate_seconds is None and new:
                    break  # failed: look again, past it
            else:
                return current, seconds

    def walk(self, start: dict) -> bool:
        """Descend from ``start`` until a round over every variable moves nowhere; False when the
        budget ran out."""
        if not self.affordable(start):
            return False
        current, seconds = start, self.timed(start)
        while seconds is not None:
            self.walked.add(config_key(current))
            before = current
            self.prepare_unmeasured([c for name in self.neighbourhood.variables
                                     for c in self.neighbourhood.moves(current, name)])
            for name in self.neighbourhood.variables:
                reached = self.step_along(name, current, seconds)
                if reached is None:
                    return False
                current, seconds = reached
            if current == before:
                break
        return True


def coordinate_search(ranked: Sequence[dict], seeds: Sequence[dict], measure: Callable[[dict], float | None],
                      max_measured: int, tolerance: float = 0.02,
                      should_stop: Callable[[], bool] = lambda: False,
                      prepare: Callable[[list[dict]], None] = lambda configs: None,
                      neighbourhood: Neighbourhood | None = None) -> SearchResult:
    """Measure ``seeds`` (legal configurations), then walk from the fastest along one variable at
    a time (see the module docstring); when a walk stops, start another from the next seed, then
    from the next configuration of ``ranked`` (every legal configuration, best estimate first)
    two or more variables away from everything measured. Stops at ``max_measured``
    configurations or when ``should_stop()`` (a time budget) says so. ``prepare(configs)`` is
    called with the seeds and, before each round of a walk, with its unmeasured one-variable
    moves (a tuner compiles them in parallel there). ``neighbourhood``: ranked's Neighbourhood,
    where a caller searches one space several times (built here otherwise: about a second for
    the H100 delta rule's 35208 configurations)."""
    walks = _Walks(ranked, measure, max_measured, tolerance, should_stop, prepare, neighbourhood)
    walks.prepare_unmeasured(list(seeds))
    for seed in seeds:
        if not walks.affordable(seed):
            return walks.result
        walks.timed(seed)
    seeded = sorted((s for s in seeds if walks.result.timings[config_key(s)] is not None),
                    key=lambda s: walks.result.timings[config_key(s)])
    restarts = (c for c in ranked if walks.far_from_measured(c))
    for start in itertools.chain(seeded, restarts):
        if config_key(start) not in walks.walked and not walks.walk(start):
            break
    return walks.result
