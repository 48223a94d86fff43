"""The plugin's operators: thin adapters that read the form and call the fairbalance library."""

import fairbalance


from .audit import AuditBalance
from .balance_report import BalanceReport
from .captions import ComputeCaptions, FilterCaptions, GenerateFromCaptions
from .classifier import ApplyClassifier, ComputeHardnessTags, TrainClassifier
from .colored_digits import CreateColoredDigits, CreateColoredMnist, ShowCreatedNotice
from .delete_run import DeleteRun
from .discovery import DiscoverSlices
from .diffinject import InjectBiasConflicting
from .diffusion import FilterGenerated, GenerateBalanced, TrainConditionalDiffusion
from .lora import FinetunePerGroup, GeneratePerGroup
from .pipeline import RunPipeline
from .pseudo_labels import ComputePseudoLabels
from .realism import MeasureRealism
from .sa_features import ComputeSAFeatures
from .sharding import ComputeShard

# operator name -> class; registered in the order of the road (the capability table), the plumbing operators last
_CLASSES = {
    "create_colored_digits": CreateColoredDigits,
    "create_colored_mnist": CreateColoredMnist,
    "audit_balance": AuditBalance,
    "compute_sa_features": ComputeSAFeatures,
    "compute_pseudo_labels": ComputePseudoLabels,
    "balance_report": BalanceReport,
    "compute_hardness_tags": ComputeHardnessTags,
    "discover_slices": DiscoverSlices,
    "train_conditional_diffusion": TrainConditionalDiffusion,
    "generate_balanced": GenerateBalanced,
    "finetune_per_group": FinetunePerGroup,
    "generate_per_group": GeneratePerGroup,
    "inject_bias_conflicting": InjectBiasConflicting,
    "compute_captions": ComputeCaptions,
    "filter_captions": FilterCaptions,
    "generate_from_captions": GenerateFromCaptions,
    "filter_generated": FilterGenerated,
    "measure_realism": MeasureRealism,
    "train_classifier": TrainClassifier,
    "apply_classifier": ApplyClassifier,
    "run_pipeline": RunPipeline,
}
OPERATORS = [_CLASSES[c.name] for c in fairbalance.capabilities() if c.operator] + [ComputeShard, DeleteRun,
                                                                                        ShowCreatedNotice]
