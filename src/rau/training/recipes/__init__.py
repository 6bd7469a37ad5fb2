"""Training recipes: per model family, the batch and the loss of one step, run by
:func:`rau.training.engine.run_training`."""
