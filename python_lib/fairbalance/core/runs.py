"""Record every computation as a FiftyOne run on the dataset, like the Brain does.

A run stores its method, full config (model, parameters, seed) and the fields
it wrote. Reusing a run key is refused unless ``overwrite=True``; with
overwrite, the fields the old run wrote are removed before the new values are
written, so old and new outputs never mix.

Typical use inside a capability::

    run = runs.prepare(samples, run_key, "sa_features", config, fields, overwrite)
    ... compute, without writing ...
    run.write(lambda: writeback.set_values(...))   # cleanup old, write, register
    run.save_results({...})
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from fairbalance.core import claims, jobs, models, validation

CONFIG_PREFIX = "fairbalance."


def jsonable(value: Any) -> Any:
    """Make numpy/torch scalars, paths and dataclasses JSON-friendly."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return jsonable(value.to_dict())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_jsonable = jsonable  # its name before it was public (used across subpackages)


def validate_run_key(run_key: str) -> None:
    if not run_key or not isinstance(run_key, str) or not run_key.replace("_", "a").isalnum() or run_key[0].isdigit():
        raise validation.FairBalanceError(
            f"Invalid run key {run_key!r}: use letters, digits and underscores, not starting with a digit"
        )


def list_runs(samples, method: str | None = None) -> list[str]:
    """Run keys recorded by fairbalance on this dataset (optionally of one method), oldest first: the last
    is the newest (FiftyOne lists them alphabetically, so "the last run" was the alphabetically last)."""
    keys = []
    for key in samples._root_dataset.list_runs():
        info = samples._root_dataset.get_run_info(key)
        m = getattr(info.config, "method", None)
        if isinstance(m, str) and m.startswith(CONFIG_PREFIX) and (method is None or m == CONFIG_PREFIX + method):
            keys.append((str(info.timestamp or ""), key))
    return [key for _, key in sorted(keys, key=lambda tk: tk[0])]


def get_run_config(samples, run_key: str) -> dict:
    """The stored config of a run as a plain dict."""
    info = samples._root_dataset.get_run_info(run_key)
    return {k: v for k, v in info.config.serialize().items() if not k.startswith("_")}


def load_run_results(samples, run_key: str) -> dict:
    """The stored results of a run as a plain dict (empty if none).

    Another process (a worker, a pipeline, the App's executor) may have overwritten the results since this process
    loaded the dataset: FiftyOne then deleted the GridFS file this process's dataset document still points to, and
    reading it fails. The dataset document is reloaded and the read repeated once.
    """
    dataset = samples._root_dataset
    try:
        results = dataset.load_run_results(run_key, cache=False)
    except (AttributeError, ValueError):  # FiftyOne's read of a deleted GridFS file: '' has no .decode
        dataset.reload()
        results = dataset.load_run_results(run_key, cache=False)
    if results is None:
        return {}
    return {k: v for k, v in results.serialize().items() if not k.startswith("_") and k != "cls"}


def given_or_recorded(samples, given, run_key: str | None, method: str, config_key: str, given_name: str,
                      run_name: str):
    """``given`` (a value the caller passed), or ``config_key`` of the ``method`` run ``run_key``: exactly one.

    How functions that consume another run's output (a model folder, a
    checkpoint, adapters) take either a path or the key of the run that made it.
    """
    if (given is None) == (run_key is None):
        raise validation.FairBalanceError(f"pass {given_name} or {run_name} (a run key): exactly one of "
                                          f"{given_name.split()[0]} and {run_name}")
    if given is not None:
        return given
    if run_key not in list_runs(samples, method):
        raise validation.FairBalanceError(
            f"No '{method}' run '{run_key}' on dataset '{samples._root_dataset.name}'; "
            f"runs of that kind: {list_runs(samples, method)}")
    return get_run_config(samples, run_key)[config_key]


def recorded_model(samples, family: str, given, run_key: str | None, given_name: str, run_name: str,
                   device=None, **options):
    """A saved model (:data:`models.SAVED_FAMILIES`) from ``given`` (the model or its folder) or from the run
    ``run_key`` that trained it (exactly one), loaded by :func:`models.load_saved`."""
    fam = models.SAVED_FAMILIES[family]
    folder = given_or_recorded(samples, given, run_key, fam.run_method, fam.run_field, given_name, run_name)
    return models.load_saved(family, folder, device, **options)


def delete_run(samples, run_key: str, cleanup: bool = True) -> None:
    """Delete a run and, with ``cleanup``, the fields it wrote and the tags it put on samples (a run that
    records ``tag`` and its ``tagged_ids``: hardness, filter), and a sharded run's job state."""
    dataset = samples._root_dataset
    if cleanup:
        config = get_run_config(dataset, run_key)
        _delete_fields(dataset, config.get("fields_written", []))
        tagged = load_run_results(dataset, run_key).get("tagged_ids") if config.get("tag") else None
        if tagged:  # only the samples this run tagged: the same tag elsewhere stays
            dataset.select(tagged).untag_samples(config["tag"])
    dataset.delete_run(run_key)
    jobs.delete_job(dataset, run_key)


def _delete_fields(dataset, fields: Iterable[str]) -> None:
    schema = dataset.get_field_schema()
    for f in fields:
        if f in schema:
            dataset.delete_sample_field(f)


@dataclass
class PreparedRun:
    """A run whose key has been checked; nothing is written until :meth:`write`."""

    samples: Any
    run_key: str
    method: str
    config: dict
    fields: list[str]
    overwrite: bool
    resumed: bool = False  # the same run, rerun with the same config (resumable operations)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())

    @property
    def dataset(self):
        return self.samples._root_dataset

    def write(self, writer: Callable[[], Any]) -> Any:
        """Remove the old run's outputs (if overwriting), call ``writer``, register the run.

        The old run's values go from *every* sample it wrote them to, not only
        from the samples of this (possibly smaller) view: fields it wrote that
        this run writes again are cleared (kept in the schema), the others deleted.
        """
        dataset = self.dataset
        if dataset.has_run(self.run_key):
            old_fields = get_run_config(dataset, self.run_key).get("fields_written", [])
            _delete_fields(dataset, [f for f in old_fields if f not in self.fields])
            if self.overwrite:
                schema = dataset.get_field_schema()
                for f in old_fields:
                    if f in self.fields and f in schema:
                        dataset.clear_sample_field(f)
            dataset.delete_run(self.run_key)
        out = writer()
        cfg = dataset.init_run(
            method=CONFIG_PREFIX + self.method,
            fields_written=list(self.fields),
            started_at=self.started,
            completed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            **jsonable(self.config),
        )
        dataset.register_run(self.run_key, cfg, overwrite=True, cleanup=False)
        return out

    def save_results(self, results: dict) -> None:
        """Store JSON-serializable results with the run."""
        payload = {k: v for k, v in jsonable(results).items() if k != "run_key"}
        json.dumps(payload)  # fail loudly on anything that is not JSON
        dataset = self.dataset
        dataset.save_run_results(self.run_key, dataset.init_run_results(self.run_key, **payload), overwrite=True)


def check_run_key(samples, run_key: str, method: str, overwrite: bool = False, resumable: bool = False) -> bool:
    """Claim ``run_key`` and refuse it if taken: another kind's run, or (unless ``overwrite`` or ``resumable``)
    any run; whether the run exists. The first check of every writer (:func:`writer`) and of :func:`prepare`."""
    validate_run_key(run_key)
    dataset = samples._root_dataset
    claims.claim_run(dataset, run_key)
    if not dataset.has_run(run_key):
        return False
    method_old = getattr(dataset.get_run_info(run_key).config, "method", None)
    if method_old != CONFIG_PREFIX + method:
        raise validation.FairBalanceError(
            f"Run '{run_key}' was made by {method_old!r}, not {CONFIG_PREFIX + method!r}; use another key")
    if not overwrite and not resumable:
        raise validation.FairBalanceError(
            f"Run '{run_key}' already exists on dataset '{dataset.name}'; pass overwrite=True to replace it")
    return True


def _existing_dataset(target):
    """A generator's ``target_dataset`` when it exists already (a dataset, or the name of one), else None."""
    if not isinstance(target, str):
        return target
    import fiftyone as fo

    return fo.load_dataset(target) if fo.dataset_exists(target) else None


def _refuse_other_config(dataset, run_key: str, differs: list[str]) -> None:
    if differs:
        raise validation.FairBalanceError(
            f"Run '{run_key}' already exists on dataset '{dataset.name}' with another configuration "
            f"(differs in: {', '.join(differs)}); pass overwrite=True to replace it or use another run key")


def _given_differences(dataset, run_key: str, arguments: dict, ignore: Iterable[str]) -> list[str]:
    """The number/flag arguments a stored resumable run recorded with another value (paths and names are
    resolved by the writer, and a setting recorded as None did not apply: :func:`prepare` compares those)."""
    stored = get_run_config(dataset, run_key)
    return sorted(n for n, v in arguments.items() if stored.get(n) is not None and n not in set(ignore)
                  and isinstance(v, (bool, int, float)) and _jsonable(v) != stored[n])


def writer(method: str | None, resumable: bool = False, keys: Callable[[dict], dict] | None = None,
           ignore_for_rerun: Iterable[str] = ()):
    """Decorate a public writer: it runs holding its claims (:func:`claims.exclusive`), and its run key is
    checked and claimed (:func:`check_run_key`) before its body runs, so before any model is loaded or any
    folder or dataset created, in every writer alike.

    ``method``: the kind of run it records; ``resumable``: a rerun of the same
    kind may resume (its full config is compared later, by :func:`prepare`);
    ``keys(arguments) -> {run_key: method}`` when it records other or more
    keys than ``run_key`` (None skips one). The run lives on the samples'
    dataset, or on an existing ``target_dataset``; a shard's call is not
    checked (its job owns the run: :mod:`fairbalance.core.sharding`). A
    resumable run given other numbers or flags than it recorded (less
    ``ignore_for_rerun``) is refused here too, before the model is loaded.
    """

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a.get("shard") is None:
                samples = next(iter(a.values()))
                target = _existing_dataset(a["target_dataset"]) if a.get("target_dataset") is not None else samples
                for key, kind in (keys(a) if keys else {a.get("run_key"): method}).items():
                    if key is None or target is None or not hasattr(samples, "_root_dataset"):
                        continue
                    target = target._root_dataset
                    if check_run_key(target, key, kind, bool(a.get("overwrite")), resumable) and \
                            resumable and not a.get("overwrite"):
                        _refuse_other_config(target, key, _given_differences(target, key, a, ignore_for_rerun))
            return fn(*args, **kwargs)

        wrapped = claims.exclusive(checked)
        wrapped.run_method = method  # what the writer records (the contract test checks every writer has one)
        return wrapped

    return decorate


def _config_differences(stored: dict, config: dict, ignore: Iterable[str], defaults: dict | None = None) -> list[str]:
    """Keys whose values differ; a key an older version did not record counts as its ``defaults`` value."""
    new, defaults = jsonable(config), jsonable(defaults or {})
    return sorted(k for k in new if k not in set(ignore) and stored.get(k, defaults.get(k)) != new[k])


def prepare(
    samples,
    run_key: str,
    method: str,
    config: dict,
    fields: Iterable[str],
    overwrite: bool = False,
    rerun_same_config: bool = False,
    ignore_for_rerun: Iterable[str] = (),
    defaults_for_unrecorded: dict | None = None,
) -> PreparedRun:
    """Check that ``run_key`` (and ``fields``) may be (re)used before any work starts, and claim them.

    The run key and the fields are claimed (:mod:`fairbalance.core.claims`) for
    the running operation, so a second process using them at the same time
    is refused. A run key in use is refused unless ``overwrite=True``
    (replace that run's fields and record) or, for resumable operations
    (``rerun_same_config``: generation, diffusion training), the stored run
    has the same config (less ``ignore_for_rerun``): a rerun then resumes.
    ``defaults_for_unrecorded`` gives the value a config key had before a
    version that added it recorded it, so runs made then still resume.
    Fields that exist already must belong to this run key: another run's
    field, or a field no fairbalance run wrote, is never replaced.
    """
    validate_run_key(run_key)
    fields = list(fields)
    for f in fields:
        validation.require_field_name(f)
    dataset = samples._root_dataset
    exists = check_run_key(dataset, run_key, method, overwrite, resumable=rerun_same_config)
    for f in fields:
        claims.claim_field(dataset, f)
    resumed = False
    if exists:
        if not overwrite:
            differs = _config_differences(get_run_config(dataset, run_key), config, ignore_for_rerun,
                                          defaults_for_unrecorded)
            _refuse_other_config(dataset, run_key, differs)
            resumed = True
    owners = {f: key for key in list_runs(dataset) for f in get_run_config(dataset, key).get("fields_written", [])}
    schema = dataset.get_field_schema()
    clash = {f: owners.get(f) for f in fields if f in schema and owners.get(f) != run_key}
    if clash:
        desc = ", ".join(f"'{f}' (" + (f"written by run '{k}'" if k else "not written by fairbalance") + ")"
                         for f, k in clash.items())
        hint = ("delete that run or choose other field names" if any(clash.values())
                else "choose other field names (fairbalance never replaces fields it did not write)")
        raise validation.FairBalanceError(f"Field(s) {desc} already exist; {hint}")
    return PreparedRun(samples, run_key, method, dict(config), fields, overwrite, resumed)
