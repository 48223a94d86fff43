"""fairbalance: find hidden imbalance and bias in image datasets and repair it.

Public API, in the order a user works (find -> tag -> generate -> train ->
verify); each function takes a FiftyOne collection, validates its inputs,
run key and output folder before doing any work, claims them while it runs
(a second writer gets :class:`ClaimError`), writes results in bulk, records
a FiftyOne run and returns a result with ``run_key`` and ``to_dict()``:

- data: :func:`create_colored_digits` (fast fixture), :func:`create_colored_mnist`
  (Colored MNIST, LfF protocol, on 5,000 real MNIST digits); also under their
  older names ``colored_digits`` and ``colored_mnist``; :func:`create_corrupted_mnist`
  (each class tied to a corruption type: a bias that is not colour; also ``corrupted_mnist``)
- find: :func:`audit_balance` (the three steps below in one call),
  :func:`compute_sa_features` (CLIP features for a text-specified
  sensitive attribute), :func:`compute_pseudo_labels` (X-means),
  :func:`balance_report`, :func:`entropy`, :func:`normalized_entropy`
- tag: :func:`compute_hardness_tags` (the errors or top-K losses of a GCE-biased model),
  :func:`discover_slices` (unnamed under-performing slices per class, with names)
- generate: :func:`train_conditional_diffusion`, :func:`generate_balanced`
  (clusters, or class x attribute cells), :func:`compute_captions`,
  :func:`filter_captions`, :func:`generate_from_captions` (text-to-image,
  DiffuBias), :func:`filter_generated`, :func:`finetune_per_group` +
  :func:`generate_per_group` (a LoRA / Clustered DreamBooth adapter per group),
  :func:`measure_realism` (can a classifier tell the generated from the real?)
- in an MLOps flow: :func:`check_balance` (a balance gate),
  :func:`export_samples` and :class:`TorchImageDataset` (the repaired set
  for a trainer elsewhere), :func:`load_pipeline` / :func:`run_pipeline`
  (pipeline files; also the ``fairbalance`` command)
- scale out: :func:`queue_sharded` (a job as n delegated operations, one per
  shard, for ``fiftyone delegated launch`` workers) and :func:`sharded_status`
- the table of all of them (name, function, step, command, operator, shards):
  :func:`capabilities`
- train / verify: :func:`train_classifier` (vanilla, JTT, LfF, real +
  generated, two-stage, GroupDRO / DFR on real or discovered groups), :func:`apply_classifier`, :func:`evaluate_classifier`
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from fairbalance.core.capabilities import TABLE as _TABLE  # strings only: imports neither torch nor FiftyOne

# Imported on first use (PEP 562), so `fairbalance --help` and light modules do not load torch and FiftyOne:
# public name -> (module, attribute). The capabilities (and their older names) come from the capability table;
# the other public names (results, errors, helpers) are listed here.
_OTHER = {
    'AuditResult': ('fairbalance.find.audit', 'AuditResult'),
    'BalanceReport': ('fairbalance.find.balance', 'BalanceReport'),
    'entropy': ('fairbalance.find.balance', 'entropy'),
    'normalized_entropy': ('fairbalance.find.balance', 'normalized_entropy'),
    'get_related_texts': ('fairbalance.find.sa_features', 'get_related_texts'),
    'xmeans': ('fairbalance.find.clustering', 'xmeans'),
    'RealismResult': ('fairbalance.generate.realism', 'RealismResult'),
    'TorchImageDataset': ('fairbalance.ops.export', 'TorchImageDataset'),
    'GateResult': ('fairbalance.ops.gate', 'GateResult'),
    'load_pipeline': ('fairbalance.ops.pipeline', 'load_pipeline'),
    'queue_sharded': ('fairbalance.core.sharding', 'queue_sharded'),
    'sharded_status': ('fairbalance.core.sharding', 'sharded_status'),
    'capabilities': ('fairbalance.core.capabilities', 'capabilities'),
    'ClaimError': ('fairbalance.core.claims', 'ClaimError'),
    'ModelNotFoundError': ('fairbalance.core.models', 'ModelNotFoundError'),
    'FairBalanceError': ('fairbalance.core.validation', 'FairBalanceError'),
}
_LAZY = {**{name: tuple(c.function.split(":")) for c in _TABLE for name in (c.name, *c.aliases)}, **_OTHER}
_SHADOWED = {"colored_mnist"}  # functions named like an old module path: importing that path must not replace them

# The flat module paths before the subpackages (``fairbalance.training``, ...) stay importable as aliases of the
# modules' new homes, so scripts that import them keep working. Stored runs and queued shard jobs record names
# (run methods, function names), not module paths; the one path a job document records (a generation's result
# class) is read through ``generate.engine.RESULT_CLASSES``, which knows the old spellings.
_MOVED = {
    "audit": "find.audit", "balance": "find.balance", "clustering": "find.clustering",
    "embeddings": "find.embeddings", "pseudo_labels": "find.pseudo_labels", "related_texts": "find.related_texts",
    "resources": "find.resources", "sa_features": "find.sa_features",
    "hardness": "tag.hardness",
    "captions": "generate.captions", "diffinject": "generate.diffinject", "diffusion": "generate.diffusion",
    "filtering": "generate.filtering", "generation": "generate.generation", "realism": "generate.realism",
    "text_to_image": "generate.text_to_image", "lora": "generate.lora.adapters",
    "lora_training": "generate.lora.finetune", "lora_generation": "generate.lora.generation",
    "classifier": "train.classifier", "training": "train.training",
    "claims": "core.claims", "config": "core.config", "distributed": "core.distributed", "fields": "core.fields",
    "folders": "core.folders", "images": "core.images", "models": "core.models", "runs": "core.runs",
    "sharding": "core.sharding", "summary_cache": "core.summary_cache", "validation": "core.validation",
    "writeback": "core.writeback",
    "colored_mnist": "datasets.colored_mnist",  # (``fairbalance.datasets``, Colored Digits, is now a package)
    "cli": "ops.cli", "demo": "ops.demo", "export": "ops.export", "gate": "ops.gate", "pipeline": "ops.pipeline",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import fairbalance.<old flat module>``: the module at its new path, under both names."""

    own_specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        self.own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_specs.pop(module.__spec__.name)  # already executed under its new name; keep its own spec


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the package attribute stays the function
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name not in _LAZY:  # a subpackage (fb.core, ...) or an old module path (fb.sharding, see _MOVED)
        if name.startswith("__"):
            raise AttributeError(f"module 'fairbalance' has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'fairbalance' has no attribute {name!r}") from None
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = sorted(_LAZY)
