"""Evaluating a trained run (what `eval.py` runs), split by concern:

- `run`: loading a run from its workdir: config, a checkpoint read-only, data, eval step.
- `base`: what a measure is (`Measure`: its batch sums, eval.json fields, TensorBoard scalars,
  report lines, figures), its inputs, the registry by name, and the one jit-compiled pass over
  a split that sums what every measure needs.
- `measures`: the output measures (accuracy, calibration, speed, tta, shift, internals); it
  imports the per-layer ones, which register themselves:
- `invariance` (layer_invariance: invariance to shifts through the layers), `probes` (linear
  probes per layer), `patches` (top_patches: what each layer's units respond to);
- `taps`: reading a model's layers: the probe points, receptive-field windows, pooled features.
- `evaluate`: `evaluate_workdir` (the measures on a split, written to eval.json, figures and
  TensorBoard) and `format_report` (the terminal summary).
- `shift`: moving images by whole pixels (circular or zero fill), on the device.
- `internals`: what the layers do: which layers to draw, the first layer's filters, and
  pooling worked through with real numbers (a spatial window and a channel window).
- `figures`: the PNG files (matplotlib, no pyplot state).
"""

from evaluation.evaluate import evaluate_workdir, format_report, measure_names
from evaluation.run import Run, load_run

__all__ = ["Run", "evaluate_workdir", "format_report", "load_run", "measure_names"]
