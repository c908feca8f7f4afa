"""Training stages: each supplies a model, a loss and an export format to the shared loop."""
