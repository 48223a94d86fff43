"""fairbalance: find hidden imbalance and bias in image datasets and repair it.

Public API, in the order a user works (find -> tag -> generate -> train ->
verify); each function takes a FiftyOne collection, validates its inputs,
run key and output folder before doing any work, claims them while it runs
(a second writer gets :class:`ClaimError`), writes results in bulk, records
a FiftyOne run and returns a result with ``run_key`` and ``to_dict()``:

- data: :func:`colored_digits` (fast fixture), :func:`colored_mnist` (Colored
  MNIST, LfF protocol, on 5,000 real MNIST digits)
- find: :func:`audit_balance` (the three steps below in one call),
  :func:`compute_sa_features` (CLIP features for a text-specified
  sensitive attribute), :func:`compute_pseudo_labels` (X-means),
  :func:`balance_report`, :func:`entropy`, :func:`normalized_entropy`
- tag: :func:`compute_hardness_tags` (the errors or top-K losses of a GCE-biased model)
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

from fairbalance.audit import AuditResult, audit_balance
from fairbalance.balance import BalanceReport, balance_report, entropy, normalized_entropy
from fairbalance.captions import compute_captions, filter_captions
from fairbalance.claims import ClaimError
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.clustering import xmeans
from fairbalance.colored_mnist import colored_mnist  # the function shadows its module as an attribute
from fairbalance.datasets import colored_digits
from fairbalance.diffinject import inject_bias_conflicting
from fairbalance.diffusion import train_conditional_diffusion
from fairbalance.export import TorchImageDataset, export_samples
from fairbalance.filtering import filter_generated
from fairbalance.gate import GateResult, check_balance
from fairbalance.generation import generate_balanced
from fairbalance.hardness import compute_hardness as compute_hardness_tags
from fairbalance.lora_generation import generate_per_group
from fairbalance.lora_training import finetune_per_group
from fairbalance.models import ModelNotFoundError
from fairbalance.pipeline import load_pipeline, run_pipeline
from fairbalance.pseudo_labels import compute_pseudo_labels
from fairbalance.realism import RealismResult, measure_realism
from fairbalance.sa_features import compute_sa_features, get_related_texts
from fairbalance.sharding import queue_sharded, sharded_status
from fairbalance.text_to_image import generate_from_captions
from fairbalance.validation import FairBalanceError

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
