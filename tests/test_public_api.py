"""The public API: every capability the App offers is a documented top-level function."""

import inspect

import fairbalance as fb

CAPABILITIES = [
    "colored_digits", "colored_mnist", "compute_sa_features", "compute_pseudo_labels", "balance_report",
    "compute_hardness_tags", "train_conditional_diffusion", "generate_balanced", "filter_generated",
    "train_classifier", "apply_classifier", "evaluate_classifier", "inject_bias_conflicting", "audit_balance",
    "compute_captions", "filter_captions", "generate_from_captions", "finetune_per_group", "generate_per_group",
    "check_balance", "export_samples", "measure_realism",
]


def test_capabilities_are_exported_documented_and_explicit():
    for name in CAPABILITIES:
        fn = getattr(fb, name)
        assert name in fb.__all__ and callable(fn)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} takes **kwargs"


def test_long_functions_take_progress():
    for name in ("colored_mnist", "compute_hardness_tags", "train_conditional_diffusion", "generate_balanced",
                 "filter_generated", "train_classifier", "inject_bias_conflicting", "compute_captions",
                 "generate_from_captions", "finetune_per_group", "generate_per_group", "measure_realism"):
        assert "progress" in inspect.signature(getattr(fb, name)).parameters, name
