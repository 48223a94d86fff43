"""A balance gate for CI: read stored labels and evaluation runs, compare with thresholds, say pass or fail.

Nothing heavy is computed: the label counts come from one database
aggregation (:func:`balance_report`) and the worst-group accuracy from a
stored :func:`evaluate_classifier` run. ``report_dir`` writes what a CI job
attaches: ``report.md``, ``report.json`` and ``counts.png`` (the panel's bar
chart).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from fairbalance.core import runs, validation
from fairbalance.find.balance import BalanceReport, balance_report


@dataclass
class GateCheck:
    name: str
    value: float
    threshold: float
    rule: str  # ">=" or "<="
    passed: bool


@dataclass
class GateResult:
    """The verdict, every check with its figure, and where the written report is."""

    label_field: str
    passed: bool
    checks: list[GateCheck]
    report: BalanceReport
    evaluation_run: str | None = None
    report_files: list[str] = field(default_factory=list)
    generated_counted_by: str | None = None  # how generated samples were counted (assigned or planned group)

    def to_dict(self) -> dict:
        return {"label_field": self.label_field, "passed": self.passed, "checks": [asdict(c) for c in self.checks],
                "report": self.report.to_dict(), "evaluation_run": self.evaluation_run,
                "report_files": self.report_files, "generated_counted_by": self.generated_counted_by}

    def format(self) -> str:
        """A plain-text table for terminals and CI logs."""
        lines = [f"{'check':<26} {'value':>8}  rule  {'threshold':>9}  result"]
        for c in self.checks:
            lines.append(f"{c.name:<26} {c.value:>8.3f}  {c.rule:<4}  {c.threshold:>9.3f}  "
                         f"{'pass' if c.passed else 'FAIL'}")
        if self.generated_counted_by:
            lines.append(f"generated samples: {self.generated_counted_by}")
        lines.append(f"gate on '{self.label_field}': {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _threshold(name: str, value, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            low <= value <= high):
        raise validation.FairBalanceError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_balance(
    samples,
    label_field: str,
    min_normalized_entropy: float | None = None,
    max_imbalance_ratio: float | None = None,
    min_worst_group_accuracy: float | None = None,
    evaluation_run: str | None = None,
    report_dir: str | None = None,
) -> GateResult:
    """Pass or fail ``label_field`` of ``samples`` against the thresholds given (at least one).

    ``min_normalized_entropy`` in [0, 1] (1 = perfectly balanced),
    ``max_imbalance_ratio`` >= 1 (largest / smallest group),
    ``min_worst_group_accuracy`` in [0, 1], read from the stored results of
    ``evaluation_run`` (an :func:`evaluate_classifier` run with an
    attribute field). ``report_dir``: write report.md, report.json and
    counts.png there.
    """
    thresholds = {
        "min_normalized_entropy": _threshold("min_normalized_entropy", min_normalized_entropy, 0.0, 1.0),
        "max_imbalance_ratio": _threshold("max_imbalance_ratio", max_imbalance_ratio, 1.0, math.inf),
        "min_worst_group_accuracy": _threshold("min_worst_group_accuracy", min_worst_group_accuracy, 0.0, 1.0),
    }
    if all(v is None for v in thresholds.values()):
        raise validation.FairBalanceError("give at least one threshold to check")
    worst = None
    if thresholds["min_worst_group_accuracy"] is not None:
        if not evaluation_run:
            raise validation.FairBalanceError("min_worst_group_accuracy needs evaluation_run (an evaluate_classifier "
                                              "run with an attribute field)")
        if evaluation_run not in runs.list_runs(samples, "evaluate_classifier"):
            raise validation.FairBalanceError(f"No evaluate_classifier run '{evaluation_run}' on dataset "
                                              f"'{samples._root_dataset.name}'")
        worst = runs.load_run_results(samples, evaluation_run).get("worst_group_accuracy")
        if worst is None:
            raise validation.FairBalanceError(f"Run '{evaluation_run}' has no worst-group accuracy: evaluate with "
                                              "attribute_field")
    report, counted_by = _report_with_assigned_groups(samples, label_field)
    checks = []
    if thresholds["min_normalized_entropy"] is not None:
        t = thresholds["min_normalized_entropy"]
        checks.append(GateCheck("normalized_entropy", report.normalized_entropy, t, ">=",
                                report.normalized_entropy >= t))
    if thresholds["max_imbalance_ratio"] is not None:
        t = thresholds["max_imbalance_ratio"]
        checks.append(GateCheck("imbalance_ratio", report.imbalance_ratio, t, "<=", report.imbalance_ratio <= t))
    if worst is not None:
        t = thresholds["min_worst_group_accuracy"]
        checks.append(GateCheck("worst_group_accuracy", float(worst), t, ">=", worst >= t))
    result = GateResult(label_field, all(c.passed for c in checks), checks, report, evaluation_run,
                        generated_counted_by=counted_by)
    if report_dir is not None:
        result.report_files = _write_report(result, report_dir)
    return result


def _report_with_assigned_groups(samples, label_field: str) -> tuple[BalanceReport, str | None]:
    """The balance of ``label_field``, generated samples counted in the group their own features fall in.

    See :func:`fairbalance.find.balance.assigned_joint_counts` (the Balance panel
    counts them the same way). Returns the report and how generated samples
    were counted (None when there are none).
    """
    from fairbalance.find import balance

    validation.require_nonempty(samples)
    joint, how, _ = balance.assigned_joint_counts(samples, label_field)
    if how is None:
        return balance_report(samples, label_field), None
    return balance.joint_report(joint, label_field, None), how


def _write_report(result: GateResult, folder: str) -> list[str]:
    """report.json, counts.png and report.md (which shows the chart) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation.require_writable_dir(folder)
    paths = [os.path.join(folder, n) for n in ("report.json", "counts.png", "report.md")]
    with open(paths[0], "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    counts = result.report.counts
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(counts) + 2), 3))
    ax.bar(list(counts), list(counts.values()), color="#ff6d04")
    ax.set_xlabel(result.label_field)
    ax.set_ylabel("samples")
    ax.set_title(f"{result.label_field}: normalized entropy {result.report.normalized_entropy:.3f}")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    rows = "\n".join(f"| {c.name} | {c.value:.3f} | {c.rule} {c.threshold:.3f} | {'pass' if c.passed else '**FAIL**'} |"
                     for c in result.checks)
    groups = "\n".join(f"| {k} | {v} | {100 * result.report.proportions[k]:.1f}% |" for k, v in counts.items())
    with open(paths[2], "w") as f:
        f.write(f"# Balance gate: {'passed' if result.passed else 'FAILED'}\n\n"
                f"Field `{result.label_field}`, {result.report.num_samples} samples."
                + (f" Generated samples counted {result.generated_counted_by}." if result.generated_counted_by else "")
                + "\n\n"
                f"| check | value | rule | result |\n|---|---|---|---|\n{rows}\n\n"
                f"![counts](counts.png)\n\n| group | samples | share |\n|---|---|---|\n{groups}\n")
    return paths
