"""What the training loop needs besides the step itself: runtime set-up, optimizers,
checkpoints and metric outputs. `train.py` composes these; `eval.py` reuses them."""
