"""fairbalance: find hidden imbalance and bias in image datasets and repair it.

Public API (each function takes a FiftyOne collection, validates its inputs
before doing any work, writes results in bulk and records a FiftyOne run):

- :func:`colored_digits`: the Colored Digits benchmark dataset
- :func:`colored_mnist`: Colored MNIST (LfF protocol) on 5,000 real MNIST digits
- :func:`compute_sa_features`: CLIP features for a text-specified sensitive attribute
- :func:`compute_pseudo_labels`: X-means pseudo-labels of those features
- :func:`balance_report`, :func:`entropy`, :func:`normalized_entropy`
"""

from fairbalance.balance import BalanceReport, balance_report, entropy, normalized_entropy
from fairbalance.datasets import colored_digits
from fairbalance.colored_mnist import colored_mnist  # the function shadows its module as an attribute
from fairbalance.clustering import xmeans
from fairbalance.models import ModelNotFoundError
from fairbalance.pseudo_labels import compute_pseudo_labels
from fairbalance.sa_features import compute_sa_features, get_related_texts
from fairbalance.validation import FairBalanceError

__version__ = "0.1.0"

__all__ = [
    "BalanceReport",
    "FairBalanceError",
    "ModelNotFoundError",
    "balance_report",
    "colored_digits",
    "colored_mnist",
    "compute_pseudo_labels",
    "compute_sa_features",
    "get_related_texts",
    "xmeans",
    "entropy",
    "normalized_entropy",
]
