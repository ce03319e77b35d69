"""Object detection on the project's own building blocks: R-CNN (Girshick et al. 2014) and
Fast R-CNN (Girshick 2015).

- `detection.boxes`: IoU, the R-CNN box-regression parameterisation, greedy per-class NMS,
  box checks;
- `detection.scenes`: detection scenes (several objects per canvas, their boxes and classes)
  from the built-in generator and from Fashion-MNIST items, deterministic from a seed;
- `detection.proposals`: selective search (OpenCV contrib), cached on disk, proposal recall;
- `detection.evaluate`: COCO-style AP through pycocotools;
- `detection.rcnn`: R-CNN's warp of proposals with context padding (batched, jit-compiled)
  and its fine-tuning labels and 32 + 96 batches.

RoI max pooling is a layer kind (`models.kinds.RoiPool`, the op in `models.roi`).
"""
