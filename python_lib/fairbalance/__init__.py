"""fairbalance: find hidden imbalance and bias in image datasets and repair it.

Public API, in the order a user works (find -> tag -> generate -> train ->
verify); each function takes a FiftyOne collection, validates its inputs,
run key and output folder before doing any work, claims them while it runs
(a second writer gets :class:`ClaimError`), writes results in bulk, records
a FiftyOne run and returns a result with ``run_key`` and ``to_dict()``:

- data: :func:`colored_digits` (fast fixture), :func:`colored_mnist` (Colored
  MNIST, LfF protocol, on 5,000 real MNIST digits), :func:`corrupted_mnist`
  (each class tied to a corruption type: a bias that is not colour)
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
- train / verify: :func:`train_classifier` (vanilla, JTT, LfF, real +
  generated, two-stage), :func:`apply_classifier`, :func:`evaluate_classifier`
"""

import importlib
import sys
import types

# Imported on first use (PEP 562), so `fairbalance --help` and light modules do not load torch and FiftyOne:
# public name -> (module, attribute)
_LAZY = {
    'AuditResult': ('fairbalance.audit', 'AuditResult'),
    'audit_balance': ('fairbalance.audit', 'audit_balance'),
    'BalanceReport': ('fairbalance.balance', 'BalanceReport'),
    'balance_report': ('fairbalance.balance', 'balance_report'),
    'entropy': ('fairbalance.balance', 'entropy'),
    'normalized_entropy': ('fairbalance.balance', 'normalized_entropy'),
    'compute_captions': ('fairbalance.captions', 'compute_captions'),
    'filter_captions': ('fairbalance.captions', 'filter_captions'),
    'ClaimError': ('fairbalance.claims', 'ClaimError'),
    'apply_classifier': ('fairbalance.classifier', 'apply_classifier'),
    'evaluate_classifier': ('fairbalance.classifier', 'evaluate_classifier'),
    'train_classifier': ('fairbalance.classifier', 'train_classifier'),
    'xmeans': ('fairbalance.clustering', 'xmeans'),
    'colored_mnist': ('fairbalance.colored_mnist', 'colored_mnist'),
    'corrupted_mnist': ('fairbalance.corrupted_mnist', 'corrupted_mnist'),
    'colored_digits': ('fairbalance.datasets', 'colored_digits'),
    'discover_slices': ('fairbalance.discovery', 'discover_slices'),
    'inject_bias_conflicting': ('fairbalance.diffinject', 'inject_bias_conflicting'),
    'train_conditional_diffusion': ('fairbalance.diffusion', 'train_conditional_diffusion'),
    'TorchImageDataset': ('fairbalance.export', 'TorchImageDataset'),
    'export_samples': ('fairbalance.export', 'export_samples'),
    'filter_generated': ('fairbalance.filtering', 'filter_generated'),
    'GateResult': ('fairbalance.gate', 'GateResult'),
    'check_balance': ('fairbalance.gate', 'check_balance'),
    'generate_balanced': ('fairbalance.generation', 'generate_balanced'),
    'compute_hardness_tags': ('fairbalance.hardness', 'compute_hardness'),
    'generate_per_group': ('fairbalance.lora_generation', 'generate_per_group'),
    'finetune_per_group': ('fairbalance.lora_training', 'finetune_per_group'),
    'ModelNotFoundError': ('fairbalance.models', 'ModelNotFoundError'),
    'load_pipeline': ('fairbalance.pipeline', 'load_pipeline'),
    'run_pipeline': ('fairbalance.pipeline', 'run_pipeline'),
    'compute_pseudo_labels': ('fairbalance.pseudo_labels', 'compute_pseudo_labels'),
    'RealismResult': ('fairbalance.realism', 'RealismResult'),
    'measure_realism': ('fairbalance.realism', 'measure_realism'),
    'compute_sa_features': ('fairbalance.sa_features', 'compute_sa_features'),
    'get_related_texts': ('fairbalance.sa_features', 'get_related_texts'),
    'queue_sharded': ('fairbalance.sharding', 'queue_sharded'),
    'sharded_status': ('fairbalance.sharding', 'sharded_status'),
    'generate_from_captions': ('fairbalance.text_to_image', 'generate_from_captions'),
    'FairBalanceError': ('fairbalance.validation', 'FairBalanceError'),
}
_SHADOWED = {"colored_mnist", "corrupted_mnist"}  # functions named like their module: importing the module must not replace them


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the package attribute stays the function
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name not in _LAZY:  # a submodule (fb.sharding, ...), as when every module was imported up front
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

__all__ = [
    "AuditResult",
    "BalanceReport",
    "ClaimError",
    "FairBalanceError",
    "GateResult",
    "ModelNotFoundError",
    "RealismResult",
    "TorchImageDataset",
    "apply_classifier",
    "audit_balance",
    "balance_report",
    "check_balance",
    "colored_digits",
    "colored_mnist",
    "compute_captions",
    "compute_hardness_tags",
    "compute_pseudo_labels",
    "compute_sa_features",
    "corrupted_mnist",
    "discover_slices",
    "entropy",
    "evaluate_classifier",
    "export_samples",
    "filter_captions",
    "filter_generated",
    "finetune_per_group",
    "generate_balanced",
    "generate_from_captions",
    "generate_per_group",
    "get_related_texts",
    "inject_bias_conflicting",
    "load_pipeline",
    "measure_realism",
    "normalized_entropy",
    "queue_sharded",
    "run_pipeline",
    "sharded_status",
    "train_classifier",
    "train_conditional_diffusion",
    "xmeans",
]
