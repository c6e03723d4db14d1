"""Distillation from the dense model during search and retraining (``--distill``)."""
