"""UPop inside a ``transformers.Trainer``: :class:`UPopTrainerCallback`, :func:`add_upop`, distillation in the Trainer's loss, and what pruning does to the Trainer's objects."""
