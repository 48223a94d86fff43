"""Small helpers shared by the operators: progress, field choices, run keys."""

import fiftyone as fo
import fiftyone.operators.types as types

from fairbalance.balance import categorical_fields  # noqa: F401  (re-exported for the operators)


def progress_callback(ctx, label):
    """A FiftyOne ``progress`` callable that forwards to ``ctx.set_progress``."""

    def report(pb):
        ctx.set_progress(progress=pb.progress, label=f"{label} ({pb.progress:.0%})")

    return fo.report_progress(report, dt=0.5)


def field_dropdown(inputs, name, choices, label, description, required=True, default=None):
    """A dropdown of field names, with a clear message when there is nothing to choose."""
    dropdown = types.Dropdown(label=label, description=description)
    for choice in choices:
        dropdown.add_choice(choice, label=choice)
    inputs.enum(name, dropdown.values(), required=required, default=default, view=dropdown)


def run_key_input(inputs, default):
    inputs.str(
        "run_key",
        default=default,
        required=False,
        label="Run key",
        description="Name of the run recorded on the dataset (letters, digits, underscores)",
    )
    inputs.bool("overwrite", default=False, label="Overwrite", description="Replace an existing run with this key")
