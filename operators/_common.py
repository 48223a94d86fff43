"""Small helpers shared by the operators: config, progress, field choices, run keys, result panels."""

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


def operator_config(name, label, description, icon, dynamic=True, delegated="optional"):
    """The ``OperatorConfig`` of a fairbalance operator.

    ``delegated``: ``None`` (runs in the App only; quick), ``"optional"`` (the
    user may schedule it), ``"default"`` (heavy: scheduled unless the user
    chooses to run it now).
    """
    import fiftyone.operators as foo

    if delegated not in (None, "optional", "default"):
        raise ValueError("delegated must be None, 'optional' or 'default'")
    flags = {} if delegated is None else {
        "allow_immediate_execution": True, "allow_delegated_execution": True,
        **({"default_choice_to_delegated": True} if delegated == "default" else {}),
    }
    return foo.OperatorConfig(name=name, label=label, description=description, icon=icon, dynamic=dynamic, **flags)


def result_view(title, *rows):
    """An operator's output panel from ``(name, kind, label[, columns])`` rows.

    ``kind``: ``int``, ``float``, ``str``, ``text`` (a monospaced block) or
    ``table`` (a list of dicts; ``columns`` maps each key to its heading).
    """
    outputs = types.Object()
    for name, kind, label, *columns in rows:
        if kind == "table":
            table = types.TableView()
            for key, heading in columns[0].items():
                table.add_column(key, label=heading)
            outputs.list(name, types.Object(), label=label, view=table)
        elif kind == "text":
            outputs.str(name, label=label, view=types.CodeView(language="text"))
        elif kind in ("int", "float", "str"):
            getattr(outputs, kind)(name, label=label)
        else:
            raise ValueError(f"unknown output kind {kind!r}")
    return types.Property(outputs, view=types.View(label=title))
