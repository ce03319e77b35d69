"""Detection (R-CNN, Girshick et al. 2014, arXiv 1311.2524; Fast R-CNN, Girshick 2015, arXiv
1504.08083) on scenes of the built-in shapes, of Fashion-MNIST items or PASCAL VOC 2007's
photographs, with a project classifier as the network.

    python -m detection train --config=configs/detection.py:pooled_max --workdir=runs/det
    python -m detection train --config=configs/detection.py:resnet20,fashion_mnist ...
    python -m detection train --config=configs/detection.py:pooled_max,builtin,rcnn ...
    python -m detection train --config=configs/detection.py:pooled_max,voc2007 \
        --config.dataset.source=files --config.dataset.data_dir=~/voc ...

The argument names the model preset (`models.PRESETS`), then optionally the scenes:
`builtin` (default: the built-in dataset's shapes, no files), `fashion_mnist`
(Fashion-MNIST items from the official idx files, `dataset.data_dir`) or `voc2007` (PASCAL
VOC 2007, `detection/voc.py`: trainval to train, test to test; each image stretched to
detection.image_size square, difficult objects left out), then optionally the method
(`detection.mode`): `fast_rcnn` (default) or `rcnn`. VOC 2007 is read as
`dataset.source` says: 'tfds' reads TFDS 'voc/2007' prepared as array_record in
`dataset.data_dir` ('' = TFDS's default, ~/tensorflow_datasets; preparing needs internet and
TensorFlow: `tfds build voc/2007 --file_format=array_record`); 'files' reads the official
VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (or the VOCdevkit folder they extract
to) in the folder `dataset.data_dir`, offline; 'auto' (default) the files when that folder
holds them, else TFDS. Every section of `configs/base.py` keeps its meaning (model,
optimizer, schedule, training, distributed; the batch is `training.batch_size` images);
`dataset.name` picks the scenes' objects and `dataset.data_dir` their files. The other
dataset fields (sizes, crop augmentation, on_device) are the classification pipeline's and
unused here. The `detection` section below
holds everything detection adds, each field with its source.
"""

import ml_collections

from configs import base, fashion_mnist

SCENES = ("builtin", "fashion_mnist", "voc2007")
MODES = ("fast_rcnn", "rcnn")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the detection config for `arg` = 'PRESET[,SCENES[,MODE]]'."""
    from errors import UserError

    preset, scenes, mode, *rest = [*(arg or "pooled_max").split(","), "", ""]
    c = base.get_config(preset or "pooled_max")
    scenes, mode = scenes or "builtin", mode or "fast_rcnn"
    if scenes not in SCENES:
        raise UserError(f"detection scenes {scenes!r}: choose one of {', '.join(SCENES)}")
    if any(rest):
        raise UserError(f"detection config {arg!r}: the argument is PRESET[,SCENES[,MODE]]")
    if mode not in MODES:
        raise UserError(f"detection method {mode!r}: choose one of {', '.join(MODES)}")
    c.dataset.name = scenes
    if scenes == "fashion_mnist":
        c.dataset.source = "files"
        c.dataset.data_dir = fashion_mnist.DEBIAN_DIR
    c.dataset.augment_crop_padding = 0  # unused: detection flips only (detection.flip)

    # Each step trains on training.batch_size x detection.rois_per_image = 128 RoIs, 25 %
    # foreground, in both modes: Fast R-CNN takes them from N = training.batch_size images
    # (paper: 2 x 64), R-CNN draws them over every training image (paper: 32 + 96 of 128)
    c.training.batch_size = 2
    c.training.eval_batch_size = 8  # test images per forward pass
    c.training.num_steps = 1_500
    c.training.eval_every_steps = 500
    c.training.checkpoint_every_steps = 250
    c.training.log_every_steps = 50
    c.schedule.warmup_steps = 50
    c.optimizer.learning_rate = 1e-3

    d = c.detection = ml_collections.ConfigDict()
    # fast_rcnn: one feature map per image, RoI pooling (Girshick 2015); rcnn: every proposal
    # warped to the classifier's input and classified on its own (Girshick et al. 2014)
    d.mode = mode
    # --- scenes (detection/scenes.py) -------------------------------------------------------
    d.image_size = 96  # side of the square scenes, pixels (VOC: each photograph stretched to it)
    d.train_scenes = 1_000  # training scenes (training items only, for Fashion-MNIST)
    d.test_scenes = 200  # test scenes (test items only, for Fashion-MNIST)
    if scenes == "voc2007":  # all of VOC 2007 trainval and test; fewer: the first N of each
        d.train_scenes, d.test_scenes = 5_011, 4_952
    # scenes held out of the training stream (own seed, training items) for model selection;
    # 0: the periodic evaluation uses the test scenes (dataset.eval_split must be 'test')
    d.validation_scenes = 0
    d.flip = True  # horizontal flip of training scenes with p = 0.5 (the paper's only one)

    # --- proposals (detection/proposals.py: selective search) -------------------------------
    d.proposal_mode = "fast"  # fast | quality (Uijlings et al. 2013, as OpenCV names them)
    d.proposal_upscale = 2.0  # the scene is resized by this before the search (small images)
    d.max_proposals = 500  # cap per image
    # where each image's proposals are kept, one file per (image, settings); '' =
    # ~/.cache/convnets/proposals ($XDG_CACHE_HOME honoured)
    d.proposal_cache = ""
    d.test_proposals = 300  # the first (highest-ranked) proposals scored per test image

    # --- RoI sampling (Fast R-CNN section 2.3, "mini-batch sampling") ------------------------
    d.rois_per_image = 64  # R / N (paper: 128 RoIs from N = 2 images, 64 each)
    d.foreground_fraction = 0.25  # RoIs with IoU >= foreground_iou (paper: 25 %)
    d.foreground_iou = 0.5
    # background: max IoU in [background_iou_low, foreground_iou) (paper: [0.1, 0.5));
    # when an image has too few, the lower bound drops to 0
    d.background_iou_low = 0.1

    # --- the network (Fast R-CNN section 2) ---------------------------------------------------
    # Fast R-CNN: the backbone is the preset's layers up to its last spatial layer that does
    # not depend on the number of classes; a final max pooling there is replaced by the RoI
    # pooling (section 2.3: VGG16's pool5 becomes the RoI pooling layer). R-CNN: the whole
    # preset with K + 1 outputs, plus the box regressor on the features before them.
    # the workdir of a classification run (train.py) of the same model preset whose best
    # checkpoint initialises the backbone (the paper starts from ImageNet classifiers); '':
    # the backbone starts from random weights; '{seed}' in it stands for the run's seed
    d.backbone_workdir = ""
    # what the inputs are normalised by: 'scenes' (the training scenes' per-channel mean and
    # std) or 'backbone' (those of the backbone classifier's training images, as it learned)
    d.input_stats = "scenes"
    # the BatchNorm layers of a backbone that has them: 'train' (statistics of each training
    # batch, running averages updated, as in the classifier's training) or 'frozen' (the
    # classifier's running statistics, kept; scale and offset still learn): a detector's
    # batches (two scenes, or 128 warped regions, mostly background) are not the images the
    # statistics were learned on
    d.batchnorm = "train"
    # R-CNN: the side of the warped regions, the classifier's input; 0 = the image size of
    # the scenes' classification dataset (builtin: dataset.builtin_image_size, 32;
    # fashion_mnist: 28; voc2007: CIFAR-10's 32), so a classifier trained by train.py on it
    # fits (paper: 227)
    d.warp_size = 0
    d.roi_size = 7  # the RoI pooling grid H x W (paper: 7 x 7 for VGG16)
    # 'max': RoI max pooling, the region's edges rounded to feature-map cells (Fast R-CNN);
    # 'align': RoIAlign, no rounding, each bin the max of 2 x 2 bilinear samples (He et al.
    # 2017, Mask R-CNN section 3; models/roi.py)
    d.roi_pool = "max"
    # Fast R-CNN's image pyramid (section 5.2, "multi-scale"): the backbone runs on the image
    # resized by each of these factors, and each RoI is pooled from the level where its size
    # (square root of its area, scaled) is closest to pyramid_target pixels, in training as at
    # test (detection/fast_rcnn.py). (1.0,): one scale, the image as it is (the paper's
    # default). pyramid_target 0: the size at which R-CNN's warp shows a region to the
    # classifier (the warp size less twice the context padding: 24 px at 28)
    d.pyramid_scales = (1.0,)
    d.pyramid_target = 0.0
    # Fast R-CNN: pool each RoI with the context R-CNN's warp gives it (the box scaled about
    # its centre by the warp size over the warp size less twice the context padding: 28/24 at
    # 28; detection/fast_rcnn.py). False: the RoI as it is (the paper's Fast R-CNN)
    d.roi_context = False
    # Fast R-CNN: the FC layers after the RoI pooling (paper: 4096, 4096)
    d.hidden_widths = (256, 256)
    d.hidden_dropout = 0.5  # dropout after each of them (paper: VGG16's 0.5)
    # loss = cross-entropy + bbox_loss_weight x smooth L1 on the foreground RoIs (eq. 1, lambda
    # = 1); targets divided by these standard deviations (tx, ty, tw, th), as the paper's code
    d.bbox_loss_weight = 1.0
    d.bbox_target_std = (0.1, 0.1, 0.2, 0.2)

    # --- R-CNN's class scores (detection/svm.py) ----------------------------------------------
    # 'softmax': the fine-tuned network's (as Fast R-CNN); 'svm': the paper's per-class linear
    # SVMs on the fine-tuned features, with hard negative mining (section 2.3, appendix B)
    d.rcnn_scores = "softmax"
    d.svm_train_scenes = 200  # training scenes whose regions the SVMs are fitted on
    d.svm_negative_iou = 0.3  # negatives: IoU below this with every object of the class
    d.svm_positive_weight = 2.0  # the paper's w1
    d.svm_cache_size = 5000  # hard negatives kept per class
    d.svm_mining_rounds = 3  # fits, each followed by a pass over all negatives
    # the L2 penalty (on standardised features, per weighted example): the paper's liblinear
    # C = 0.001 on features scaled to a mean norm of 20, over a cache of ~5,000 examples,
    # is about 0.01 here (1 / (C N), times the squared per-feature scale 20^2 / D)
    d.svm_weight_decay = 0.01

    # --- test time (section 3 / 4: per-class NMS) ---------------------------------------------
    d.nms_iou = 0.3  # greedy per-class NMS threshold (R-CNN's 0.3)
    # class scores below this are not detections (py-faster-rcnn test_net and Detectron: 0.05)
    d.score_threshold = 0.05
    d.max_detections = 100  # per image, after NMS (COCO's maximum)
    return c
