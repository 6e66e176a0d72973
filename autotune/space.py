"""Search spaces as integer variables with small domains and named constraints.

A kernel declares its tunable parameters once (:class:`Space`); :meth:`Space.legal` lists
every assignment that satisfies all constraints (python-constraint2), :meth:`Space.brute_force`
the same by filtering the product of the domains, and :meth:`Space.explain` says how many
assignments each constraint removes.
"""
from __future__ import annotations

import functools
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

    def components(self) -> list[tuple[list[str], list[Constraint]]]:
        """The variables split into groups that no constraint joins, each group's names and its
        constraints in declaration order, the groups in the order of their first variables: the
        legal set is the product of the groups' legal sets."""
        group = {name: name for name in self.variables}

        def root(name: str) -> str:
            while group[name] != name:
                name = group[name]
            return name

        for c in self.constraints:
            for other in c.variables[1:]:
                group[root(other)] = root(c.variables[0])
        names: dict[str, list[str]] = {}
        for name in self.variables:
            names.setdefault(root(name), []).append(name)
        return [(members, [c for c in self.constraints if root(c.variables[0]) == key])
                for key, members in names.items()]

    def legal(self) -> list[dict[str, int]]:
        """Every legal configuration, its keys in declaration order, sorted by their values in that
        order: each group of variables that constraints join solved by python-constraint2 (2-3x
        faster than filtering its product), the groups' solutions combined (linear attention's
        chunk tiles and state tiles are two: its 39120 configurations at B8 T1024 in about 20 ms
        instead of 85 solved whole, most of it making the dicts)."""
        import constraint

        parts, names = [], []
        for members, constraints in self.components():
            problem = constraint.Problem()
            for name in members:
                problem.addVariable(name, list(self.variables[name]))
            for c in constraints:  # (the solver takes a test's truth value: no wrapper per call)
                problem.addConstraint(c.test, list(c.variables))
            values = sorted(tuple(solution[name] for name in members) for solution in problem.getSolutions())
            rows = [dict(zip(members, row)) for row in values]
            if len(rows) == 1 and parts:  # (a variable with one legal value joins the part before: one
                parts[-1] = [config | rows[0] for config in parts[-1]]  # merge less a configuration)
            else:
                parts.append(rows)
            names += members
        combined = [functools.reduce(operator.or_, combination) for combination in itertools.product(*parts)]
        if names == list(self.variables):  # groups of consecutive variables: the product is in order
            return combined
        return sorted(({name: config[name] for name in self.variables} for config in combined),
                      key=operator.itemgetter(*self.variables))

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
