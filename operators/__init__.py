"""The plugin's operators: thin adapters that read the form and call the fairbalance library."""

from .audit import AuditBalance
from .balance_report import BalanceReport
from .captions import ComputeCaptions, FilterCaptions, GenerateFromCaptions
from .classifier import ApplyClassifier, ComputeHardnessTags, TrainClassifier
from .colored_digits import CreateColoredDigits, CreateColoredMnist
from .diffinject import InjectBiasConflicting
from .diffusion import FilterGenerated, GenerateBalanced, TrainConditionalDiffusion
from .lora import FinetunePerGroup, GeneratePerGroup
from .pipeline import RunPipeline
from .pseudo_labels import ComputePseudoLabels
from .sa_features import ComputeSAFeatures

OPERATORS = [
    CreateColoredDigits,
    CreateColoredMnist,
    ComputeSAFeatures,
    ComputePseudoLabels,
    BalanceReport,
    AuditBalance,
    TrainConditionalDiffusion,
    GenerateBalanced,
    FilterGenerated,
    FinetunePerGroup,
    GeneratePerGroup,
    InjectBiasConflicting,
    ComputeCaptions,
    FilterCaptions,
    GenerateFromCaptions,
    ComputeHardnessTags,
    TrainClassifier,
    ApplyClassifier,
    RunPipeline,
]
