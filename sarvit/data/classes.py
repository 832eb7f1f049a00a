"""The class lists that a run puts side by side: names compared, counts checked.

A class index means a class only through the list of names it came from. Two splits,
or a checkpoint and a dataset, whose lists differ would score one class as another
without a word (train ``[a, b, c]`` and val ``[a, b, z]``: every ``z`` counts as ``c``),
so ``check_same_classes`` refuses them and names the classes that differ. A dataset
without names (targets only) cannot be compared and is let through.

``class_count_warnings`` flags what trains without an error but measures little: a
training set of one class (top-1 is trivially 100), or classes that the training set
has no image of (the model never learns them; their val images are always wrong).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["class_differences", "check_same_classes", "recorded_names", "class_counts", "class_count_warnings"]

SHOWN = 8  # names listed in a message before "..."


def _listing(names: Sequence[str]) -> str:
    """``"2 ('a', 'b')"``, the names cut after ``SHOWN``."""
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return f"{len(names)} ({shown}{', ...' if len(names) > SHOWN else ''})"


def class_differences(
    expected: Sequence[str], found: Sequence[str], first: str = "the first", second: str = "the second"
) -> str | None:
    """What differs between two lists of class names, or None.

    None when they are equal, or when either is empty (a dataset without names).
    Otherwise a phrase naming the classes only in ``expected`` (called ``first``), only
    in ``found`` (``second``), or, for the same names in another order, the first index
    that means two classes.
    """
    expected, found = list(expected), list(found)
    if not expected or not found or expected == found:
        return None
    in_expected, in_found = set(expected), set(found)
    only_expected = [c for c in expected if c not in in_found]
    only_found = [c for c in found if c not in in_expected]
    parts = []
    if only_expected:
        parts.append(f"only in {first}: {_listing(only_expected)}")
    if only_found:
        parts.append(f"only in {second}: {_listing(only_found)}")
    if parts:
        return "; ".join(parts)
    if len(expected) != len(found):  # the same names, one of them listed twice
        return f"the same names, but {len(expected)} entries in {first} and {len(found)} in {second}"
    i = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
    return f"the same names in another order: class {i} is {expected[i]!r} in {first}, {found[i]!r} in {second}"


def check_same_classes(expected: Sequence[str], found: Sequence[str], first: str, second: str, remedy: str) -> None:
    """Raise ``ConfigError`` when the two lists of names differ (see ``class_differences``).

    Args:
        expected, found: class names, in index order; an empty list is not compared.
        first, second: what each list belongs to, e.g. ``"train/"``, ``"the checkpoint"``.
        remedy: the sentence that tells the user what to do.
    """
    diff = class_differences(expected, found, first, second)
    if diff is not None:
        raise ConfigError(
            f"{first} and {second} name their classes differently ({diff}), so class indices would be scored "
            f"as the wrong classes. {remedy}"
        )


def recorded_names(classes: Sequence[str] | None) -> list[str]:
    """The class names a checkpoint records, or ``[]`` where it holds only the indices.

    A dataset without names is saved with the names ``"0", "1", ...``; those say nothing
    that the number of classes does not, so they are not compared.
    """
    classes = list(classes or [])
    return [] if classes == [str(i) for i in range(len(classes))] else classes


def class_counts(targets: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """``(num_classes,)`` images per class; ``ConfigError`` for a target outside ``[0, num_classes)``."""
    targets = np.asarray(targets, dtype=np.int64)
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise ConfigError(
            f"{what} has {bad.size} images labelled {sorted(set(bad.tolist()))[:SHOWN]}, outside the "
            f"{num_classes} classes 0..{num_classes - 1} that the model is made for; the training data and this "
            "data must have the same classes"
        )
    return np.bincount(targets, minlength=num_classes)


def class_count_warnings(train_counts: np.ndarray, val_counts: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Warnings about a training set that trains but measures little (empty when all is well).

    Args:
        train_counts, val_counts: ``(C,)`` images per class of each split.
        classes: the ``C`` class names.
    """
    out = []
    present = np.flatnonzero(train_counts)
    if len(present) == 1:
        if len(classes) == 1:
            why = "the model has one output, so val top-1 is 100 and the CE 0 whatever it learns"
        else:
            why = "the model learns to answer that class, so val top-1 only counts the val images of that class"
        out.append(f"the training set has one class only ({classes[present[0]]!r}): {why}. "
                   "Add the other classes' images unless this is on purpose")
    missing = np.flatnonzero(train_counts == 0)
    if missing.size:
        scored = int(val_counts[missing].sum())
        text = (f"the training set has no image of {_listing([classes[i] for i in missing])} of its "
                f"{len(classes)} classes: the model never learns them")
        if scored:
            text += f", and the {scored} val images of these classes are always scored wrong"
        out.append(text)
    return out
