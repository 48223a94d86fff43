"""Field helpers shared by every capability: where a label's value lives, which fields hold classes."""

from __future__ import annotations

from fairbalance.core import validation


def label_path(samples, field_name: str) -> str:
    """The path holding the class value: ``<field>.label`` for Classification fields."""
    import fiftyone as fo

    validation.require_fields(samples, [field_name])
    f = samples.get_field(field_name)
    if isinstance(f, fo.EmbeddedDocumentField):
        if issubclass(f.document_type, fo.Classification):
            return f"{field_name}.label"
        raise validation.FairBalanceError(
            f"Field '{field_name}' holds {f.document_type.__name__} labels; "
            "balance needs a Classification field or a plain str/int/bool field"
        )
    if isinstance(f, (fo.StringField, fo.IntField, fo.BooleanField)):
        return field_name
    raise validation.FairBalanceError(
        f"Field '{field_name}' has type {type(f).__name__}; "
        "balance needs a Classification field or a plain str/int/bool field"
    )


def categorical_fields(samples) -> list[str]:
    """Top-level fields a balance can be computed on: Classification labels and str/int/bool fields."""
    import fiftyone as fo

    if samples is None:
        return []
    reserved = ("id", "filepath", "tags", "metadata", "created_at", "last_modified_at")
    names = []
    for name, f in samples.get_field_schema().items():
        if name in reserved:
            continue
        if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, fo.Classification):
            names.append(name)
        elif isinstance(f, (fo.StringField, fo.IntField, fo.BooleanField)):
            names.append(name)
    return names
