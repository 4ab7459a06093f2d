"""A seeded all-pairs (pairwise) covering generator, greedy AETG-style.

Given factors (name -> levels) it returns combinations (name -> level) such that every pair of
levels of every two factors appears in at least one of them, far fewer than the full product
(19 factors with up to 6 levels: a few dozen rows instead of billions).

Constraints are a predicate over *partial* combinations: it is called with some factors assigned
and must return False only when those already break a rule (so it returns True while a rule's
factors are not all assigned yet). A pair the predicate rejects on its own is never required.

The same factors, predicate and seed always give the same list (no set is iterated unsorted, so
Python's per-process string hashing cannot change the order).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

Space = dict[str, list[Any]]
Combo = dict[str, Any]
Valid = Callable[[Combo], bool]
Pair = tuple[int, int, int, int]  # (factor i, level index, factor j, level index), i < j
CANDIDATES = 24  # candidate rows tried per row kept (AETG's M)


def always(_: Combo) -> bool:
    """No constraints."""
    return True


def required_pairs(space: Space, valid: Valid = always) -> list[Pair]:
    """Every pair of levels of two different factors that the constraints allow on its own."""
    names = list(space)
    out: list[Pair] = []
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            for x, lx in enumerate(space[a]):
                out += [(i, x, j, y) for y, ly in enumerate(space[b]) if valid({a: lx, b: ly})]
    return out


def pairs_in(row: list[int]) -> Iterator[Pair]:
    """The pairs a full row (one level index per factor) covers."""
    for i in range(len(row)):
        for j in range(i + 1, len(row)):
            yield (i, row[i], j, row[j])


def _gain(uncovered: set[Pair], row: dict[int, int], f: int, level: int) -> int:
    """How many uncovered pairs (f, level) makes with the factors already assigned in row."""
    return sum(((g, row[g], f, level) if g < f else (f, level, g, row[g])) in uncovered for g in row)


def _as_combo(names: list[str], space: Space, row: dict[int, int]) -> Combo:
    return {names[f]: space[names[f]][x] for f, x in sorted(row.items())}


def _candidate(space: Space, names: list[str], uncovered: set[Pair], seed_pair: Pair,
               rng: random.Random, valid: Valid) -> list[int] | None:
    """One row: start from seed_pair, then give each other factor (in random order) the allowed
    level that covers the most uncovered pairs (ties: random). None when the constraints leave a
    factor no level."""
    i, x, j, y = seed_pair
    row = {i: x, j: y}
    rest = [f for f in range(len(names)) if f not in row]
    rng.shuffle(rest)
    for f in rest:
        levels = list(range(len(space[names[f]])))
        rng.shuffle(levels)
        best, best_gain = None, -1
        for lv in levels:
            if not valid(_as_combo(names, space, {**row, f: lv})):
                continue
            g = _gain(uncovered, row, f, lv)
            if g > best_gain:
                best, best_gain = lv, g
        if best is None:
            return None
        row[f] = best
    return [row[f] for f in range(len(names))]


def pairwise(space: Space, seed: int = 0, valid: Valid = always, candidates: int = CANDIDATES) -> list[Combo]:
    """Combinations covering every allowed pair of levels at least once, deterministic for a seed.

    Each round tries `candidates` rows, each grown from a random uncovered pair, and keeps the one
    that covers the most uncovered pairs. Raises ValueError naming the pairs that no valid full
    combination could be built around (constraints that contradict each other).
    """
    names = list(space)
    rng = random.Random(seed)
    uncovered = set(required_pairs(space, valid))
    rows: list[Combo] = []
    while uncovered:
        pool = sorted(uncovered)
        best, best_gain = None, 0
        for _ in range(candidates):
            row = _candidate(space, names, uncovered, rng.choice(pool), rng, valid)
            if row is None or not valid(_as_combo(names, space, dict(enumerate(row)))):
                continue
            gain = sum(p in uncovered for p in pairs_in(row))
            if gain > best_gain:
                best, best_gain = row, gain
        if best is None:
            stuck = [(names[i], space[names[i]][x], names[j], space[names[j]][y]) for i, x, j, y in pool[:5]]
            raise ValueError(f"no valid combination covers these pairs (constraints contradict?): {stuck}")
        uncovered.difference_update(pairs_in(best))
        rows.append(_as_combo(names, space, dict(enumerate(best))))
    return rows


def covered_pairs(space: Space, combos: list[Combo]) -> set[Pair]:
    """The pairs (as index tuples) that a list of full combinations covers."""
    names = list(space)
    out: set[Pair] = set()
    for c in combos:
        out.update(pairs_in([space[n].index(c[n]) for n in names]))
    return out


def random_valid(space: Space, seed: int, n: int, valid: Valid = always, exclude: list[Combo] | None = None,
                 tries: int = 10_000) -> list[Combo]:
    """n more distinct random valid combinations (none equal to one in `exclude`), deterministic."""
    rng = random.Random(seed)
    seen = [dict(c) for c in exclude or []]
    out: list[Combo] = []
    for _ in range(tries):
        if len(out) == n:
            break
        c = _random_row(space, rng, valid)
        if c is not None and valid(c) and c not in seen:
            seen.append(c)
            out.append(c)
    return out


def _random_row(space: Space, rng: random.Random, valid: Valid) -> Combo | None:
    """Factors in a random order, each a random level among those the constraints still allow (so
    tightly constrained spaces still give valid rows); None at a dead end."""
    names = list(space)
    rng.shuffle(names)
    row: Combo = {}
    for name in names:
        allowed = [lv for lv in space[name] if valid({**row, name: lv})]
        if not allowed:
            return None
        row[name] = allowed[rng.randrange(len(allowed))]
    return {name: row[name] for name in space}
