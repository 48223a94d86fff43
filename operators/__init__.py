"""The plugin's operators: thin adapters that read the form and call the fairbalance library."""

from .audit import AuditBalance
from .balance_report import BalanceReport
from .captions import ComputeCaptions, FilterCaptions, GenerateFromCaptions
from .classifier import ApplyClassifier, ComputeHardnessTags, TrainClassifier
from .colored_digits import CreateColoredDigits, CreateColoredMnist
from .delete_run import DeleteRun
from .diffinject import InjectBiasConflicting
from .discovery import DiscoverSlices
from .diffusion import FilterGenerated, GenerateBalanced, TrainConditionalDiffusion
from .lora import FinetunePerGroup, GeneratePerGroup
from .pipeline import RunPipeline
from .pseudo_labels import ComputePseudoLabels
from .sa_features import ComputeSAFeatures
from .sharding import ComputeShard

OPERATORS = [  # in the order of the road (operators/_common.py ROAD): the operator browser keeps it within a step
    CreateColoredDigits,
    CreateColoredMnist,
    AuditBalance,
    ComputeSAFeatures,
    ComputePseudoLabels,
    BalanceReport,
    ComputeHardnessTags,
    DiscoverSlices,
    TrainConditionalDiffusion,
    GenerateBalanced,
    FinetunePerGroup,
    GeneratePerGroup,
    InjectBiasConflicting,
    ComputeCaptions,
    FilterCaptions,
    GenerateFromCaptions,
    FilterGenerated,
    TrainClassifier,
    ApplyClassifier,
    RunPipeline,
    ComputeShard,
    DeleteRun,
]
