"""jestkit: joint example selection (JEST) for contrastive image-text pretraining."""

__version__ = "0.1.0"
