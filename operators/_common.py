"""Small helpers shared by the operators: config, progress, field choices, run keys, result panels."""

import inspect

import fiftyone as fo
import fiftyone.operators.types as types

import fairbalance
# the one bridge from the operators to the library's internals: run records and shard jobs the forms read, the
# form limits, field choices and pipeline files (operators import only fairbalance's public API and this module)
from fairbalance.core import runs, sharding  # noqa: F401
from fairbalance.core.fields import categorical_fields  # noqa: F401
from fairbalance.core.folders import pipeline_file  # noqa: F401
from fairbalance.core.validation import LIMITS
from fairbalance.generate.realism import check_realism  # noqa: F401  (the realism form's checks, before Execute)
from fairbalance.ops.commands import load_view

from ._progress import progress_callback, progress_label, streams_progress  # noqa: F401  (one progress adapter)


def refresh_app(ctx):
    """Show what a writer changed without losing the user's place: filters, stages and selection stay.

    ``reload_dataset`` re-queries the dataset page, which resets the App's
    sidebar filters (setting them again right after loses the race with that
    query): the next operator would silently run on the whole dataset.
    ``reload_samples`` refreshes the grid and the sidebar's counts and keeps
    the view; a field the writer added joins the sidebar's list when the page
    is next loaded.
    """
    ctx.ops.reload_samples()


def refuse(inputs, name, message):
    """Say in the form, before Execute, why it cannot run (the library would refuse it); Execute stays disabled."""
    prop = inputs.view(name, types.Error(label=message))
    prop.invalid, prop.error_message = True, message
    return prop


def _dropdown(inputs, name, choices, label, description, required, default):
    """A dropdown of ``choices`` ((value, label) pairs, in order) as the enum input ``name``."""
    dropdown = types.Dropdown(label=label, description=description)
    for value, text in choices:
        dropdown.add_choice(value, label=text)
    inputs.enum(name, dropdown.values(), required=required, default=default, view=dropdown)


def field_dropdown(inputs, name, choices, label, description, required=True, default=None):
    """A dropdown of field names, with a clear message when there is nothing to choose."""
    _dropdown(inputs, name, [(c, c) for c in choices], label, description, required, default)


def named_views(dataset):
    """The sets of samples a form offers by name: the dataset's saved views and tags, name -> "saved view" or
    "tag" (a name that is both is the saved view, as on the command line and in pipeline files)."""
    if dataset is None:
        return {}
    return {**{t: "tag" for t in sorted(dataset.distinct("tags"))},
            **{v: "saved view" for v in dataset.list_saved_views()}}


def named_view(dataset, name):
    """The samples of a saved view or tag of ``dataset`` (:func:`named_views`); a clear error for anything else."""
    return load_view(dataset.name, name)


def set_dropdown(inputs, name, own, names, label, description, required=True, default=None):
    """A dropdown of sets of samples: ``own`` choices (value -> label) first, then the saved views and tags
    (``names``: :func:`named_views`)."""
    # the names by name only: the App's dropdown shows (and its input holds) the chosen label
    _dropdown(inputs, name, [*own.items(), *((n, n) for n in names)], label, description, required, default)


def default_of(fn, name):
    """The library function's default for ``name``: forms show it, and never repeat it by hand."""
    return inspect.signature(fn).parameters[name].default


def given(params, names):
    """Only the values the user set, so the library's defaults apply to the rest."""
    return {n: params[n] for n in names if params.get(n) not in (None, "")}


def run_key_input(ctx, inputs, fn, resumable=False):
    """Run key and Overwrite inputs, checked as the user types; False when the form cannot run.

    A key in use on the dataset needs Overwrite ticked (or, for ``resumable``
    operations such as generation and diffusion training, the same settings:
    running again then resumes the run).
    """
    from fairbalance import FairBalanceError

    default = default_of(fn, "run_key")
    prop = inputs.str("run_key", default=default, required=False, label="Run key",
                      description="Name of the run recorded on the dataset (letters, digits, underscores)")
    inputs.bool("overwrite", default=False, label="Overwrite",
                            description="Replace the run with this key: its fields" +
                            (", images and samples" if resumable else "") + " and record")
    key = ctx.params.get("run_key")
    if key is None and "run_key" not in ctx.params:  # not on the form yet (or an SDK call without it)
        key = default
    try:
        runs.validate_run_key(key)
    except FairBalanceError as e:
        prop.invalid, prop.error_message = True, str(e)
        return False
    if ctx.dataset is not None and ctx.dataset.has_run(key) and not ctx.params.get("overwrite", False):
        pending = getattr(ctx.dataset.get_run_info(key).config, "method", None) == runs.CONFIG_PREFIX + "sharded_job"
        if resumable or pending:
            inputs.view("run_key_notice", types.Notice(
                label=f"Run '{key}' exists: running it again with the same settings resumes it; other settings "
                      "need Overwrite or another key"))
            return True
        prop.invalid = True
        prop.error_message = f"Run '{key}' already exists on this dataset: tick Overwrite or choose another key"
        return False
    return True


def _field_clash(dataset, field, run_key):
    """Why ``field`` cannot take the output of run ``run_key`` (another run's or a non-fairbalance field), or None."""
    if dataset is None or not field or dataset.get_field(field) is None:
        return None
    owners = {f: key for key in runs.list_runs(dataset) for f in runs.get_run_config(dataset, key).get(
        "fields_written", [])}
    owner = owners.get(field)
    if owner == run_key:
        return None
    return f"holds the output of run '{owner}'" if owner else "exists and was not written by fairbalance"


def output_field_input(ctx, inputs, name, fn, label, description=None):
    """A field the operator writes, checked before Execute: fairbalance never replaces another run's field.

    When the library's default is taken by another run (e.g. ``sa_features``
    after the one-click audit), the form offers a free name
    (``sa_features_2``) instead of failing after Execute. False when the
    chosen name cannot be used.
    """
    default = default_of(fn, name)
    run_key = ctx.params.get("run_key") or default_of(fn, "run_key")
    free, n = default, 2
    while _field_clash(ctx.dataset, free, run_key):
        free, n = f"{default}_{n}", n + 1
    prop = inputs.str(name, default=free, required=False, label=label, description=description)
    chosen = ctx.params.get(name) or free
    clash = _field_clash(ctx.dataset, chosen, run_key)
    if clash:
        while _field_clash(ctx.dataset, free, run_key):  # (the default may be the chosen name)
            free, n = f"{default}_{n}", n + 1
        prop.invalid = True
        prop.error_message = (f"Field '{chosen}' {clash}: write to a free name such as '{free}'" +
                              (", or delete that run ('fairbalance: delete a run')" if "run '" in clash else ""))
        return False
    return True


def clip_check(ctx, inputs, fn):
    """Say at once, before Execute, that the CLIP weights are missing (offline), instead of a traceback later."""
    from fairbalance.core import models

    model = ctx.params.get("model") or default_of(fn, "model")
    pretrained = ctx.params.get("pretrained") or default_of(fn, "pretrained")
    problem = models.clip_problem(model, pretrained or None)
    if problem:
        refuse(inputs, "clip_missing", problem)
    return problem is None


def split_list(text):
    """A comma-separated form entry as a list of its non-empty items."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def text_source(params):
    """How an attribute is described: "wordnet" (a word) or "texts" (the user's own related texts)."""
    if params.get("source") in ("wordnet", "texts"):
        return params["source"]
    return "texts" if split_list(params.get("related_texts")) and not (params.get("attribute") or "").strip() \
        else "wordnet"


def attribute_or_texts_input(ctx, inputs, attribute_description):
    """The two ways to describe a sensitive attribute, as alternatives: a word for WordNet, or the texts themselves.

    Adds the choice and the input of the chosen way; returns the choice ("wordnet" or "texts").
    """
    choice = types.RadioGroup()
    choice.add_choice("wordnet", label="An attribute: WordNet picks the texts closest to it")
    choice.add_choice("texts", label="My own related texts (quicker: no WordNet search)")
    source = text_source(ctx.params)
    inputs.enum("source", choice.values(), default=source, view=choice, label="Describe it by")
    if source == "texts":
        prop = inputs.str("related_texts", required=True, label="Related texts (comma-separated)",
                          description="e.g. 'red, green, blue, yellow': one feature per text")
        if len(split_list(ctx.params.get("related_texts"))) == 1:
            prop.invalid, prop.error_message = True, "Give at least two texts"
    else:
        inputs.str("attribute", required=True, label="Sensitive attribute", description=attribute_description)
    return source


def related_texts_columns(ctx):
    """Columns of a related-texts result table: no similarity column for the user's own texts (no query)."""
    texts = (getattr(ctx, "results", None) or {}).get("related_texts")
    scored = texts is None or any(t.get("score") is not None for t in texts)
    return {"text": "Related text", **({"score": "Similarity to the query"} if scored else {})}


def sampling_inputs(inputs, fn):
    """Guidance scale, sampling steps and seed of a generator, with ``fn``'s defaults."""
    inputs.float("guidance_scale", default=default_of(fn, "guidance_scale"), min=0, label="Guidance scale",
                 description="Classifier-free guidance: how strongly images follow their condition")
    inputs.int("num_inference_steps", default=default_of(fn, "num_inference_steps"), min=1,
               max=LIMITS["num_inference_steps"], label="Sampling steps")
    inputs.int("seed", default=default_of(fn, "seed"), max=LIMITS["seed"], label="Seed",
               description="Each image's own seed derives from it: the same seed gives the same images")


def rounded(value, digits=3):
    """Floats rounded for people (the App would show 1.095921545731536), inside dicts and lists too."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def readable_bytes(n):
    """A size for people: 162375 -> "159 KB" (binary units, as file browsers show them)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" or n >= 100 else f"{n:.3g} {unit}"
        n /= 1024


# The road a user walks: find -> tag -> generate -> train -> verify (the capability table); the operator browser
# lists them in this order
ROAD = {c.name: c.step for c in fairbalance.capabilities() if c.operator}


def operator_config(name, label, description, icon, dynamic=True, delegated="optional", streams=None):
    """The ``OperatorConfig`` of a fairbalance operator, labelled with its step on the road.

    ``delegated``: ``None`` (runs in the App only; quick), ``"optional"`` (the
    user may schedule it), ``"default"`` (heavy: scheduled unless the user
    chooses to run it now). ``streams`` (default: the schedulable ones, i.e.
    the heavy ones): its ``execute`` is decorated with :func:`streams_progress`
    (the App then runs it as a generator and shows its progress).
    """
    import fiftyone.operators as foo

    if delegated not in (None, "optional", "default"):
        raise ValueError("delegated must be None, 'optional' or 'default'")
    flags = {} if delegated is None else {
        "allow_immediate_execution": True, "allow_delegated_execution": True,
        **({"default_choice_to_delegated": True} if delegated == "default" else {}),
    }
    if name not in ROAD and label.startswith("fairbalance: "):  # found by typing "fairbalance delete" too
        label = f"fairbalance {label[len('fairbalance: '):]}"
    if name in ROAD and label.startswith("fairbalance: "):
        # "fairbalance audit hidden imbalance · 1 find": the browser matches what a user types ("fairbalance
        # audit", "fairbalance train") as a substring of the label, so the words follow "fairbalance" directly
        label = f"fairbalance {label[len('fairbalance: '):]} · {ROAD[name]}"
        # the App's operator browser sorts by the first character of the description (ties: registration
        # order), not by label: the step's number leads it, so the list follows the road
        description = f"{ROAD[name]} · {description}"
    return foo.OperatorConfig(name=name, label=label, description=description, icon=icon, dynamic=dynamic,
                              execute_as_generator=delegated is not None if streams is None else streams,
                              **flags)


def delete_generated(dataset, run_key):
    """Delete the samples and images a generation run added (before :func:`runs.delete_run` drops its record)."""
    from fairbalance.generate import generation

    generation.delete_generated(dataset, run_key)


def shards_input(inputs, what="the work", finish="records the run"):
    """The Shards option of a form whose capability can be sharded (see :func:`queue_shards`)."""
    inputs.int("num_shards", default=1, min=1, max=LIMITS["num_shards"], label="Shards",
               description=f"More than 1: queue {what} as this many delegated operations (one per shard) for "
                           f"`fiftyone delegated launch` workers; the last to finish {finish}. Running it again "
                           "with the same settings resumes")


def classifier_and_shards_input(ctx, inputs, label, description, what, finish) -> bool:
    """The "trained classifier" folder and the Shards option of a form that trains a GCE-biased model unless given
    one; shards need it given (each shard would otherwise train its own). True when a folder is given."""
    given_folder = bool((ctx.params.get("classifier") or "").strip())
    clf = inputs.str("classifier", required=False, label=label, description=description)
    shards_input(inputs, what, finish=finish)
    if (ctx.params.get("num_shards") or 1) > 1 and not given_folder:
        clf.invalid = True
        clf.error_message = ("Shards need the biased classifier trained once first: train it with 'train "
                             "classifier' (method 'biased') and give its folder here")
    return given_folder


def queue_shards(ctx, function, **kwargs):
    """With Shards > 1 on the form: queue ``function`` on the target view as that many delegated operations and
    return what the form shows; None when the form asks for one shard (the operator runs the function itself)."""
    num_shards = ctx.params.get("num_shards") or 1
    if num_shards <= 1:
        return None
    job = fairbalance.queue_sharded(ctx.target_view(), function, num_shards=num_shards, **kwargs)
    return {"run_key": job.run_key, "num_shards": job.num_shards, "shards_queued": len(job.queued),
            "shards_requeued": len(job.requeued)}


# the outputs of a queued sharded run (see queue_shards), first in every shardable operator's result view
SHARD_OUTPUTS = (("shards_queued", "int", "Shards queued (the Balance panel shows their progress)"),
                 ("shards_requeued", "int", "Shards of lost workers queued again"))


QUEUED_HINT = ("The shards run when a worker picks them up: start one with `fiftyone delegated launch` in a "
               "terminal (same FiftyOne database and plugins folder as the App; one per GPU). The Balance panel's "
               "'Sharded runs in progress' shows their progress; the run is recorded when the last shard is done.")


SCHEDULE_HINT = ("Ran here in the App. To run it in the background instead (the Execute menu's Schedule, which reads "
                 "NOT AVAILABLE now): start the App with `FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true` (or "
                 "`\"allow_legacy_orchestrators\": true` in ~/.fiftyone/config.json) and a worker with "
                 "`fiftyone delegated launch` in another terminal (same database and plugins folder).")


def _schedule_hint(ctx):
    """How to enable Schedule, for an operator that allows it when the App cannot offer it (or None)."""
    if ctx is None or getattr(ctx, "delegated", False) or fo.config.allow_legacy_orchestrators:
        return None
    try:
        from fiftyone.operators.registry import get_operator

        allowed = get_operator(ctx.operator_uri).config.allow_delegated_execution
    except Exception:  # not a registered operator (a library caller): no hint
        return None
    return SCHEDULE_HINT if allowed else None


def result_view(*args):
    """An operator's output panel: ``result_view(ctx, title, *rows)`` (or ``result_view(title, *rows)``).

    Rows are ``(name, kind, label[, columns])``; ``kind``: ``int``, ``float``,
    ``str``, ``text`` (a block of lines rendered locally as Markdown: nothing
    fetched from the web; see :func:`as_text_block`) or ``table`` (a list of
    dicts; ``columns`` maps each key to its heading). With ``ctx``, rows whose
    result is missing or None are left out instead of showing "No value
    provided".
    """
    if isinstance(args[0], str):
        ctx, title, rows = None, args[0], args[1:]
    else:
        ctx, title, rows = args[0], args[1], args[2:]
    results = getattr(ctx, "results", None) or None
    outputs = types.Object()
    if results is not None and results.get("shards_queued") is not None:  # queued, not computed yet
        title = "Queued for delegated workers (nothing computed yet)"
        outputs.view("queued", types.Notice(label=QUEUED_HINT))
    for name, kind, label, *columns in rows:
        if results is not None and results.get(name) is None:
            continue
        if kind == "table":
            table = types.TableView()
            for key, heading in columns[0].items():
                table.add_column(key, label=heading)
            outputs.list(name, types.Object(), label=label, view=table)
        elif kind == "text":
            outputs.str(name, label=label, view=types.MarkdownView())
        elif kind in ("int", "float", "str"):
            getattr(outputs, kind)(name, label=label)
        else:
            raise ValueError(f"unknown output kind {kind!r}")
    hint = _schedule_hint(ctx) if results is not None and results.get("shards_queued") is None else None
    if hint:
        outputs.view("schedule_hint", types.Notice(label=hint))
    return types.Property(outputs, view=types.View(label=title))


def as_text_block(text):
    """Plain text shown verbatim in a ``text`` result row (a fenced Markdown block)."""
    fence = "~~~~"
    return f"{fence}\n{text or ''}\n{fence}"


CROSS_COLUMNS = {"cluster": "Class / cluster", "count": "Samples", "majority": "Most common attribute value",
                 "purity": "Its share (purity)"}


def cross_rows(report):
    """The clusters x attribute table of a report as table rows (None without an attribute field)."""
    return [{"cluster": r.cluster, "count": r.count, "majority": r.majority, "purity": r.purity}
            for r in report.cross_table] or None


COUNT_COLUMNS = {"label": "Class / cluster", "count": "Samples", "percent": "Share", "note": "Note"}

#: Groups with fewer samples than this are flagged: their shares and accuracies rest on too few samples.
SMALL_GROUP = 5


def count_rows(report):
    """Samples per class or cluster, largest first, shares as percentages, small ones flagged."""
    total = sum(report.counts.values()) or 1
    return [{"label": str(k), "count": v, "percent": f"{100 * v / total:.1f}%",
             "note": f"small (under {SMALL_GROUP} samples)" if v < SMALL_GROUP else ""}
            for k, v in sorted(report.counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def plain_reading(report):
    """One sentence on how balanced the counts are, without the formulas."""
    counts = [v for v in report.counts.values() if v]
    if not counts:
        return "No samples with a value in this field"
    big, small = max(counts), min(counts)
    ne = report.normalized_entropy
    verdict = ("close to balanced" if ne is not None and ne >= 0.95 else
               "somewhat imbalanced" if ne is not None and ne >= 0.8 else "strongly imbalanced")
    return (f"{len(counts)} groups, {verdict}: the largest has {big} samples, the smallest {small}"
            + (f" ({big / small:.1f}x fewer)" if small and big != small else "")
            + (f"; balance score {ne:.2f} of 1 (1 = every group the same size)" if ne is not None else ""))


def confirm_colors(samples, field):
    """The library's independent colour check of generated images (``datasets.colored_digits``)."""
    from fairbalance.datasets.colored_digits import confirm_colors as check

    return check(samples, field)
