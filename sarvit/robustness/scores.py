"""Corruption error and mCE (Hendrycks & Dietterich, ICLR 2019), and the references they need.

With ``E[c][s]`` the top-1 error (%) of a model under corruption ``c`` at severity ``s``
and ``E_ref`` a reference model's:

    CE_c  = 100 * sum_s E[c][s] / sum_s E_ref[c][s]                     (corruption error)
    mCE   = mean over the 15 common corruptions of CE_c
    rCE_c = 100 * sum_s (E[c][s] - E_clean) / sum_s (E_ref[c][s] - E_ref_clean)
    relative mCE = mean over the common corruptions of rCE_c

Without a reference the summary is the unnormalised mean error, mean_c mean_s E[c][s],
labelled as such. Errors are percentages throughout.

A reference is a run folder holding ``corruptions.json`` (or ``imagenet_c.json``), such a
JSON file, a JSON file of errors (``{corruption: {severity: error}}``, ``{corruption:
[e1, ..., e5]}``, or ``{corruption: mean over severities 1-5}``, with an optional
``clean_error``), or ``alexnet``: ImageNet-C's AlexNet errors, averaged over severities
1-5, with which the paper normalises.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError

__all__ = [
    "ALEXNET_ERRORS", "Reference", "load_reference", "corruption_errors", "relative_corruption_errors",
    "summarise", "format_table",
]

# ImageNet-C, AlexNet top-1 error averaged over severities 1-5 (hendrycks/robustness), in %
ALEXNET_ERRORS = {
    "gaussian_noise": 88.6428, "shot_noise": 89.4468, "impulse_noise": 92.2640, "defocus_blur": 81.9880,
    "glass_blur": 82.6268, "motion_blur": 78.5948, "zoom_blur": 79.8360, "snow": 86.6816, "frost": 82.6572,
    "fog": 81.9324, "brightness": 56.4592, "contrast": 85.3204, "elastic_transform": 64.6056,
    "pixelate": 71.7840, "jpeg_compression": 60.6500,
}

Errors = Mapping[str, Mapping[int, float]]  # corruption -> severity -> top-1 error (%)


class Reference:
    """A reference model's errors: per severity, or (``means``) averaged over severities 1-5."""

    def __init__(self, source: str, errors: Errors | None = None, means: Mapping[str, float] | None = None,
                 clean_error: float | None = None, data: str | None = None) -> None:
        self.source = source
        self.data = data  # the dataset the reference was evaluated on, when its file says
        self.errors = {c: {int(s): float(e) for s, e in row.items()} for c, row in (errors or {}).items()}
        self.means = {c: float(e) for c, e in (means or {}).items()}
        self.clean_error = None if clean_error is None else float(clean_error)

    def corruptions(self) -> set[str]:
        return set(self.errors) | set(self.means)

    def total(self, corruption: str, severities: Sequence[int]) -> float:
        """``sum_s E_ref[corruption][s]`` over ``severities``."""
        if corruption in self.errors:
            row = self.errors[corruption]
            missing = [s for s in severities if s not in row]
            if missing:
                raise ConfigError(f"the reference ({self.source}) has no {corruption} error at severities {missing}")
            return float(sum(row[s] for s in severities))
        if sorted(severities) != [1, 2, 3, 4, 5]:
            raise ConfigError(
                f"the reference ({self.source}) gives {corruption} averaged over severities 1-5 only; "
                "evaluate all five (--severities 1,2,3,4,5)"
            )
        return 5.0 * self.means[corruption]

    def check_data(self, data: str) -> None:
        """Raise ``ConfigError`` when the reference was evaluated on other data than ``data``:
        its errors would normalise errors on other images."""
        if self.data is not None and _data_key(self.data) != _data_key(data):
            raise ConfigError(
                f"the reference ({self.source}) was evaluated on {self.data}, this evaluation is on {data}: "
                "corruption errors are normalised on the same images only. Evaluate the reference model on "
                f"{data} first (sarvit eval --checkpoint REFERENCE_RUN --corruptions --data {data})"
            )

    def check(self, corruptions: Sequence[str], severities: Sequence[int]) -> None:
        """Raise ``ConfigError`` unless the reference normalises every common corruption evaluated."""
        from .corruptions import corruption_names

        common = set(corruption_names("common"))
        missing = [c for c in corruptions if c in common and c not in self.corruptions()]
        if missing:
            raise ConfigError(
                f"the reference ({self.source}) has no errors for {', '.join(missing)}; evaluate the corruptions it "
                f"has (--corruptions {','.join(sorted(self.corruptions()))}) or give another reference"
            )
        for c in corruptions:
            if c in self.corruptions():
                if self.total(c, severities) <= 0:
                    raise ConfigError(f"the reference ({self.source}) has zero error on {c}: its CE is undefined")


def _data_key(data: str) -> str:
    """A dataset name as it is, a folder as its absolute path."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else str(data)


def _rows(table: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    """``(per-severity errors, means)`` from a JSON table of errors."""
    errors, means = {}, {}
    for c, row in table.items():
        if isinstance(row, Mapping):
            errors[c] = {int(s): float(e) for s, e in row.items()}
        elif isinstance(row, (list, tuple)):
            if len(row) != 5:
                raise ConfigError(f"{source}: {c} lists {len(row)} errors; a list must hold severities 1-5")
            errors[c] = {s: float(e) for s, e in zip(range(1, 6), row)}
        elif isinstance(row, (int, float)):
            means[c] = float(row)
        else:
            raise ConfigError(f"{source}: the errors of {c} must be a number, a list of 5 or {{severity: error}}")
    return errors, means


def load_reference(spec: str | Path, mode: str = "corruptions") -> Reference:
    """The reference named by ``--corruption-reference`` (see the module docstring).

    Args:
        spec: ``alexnet``, a run folder, or a JSON file.
        mode: ``corruptions`` (on-the-fly) or ``imagenet_c``: which results file a run folder gives.
    """
    if str(spec) == "alexnet":
        return Reference("ImageNet-C AlexNet", means=ALEXNET_ERRORS)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / f"{mode}.json"
    if not path.is_file():
        raise ConfigError(
            f"--corruption-reference {spec}: no such JSON file or run folder with {mode}.json; "
            "give alexnet, a run folder evaluated with --corruptions, or a JSON file of errors"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--corruption-reference {path}: not readable JSON ({err})") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"--corruption-reference {path}: expected a JSON object of errors")
    table = data.get("errors", {k: v for k, v in data.items() if k != "clean_error"})
    try:
        errors, means = _rows(table, str(path))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--corruption-reference {path}: errors must be numbers (percent) ({err})") from err
    from .corruptions import corruption_names

    unknown = sorted((set(errors) | set(means)) - set(corruption_names("all")))
    if unknown:
        raise ConfigError(f"--corruption-reference {path}: unknown corruption names {unknown}")
    values = [e for row in errors.values() for e in row.values()] + list(means.values())
    if not values:
        raise ConfigError(f"--corruption-reference {path} holds no errors")
    if any(not 0 <= e <= 100 for e in values):
        raise ConfigError(f"--corruption-reference {path}: errors must be percentages in [0, 100]")
    if max(values) <= 1.0:
        raise ConfigError(f"--corruption-reference {path}: every error is at most 1: give percentages, not fractions")
    recorded = data.get("data") if isinstance(data.get("data"), str) else None  # written by sarvit eval
    return Reference(str(path), errors, means, data.get("clean_error"), recorded)


def corruption_errors(errors: Errors, reference: Reference, severities: Sequence[int]) -> dict[str, float]:
    """``{c: CE_c}`` (%) for the corruptions of ``errors`` that ``reference`` has."""
    return {
        c: 100.0 * sum(row[s] for s in severities) / reference.total(c, severities)
        for c, row in errors.items() if c in reference.corruptions()
    }


def relative_corruption_errors(errors: Errors, clean_error: float, reference: Reference,
                               severities: Sequence[int]) -> dict[str, float]:
    """``{c: rCE_c}`` (%); needs the clean errors of both models."""
    out = {}
    for c, row in errors.items():
        if c not in reference.corruptions():
            continue
        degradation = reference.total(c, severities) - len(severities) * reference.clean_error
        if degradation > 0:
            out[c] = 100.0 * sum(row[s] - clean_error for s in severities) / degradation
    return out


def summarise(errors: Errors, severities: Sequence[int], clean_error: float | None = None,
              reference: Reference | None = None) -> dict[str, Any]:
    """CE per corruption and mCE (normalised by ``reference``) or the unnormalised mean error.

    The means run over the 15 common corruptions that were evaluated; the validation ones
    get their own CE where the reference has them, and count in no mean.
    """
    from .corruptions import corruption_names

    common = [c for c in errors if c in set(corruption_names("common"))]
    out: dict[str, Any] = {"mean_over": common, "normalised": reference is not None}
    if not common:
        out["note"] = "no common corruption evaluated: no mean"
    if reference is None:
        means = {c: float(np.mean([row[s] for s in severities])) for c, row in errors.items()}
        out["corruption_errors"] = means
        out["mean_error_unnormalised"] = float(np.mean([means[c] for c in common])) if common else None
        return out
    ce = corruption_errors(errors, reference, severities)
    out.update(reference=reference.source, corruption_errors=ce,
               mCE=float(np.mean([ce[c] for c in common])) if common else None)
    if clean_error is not None and reference.clean_error is not None:
        rce = relative_corruption_errors(errors, clean_error, reference, severities)
        out["relative_corruption_errors"] = rce
        undefined = [c for c in common if c not in rce]
        out["relative_mCE"] = float(np.mean([rce[c] for c in common])) if common and not undefined else None
        if undefined:
            out["note"] = (f"relative mCE undefined: the reference's corrupted error does not exceed its clean error "
                           f"on {', '.join(undefined)}")
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """Corruption rows x severity columns of top-1 error (%), then CE and the summary lines."""
    severities = results["severities"]
    normalised = results.get("normalised", False)
    last = "CE" if normalised else "mean"
    width = max([len(c) for c in results["errors"]] + [10])
    head = f"{'top-1 error %':<{width}} " + " ".join(f"{f's{s}':>6}" for s in severities) + f" {last:>7}"
    lines = [head, "-" * len(head)]
    for c, row in results["errors"].items():
        ce = results["corruption_errors"].get(c)
        cells = " ".join(f"{row[str(s)]:6.2f}" for s in severities)
        lines.append(f"{c:<{width}} {cells} {'-' if ce is None else f'{ce:7.2f}':>7}")
    lines.append("-" * len(head))
    if results.get("clean_error") is not None:
        lines.append(f"clean error: {results['clean_error']:.2f}%")
    n = len(results.get("mean_over", []))
    if normalised:
        mce = results.get("mCE")
        lines.append(f"mCE (normalised by {results['reference']}, over {n} of 15 common corruptions): "
                     + ("-" if mce is None else f"{mce:.2f}%"))
        if results.get("relative_mCE") is not None:
            lines.append(f"relative mCE: {results['relative_mCE']:.2f}%")
    elif results.get("mean_error_unnormalised") is not None:
        lines.append(f"mean corruption error, UNNORMALISED (no --corruption-reference; over {n} of 15 common "
                     f"corruptions): {results['mean_error_unnormalised']:.2f}%")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
