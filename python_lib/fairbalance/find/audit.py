"""One call for the first question a curator asks: is this dataset hiddenly imbalanced in attribute X?

``audit_balance`` = :func:`compute_sa_features` -> :func:`compute_pseudo_labels`
-> :func:`balance_report`, each recorded as its own run, with the report
snapshot recorded too, so the App's audit operator, the demo and the SDK give
the same answer from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairbalance.core import claims, validation
from fairbalance.find.balance import BalanceReport, balance_report
from fairbalance.find.pseudo_labels import PseudoLabelsResult, compute_pseudo_labels
from fairbalance.find.pseudo_labels import validate_inputs as validate_pseudo_label_inputs
from fairbalance.find.sa_features import SAFeaturesResult, compute_sa_features
from fairbalance.find.sa_features import validate_inputs as validate_sa_inputs


@dataclass
class AuditResult:
    """The three steps' results; ``run_key`` is the balance-report snapshot's run."""

    run_key: str
    sa_features: SAFeaturesResult
    pseudo_labels: PseudoLabelsResult
    report: BalanceReport

    def to_dict(self) -> dict:
        return {"run_key": self.run_key, "sa_features": self.sa_features.to_dict(),
                "pseudo_labels": self.pseudo_labels.to_dict(), "report": self.report.to_dict()}


@claims.exclusive
def audit_balance(
    samples,
    attribute: str | None = None,
    related_texts_override: list[str] | None = None,
    num_related_texts: int = 20,
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    attribute_field: str | None = None,
    features_field: str = "sa_features",
    label_field: str = "sa_cluster",
    kmax: int = 20,
    seed: int = 0,
    run_key: str = "audit",
    overwrite: bool = False,
    progress=None,
) -> AuditResult:
    """SA features for ``attribute`` (or the given related texts), X-means pseudo-labels, their balance.

    The steps are recorded as runs ``<run_key>_sa_features``,
    ``<run_key>_pseudo_labels`` and ``<run_key>`` (the report). With
    ``attribute_field`` (a known attribute, if the user has one) the report
    holds the clusters x attribute table. ``overwrite=True`` replaces a
    previous audit with the same key.
    """
    # every step's checks before the first one writes (kmax=0 was refused after the SA features were written)
    validate_sa_inputs(samples, attribute, related_texts_override=related_texts_override,
                       num_related_texts=num_related_texts, features_field=features_field)
    validate_pseudo_label_inputs(samples, features_field, label_field, kmax=kmax, seed=seed)
    if attribute_field is not None:
        validation.require_fields(samples, [attribute_field])
    sa = compute_sa_features(samples, attribute, related_texts_override=related_texts_override,
                             num_related_texts=num_related_texts, model=model, pretrained=pretrained,
                             features_field=features_field, run_key=f"{run_key}_sa_features", overwrite=overwrite,
                             progress=progress)
    pl = compute_pseudo_labels(samples, features_field=features_field, label_field=label_field, kmax=kmax, seed=seed,
                               run_key=f"{run_key}_pseudo_labels", overwrite=overwrite)
    report = balance_report(samples, label_field, attribute_field=attribute_field, run_key=run_key,
                            overwrite=overwrite)
    return AuditResult(run_key, sa, pl, report)
