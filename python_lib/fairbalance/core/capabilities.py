"""The one capability table: every capability of fairbalance, in the order of the road.

Each entry names the SDK function (``"module:function"``: resolved on first
use, so reading the table imports neither torch nor FiftyOne), its step on
the road, its command (a CLI subcommand on a dataset, a pipeline step that
creates the dataset, or a command of its own), whether it is an App operator
(under the same name: App name = SDK name) and how it is sharded. The CLI
subcommands (``ops.cli.CAPABILITIES``), the pipeline steps, ``SHARDABLE``
(``core.sharding``), the operators' order and step labels and the public
names of :mod:`fairbalance` are all made from it; ``tests/test_layout.py``
resolves every entry and checks it against ``fiftyone.yml``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Shardable:
    """A library function that takes ``shard``/``num_shards``: where it lives, what it writes."""

    function: str  # "module:function"
    method: str  # its run method
    fields: Callable[[dict], list[str]] | str  # the fields a run with these kwargs writes (or "module:function")
    merge: str  # "module:function" merging the shards of a finished job: merge(samples, job) -> results
    # what may run on the merged result, once, after the merge: name -> ("module:function", {its parameter:
    # the job's config key it defaults to}), e.g. X-means on all the SA features
    then: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    # "module:function" giving the samples whose ids the job is split over / checked against (default: the view);
    # a function that adds samples to the dataset (generation) names the view's own samples here
    job_view: str | None = None
    # "module:function(samples, run_key)" deleting what a run wrote besides its fields (overwrite=True)
    delete: str | None = None

    def load(self, what: str = "function") -> Callable:
        module, name = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), name)

    def written(self, kwargs: dict) -> list[str]:
        """The fields a run of this function with ``kwargs`` writes."""
        return (self.load("fields") if isinstance(self.fields, str) else self.fields)(kwargs)

    def job_ids(self, samples) -> list[str]:
        """The ids of the samples the job covers (what its digest is made of)."""
        return (self.load("job_view")(samples) if self.job_view else samples).values("id")


def parameter_default(function: str, name: str):
    """The default of parameter ``name`` of ``"module:function"`` (e.g. a writer's default run key)."""
    module, fn = function.split(":")
    return inspect.signature(getattr(importlib.import_module(module), fn)).parameters[name].default


def _generator(function: str, method: str) -> Shardable:
    """A generator's entry: new samples are added, no field is written (as the unsharded run records,
    ``fields_written=[]``); jobs are keyed on the view's real samples; one merge and one delete for all."""
    return Shardable(function, method, lambda kw: [], "fairbalance.generate.engine:merge_shards",
                     job_view="fairbalance.generate.engine:real_samples", delete="fairbalance.generate.engine:delete_generated")


@dataclass(frozen=True)
class Capability:
    """One capability: its SDK name (= App operator name), where it lives and how it is reached."""

    name: str
    function: str  # "module:function"
    step: str  # its step on the road ("1 find", ...): the App's operator browser lists operators in this order
    command: str | None = None  # its CLI subcommand or pipeline step
    command_kind: str = "dataset"  # "dataset": runs on a dataset/view; "creates": creates the pipeline's dataset;
    #                                "own": a command with its own arguments (check, export, run)
    operator: bool = True  # an App operator named ``name``
    shard: Shardable | None = None
    aliases: tuple[str, ...] = ()  # older SDK names, still exported

    def load(self) -> Callable:
        """The SDK function (an entry that does not import is an error, never skipped)."""
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


_F, _T, _G, _R, _D, _O = ("fairbalance.find", "fairbalance.tag", "fairbalance.generate", "fairbalance.train",
                          "fairbalance.datasets", "fairbalance.ops")

TABLE: tuple[Capability, ...] = (
    Capability("create_colored_digits", f"{_D}.colored_digits:colored_digits", "0 data", "colored-digits", "creates",
               aliases=("colored_digits",)),
    Capability("create_colored_mnist", f"{_D}.colored_mnist:colored_mnist", "0 data", "colored-mnist", "creates",
               aliases=("colored_mnist",)),
    Capability("create_corrupted_mnist", f"{_D}.corrupted_mnist:corrupted_mnist", "0 data", operator=False,
               aliases=("corrupted_mnist",)),  # (no pipeline data step yet: the benchmark builds it)
    Capability("audit_balance", f"{_F}.audit:audit_balance", "1 find", "audit-balance"),
    Capability("compute_sa_features", f"{_F}.sa_features:compute_sa_features", "1 find", "compute-sa-features",
               shard=Shardable(
                   f"{_F}.sa_features:compute_sa_features", "sa_features",
                   lambda kw: [kw.get("features_field") or parameter_default(f"{_F}.sa_features:compute_sa_features",
                                                                      "features_field")],
                   f"{_F}.sa_features:merge_shards",
                   then={"compute_pseudo_labels": (f"{_F}.pseudo_labels:compute_pseudo_labels",
                                                   {"features_field": "features_field"})})),
    Capability("compute_pseudo_labels", f"{_F}.pseudo_labels:compute_pseudo_labels", "1 find",
               "compute-pseudo-labels"),
    Capability("balance_report", f"{_F}.balance:balance_report", "1 find", "balance-report"),
    Capability("compute_hardness_tags", f"{_T}.hardness:compute_hardness_tags", "2 tag", "compute-hardness-tags",
               shard=Shardable(f"{_T}.hardness:compute_hardness_tags", "hardness", f"{_T}.hardness:shard_fields",
                               f"{_T}.hardness:merge_shards")),
    Capability("discover_slices", f"{_T}.discovery:discover_slices", "2 tag", "discover-slices",
               shard=Shardable(f"{_T}.discovery:discover_slices", "discover_slices", f"{_T}.discovery:shard_fields",
                               f"{_T}.discovery:merge_shards")),
    Capability("train_conditional_diffusion", f"{_G}.diffusion:train_conditional_diffusion", "3 generate",
               "train-conditional-diffusion"),
    Capability("generate_balanced", f"{_G}.generation:generate_balanced", "3 generate", "generate-balanced",
               shard=_generator(f"{_G}.generation:generate_balanced", "generate_balanced")),
    Capability("finetune_per_group", f"{_G}.lora.finetune:finetune_per_group", "3 generate", "finetune-per-group"),
    Capability("generate_per_group", f"{_G}.lora.generation:generate_per_group", "3 generate", "generate-per-group",
               shard=_generator(f"{_G}.lora.generation:generate_per_group", "generate_per_group")),
    Capability("inject_bias_conflicting", f"{_G}.diffinject:inject_bias_conflicting", "3 generate",
               "inject-bias-conflicting", shard=_generator(f"{_G}.diffinject:inject_bias_conflicting", "diffinject")),
    Capability("compute_captions", f"{_G}.captions:compute_captions", "3 generate", "compute-captions",
               shard=Shardable(
                   f"{_G}.captions:compute_captions", "captions",
                   lambda kw: [kw.get("caption_field") or parameter_default(f"{_G}.captions:compute_captions",
                                                                     "caption_field")],
                   f"{_G}.captions:merge_shards")),
    Capability("filter_captions", f"{_G}.captions:filter_captions", "3 generate", "filter-captions"),
    Capability("generate_from_captions", f"{_G}.text_to_image:generate_from_captions", "3 generate",
               "generate-from-captions",
               shard=_generator(f"{_G}.text_to_image:generate_from_captions", "text_to_image")),
    Capability("filter_generated", f"{_G}.filtering:filter_generated", "3 generate", "filter-generated"),
    Capability("measure_realism", f"{_G}.realism:measure_realism", "3 generate", "measure-realism"),
    Capability("train_classifier", f"{_R}.classifier:train_classifier", "4 train", "train-classifier"),
    Capability("apply_classifier", f"{_R}.classifier:apply_classifier", "5 verify", "apply-classifier"),
    Capability("evaluate_classifier", f"{_R}.classifier:evaluate_classifier", "5 verify", "evaluate-classifier",
               operator=False),
    Capability("check_balance", f"{_O}.gate:check_balance", "5 verify", "check", "own", operator=False),
    Capability("export_samples", f"{_O}.export:export_samples", "5 verify", "export", "own", operator=False),
    Capability("run_pipeline", f"{_O}.pipeline:run_pipeline", "6 all steps", "run", "own"),
)
# the App operators that are plumbing, not capabilities: a shard of a queued job, deleting a run, the notice of a
# dataset created from the App's home page (shown once its page is up)
PLUMBING_OPERATORS = ("compute_shard", "delete_run", "show_created_notice")

BY_NAME: dict[str, Capability] = {c.name: c for c in TABLE}
SHARDABLE: dict[str, Shardable] = {c.name: c.shard for c in TABLE if c.shard is not None}


def operator_names() -> list[str]:
    """The App operators in the order of the road, plumbing last: what ``fiftyone.yml`` lists."""
    return [c.name for c in TABLE if c.operator] + list(PLUMBING_OPERATORS)


def capabilities() -> tuple[Capability, ...]:
    """The capability table (:class:`Capability` entries, in the order of the road)."""
    return TABLE
