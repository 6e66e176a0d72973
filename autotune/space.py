"""Search spaces as integer variables with small domains and named constraints.

A kernel declares its tunable parameters once (:class:`Space`); :meth:`Space.legal` lists
every assignment that satisfies all constraints (python-constraint2), :meth:`Space.brute_force`
the same by filtering the product of the domains, and :meth:`Space.explain` says how many
assignments each constraint removes.
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Constraint:
    """``test(*values of variables)`` must hold; ``name`` says why, for --explain."""

    name: str
    variables: tuple[str, ...]
    test: Callable[..., bool]

    def holds(self, point: dict[str, int]) -> bool:
        return bool(self.test(*(point[v] for v in self.variables)))


@dataclass(frozen=True)
class Space:
    variables: dict[str, Sequence[int]]
    constraints: tuple[Constraint, ...]

    def points(self):
        names = list(self.variables)
        for values in itertools.product(*(self.variables[n] for n in names)):
            yield dict(zip(names, values))

    def legal(self) -> list[dict[str, int]]:
        """Every legal configuration, solved by python-constraint2 (2-3x faster than filtering the
        product on the kernels' spaces here, both well under a millisecond), in a stable order."""
        import constraint

        problem = constraint.Problem()
        for name, domain in self.variables.items():
            problem.addVariable(name, list(domain))
        for c in self.constraints:  # (the solver takes a test's truth value: no wrapper per call)
            problem.addConstraint(c.test, list(c.variables))
        return sorted(problem.getSolutions(), key=operator.itemgetter(*self.variables))

    def brute_force(self) -> list[dict[str, int]]:
        """The legal configurations by filtering the whole product of the domains (the check)."""
        return [p for p in self.points() if all(c.holds(p) for c in self.constraints)]

    def explain(self) -> list[tuple[str, int]]:
        """(constraint, how many points it removes on its own) for each constraint."""
        points = list(self.points())
        return [(c.name, sum(not c.holds(p) for p in points)) for c in self.constraints]


def powers_of_two(low: int, high: int) -> list[int]:
    return [1 << i for i in range(low.bit_length() - 1, high.bit_length()) if low <= 1 << i <= high]


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
