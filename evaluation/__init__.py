"""What `eval.py` measures on a trained model, split by concern:

- `shift`: moving images by whole pixels (circular or zero fill), on the device.
- `metrics`: one jit-compiled pass over a split that sums everything eval reports (confusion
  matrix, calibration bins, flip test-time augmentation, the shift curves, the random-pair
  consistency), and the function that turns those sums into the report's numbers.
- `internals`: what the layers do: which layers to draw, the first layer's filters, and one
  pooling window worked through with real numbers.
- `figures`: the PNG files (matplotlib, no pyplot state).
"""
