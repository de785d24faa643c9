"""msm: compile a Model Spec into a midtraining corpus, then train and evaluate on it."""

__version__ = "0.1.0"
