"""Object detection on the project's own building blocks: R-CNN (Girshick et al. 2014) and
Fast R-CNN (Girshick 2015).

- `detection.boxes`: IoU, the R-CNN box-regression parameterisation, greedy per-class NMS,
  box checks;
- `detection.scenes`: detection scenes (several objects per canvas, their boxes and classes)
  from the built-in generator and from Fashion-MNIST items, deterministic from a seed;
- `detection.proposals`: selective search (OpenCV contrib), cached on disk, proposal recall;
- `detection.evaluate`: COCO-style AP through pycocotools;
- `detection.rcnn`: R-CNN's warp of proposals with context padding (batched, jit-compiled),
  its fine-tuning labels and 32 + 96 batches, and its network (a preset's classifier with
  K + 1 scores and a class-specific box regressor);
- `detection.fast_rcnn`: Fast R-CNN's network (a preset's conv layers, RoI pooling, FC
  layers, class and box outputs) and its multi-task loss;
- `detection.regions`: the scenes of a config, labelled training RoIs and each method's
  batches;
- `detection.train`: a detection run for the training library's loop (`training.loop`):
  set-up, steps, evaluation (per-class NMS, AP, test images/s), results;
  `python -m detection train|eval` (`detection.mode`: fast_rcnn | rcnn).

RoI max pooling is a layer kind (`models.kinds.RoiPool`, the op in `models.roi`).
"""
