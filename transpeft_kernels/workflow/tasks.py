"""A task with exact-match accuracy: generated arithmetic word problems in the style of GSM8K.

Each problem is one or two steps over small whole numbers (addition, subtraction, multiplication, exact
division). The prompt ends with ``Answer:`` and the completion is the number (`` 12``), so exact match
is unambiguous and short to decode. Problems are drawn from ``random.Random(seed)``, de-duplicated, and
split into train and test once, so the split is a pure function of the seed and the sizes.
"""
from __future__ import annotations

import random

from .data import Dataset, from_pairs

_NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Ivan", "Nora", "Kai",
          "Emma", "Leo", "Aisha", "Tom", "Yuki", "Ben", "Chloe", "Sam")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "stamps", "cards",
          "eggs", "balloons", "coins", "flowers", "toy cars", "oranges", "candles")
_CONTAINERS = ("bags", "boxes", "baskets", "packs", "jars", "rows")


def _problem(rng: random.Random) -> tuple[str, int]:
    """One (question, answer) pair; the answer is a non-negative integer."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?", a + b
    if kind == 1:
        b = rng.randint(2, 20)
        a = rng.randint(b + 1, 40)
        return f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        box = rng.choice(_CONTAINERS)
        return f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. How many {item} does {name} buy?", a * b
    if kind == 3:
        each, n = rng.randint(2, 9), rng.randint(2, 6)
        return (f"{name} shares {each * n} {item} equally among {n} friends. How many {item} does each friend get?",
                each)
    if kind == 4:
        a, b = rng.randint(5, 25), rng.randint(2, 15)
        c = rng.randint(1, a + b - 1)
        return (f"{name} has {a} {item}. {friend} gives {name} {b} more, and then {name} loses {c} of them. "
                f"How many {item} does {name} have now?", a + b - c)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return f"{name} has {a} {item} and {friend} has {b} {item}. How many {item} do they have together?", a + b


def prompt_for(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def arithmetic_split(n_train: int, n_test: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Disjoint (train, test) datasets of distinct problems, fixed by ``seed``."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    attempts = 0
    while len(seen) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test) + 1000:
            raise ValueError(f"cannot draw {n_train + n_test} distinct problems; ask for fewer")
        question, answer = _problem(rng)
        seen.setdefault(question, answer)
    pairs = [(prompt_for(q), f" {a}") for q, a in seen.items()]
    rng.shuffle(pairs)
    return (from_pairs(pairs[:n_train], f"arithmetic(seed={seed}) train"),
            from_pairs(pairs[n_train:], f"arithmetic(seed={seed}) test"))
