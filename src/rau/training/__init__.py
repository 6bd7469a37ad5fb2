"""Training: one engine (:mod:`rau.training.engine`), one checkpoint format
(:mod:`rau.training.checkpoints`), one schedule and one loss log; a recipe per model family in
:mod:`rau.training.recipes` supplies the model and the loss of one step."""
