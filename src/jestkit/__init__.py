"""jestkit: joint example selection (JEST) for contrastive image-text pretraining."""

from jestkit.models import sigmoid_loss
from jestkit.scoring import (
    easy_reference,
    hard_learner,
    learnability,
    pairwise_sigmoid_loss,
    pairwise_softmax_loss,
    uniform,
)
from jestkit.selection import (
    JointSelector,
    ModelEmbeddings,
    chunk_sizes,
    independent_select,
    joint_select,
    uniform_select,
)

__version__ = "0.1.0"

__all__ = [
    "JointSelector",
    "ModelEmbeddings",
    "chunk_sizes",
    "easy_reference",
    "hard_learner",
    "independent_select",
    "joint_select",
    "learnability",
    "pairwise_sigmoid_loss",
    "pairwise_softmax_loss",
    "sigmoid_loss",
    "uniform",
    "uniform_select",
]
