"""Training recipes shared by several ``configs/*.py``: study C's fine-tuning from ImageNet MobileNetV2.

Study C (PAPERS.md) fine-tunes an ImageNet MobileNetV2 at 224 px with rotations and horizontal flips,
Adam, cosine annealing, early stopping on validation loss and *selective unfreezing*. What the study
leaves open and medjax chooses (each a config key, overridable):

* the unfreezing schedule, :data:`MOBILENET_V2_UNFREEZE`: the new classifier alone for ``head_epochs``
  (the backbone's ImageNet features are kept while the zero-initialised head finds its footing), then the
  last inverted-residual blocks (14-16, the 160/320-channel stage) with the 1x1 head convolution for as
  many epochs, then everything (``optim.unfreeze``, :mod:`medjax.unfreeze`);
* the weights: the only ImageNet MobileNetV2 available offline here, Keras' MobileNetV2 1.0/224 as a
  post-training-quantized TFLite file (BatchNorm folded), so the model takes Keras' padding and
  BatchNorm epsilon; the 1001-way ImageNet classifier is replaced (``init_from.reinit_head``);
* the input range: the study scales pixels to [0, 1]; the weights were trained on [-1, 1]
  (``input_range``, recorded in ``data.normalize``).
"""

import ml_collections

from medjax import config_lib

# The weights file below a weights folder (../shared/weights/ here); a user places it under
# ~/medjax_data/weights/ (or overrides init_from.path).
IMAGENET_MOBILENET_V2_FILE = "imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite"
IMAGENET_MOBILENET_V2 = f"~/medjax_data/weights/{IMAGENET_MOBILENET_V2_FILE}"

HEAD = ("classifier/.*",)
LAST_BLOCKS = ("block_1[4-6]/.*", "head_conv/.*", "head_bn/.*", "classifier/.*")

# data.normalize (applied after scaling to [0, 1]) for each input range.
INPUT_RANGES = {"unit": {"mean": 0.0, "std": 1.0}, "symmetric": {"mean": 0.5, "std": 0.5}}


def mobilenet_v2_unfreeze(head_epochs: float) -> tuple[dict, ...]:
    """Head for ``head_epochs``, then the last blocks for as long, then all (see the module docstring)."""
    return (
        {"epoch": 0.0, "trainable": HEAD},
        {"epoch": head_epochs, "trainable": LAST_BLOCKS},
        {"epoch": 2 * head_epochs, "trainable": None},
    )


def imagenet_mobilenet_v2_start(config: ml_collections.ConfigDict) -> None:
    """The model and weights of study C's start (in place): MobileNetV2 1.0 built to take the ImageNet
    file's weights (its classifier re-initialised), on RGB input. Also the student of a pretraining run
    that continues from ImageNet (``configs/pretrain.py:student=imagenet``)."""
    config.model_name = "mobilenet_v2"
    # Keras' MobileNetV2 pads stride-2 convolutions TensorFlow-style and uses BatchNorm epsilon 1e-3.
    # Momentum 0.99 (Keras' 0.999 would take thousands of steps to adapt the statistics to a new task).
    config.model = config_lib.model_config(
        "mobilenet_v2",
        width_multiplier=1.0,
        dropout_rate=0.2,
        padding_style="tf",
        bn_epsilon=1e-3,
        bn_momentum=0.99,
    )
    config.init_from.path = IMAGENET_MOBILENET_V2
    config.init_from.reinit_head = True
    config.data.channels = 3


def imagenet_mobilenet_v2(
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    head_epochs: float = 2.0,
    input_range: str = "unit",
    learning_rate: float = 1e-3,
) -> None:
    """Sets ``config`` to study C's fine-tuning recipe from ImageNet MobileNetV2 (in place).

    Model, weights, input range, augmentation (rotation 15 degrees, horizontal flips), Adam with cosine
    annealing, the unfreezing schedule and early stopping on validation loss (patience 3, counted in the
    last phase only). The dataset and the number of epochs are the caller's.

    Raises:
      ValueError: for an unknown ``input_range``.
    """
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {sorted(INPUT_RANGES)}, got {input_range!r}")
    imagenet_mobilenet_v2_start(config)
    config.data.image_size = image_size
    config.data.normalize = ml_collections.ConfigDict(INPUT_RANGES[input_range])
    config.data.augment.hflip = True
    config.data.augment.rotation_degrees = 15.0
    config.optim.name = "adam"
    config.optim.learning_rate = learning_rate
    config.optim.schedule = "cosine"
    config.optim.unfreeze = mobilenet_v2_unfreeze(head_epochs)
    config.train.select_best_on = "loss"
    config.train.early_stopping = ml_collections.ConfigDict(
        {"monitor": "loss", "patience": 3, "min_delta": 1e-3}
    )


# Reduced models of the three studies' families for 64x64 grey inputs, sized to train in minutes on 2 CPU
# cores (configs/chest_xray.py:scratch, configs/pretrain.py): study A's ConvNeXt head (avg+max pooling,
# SEVector) on depths 2-2-2-2 and widths 32-256, MedNeXt-PLOS at widths 24-192.
CPU_MODELS = {
    "mobilenet_v2": {"width_multiplier": 1.4, "dropout_rate": 0.2},
    "convnext": {
        "depths": (2, 2, 2, 2),
        "widths": (32, 64, 128, 256),
        "pooling": "avg+max",
        "sevector_ratio": 16,
        "drop_path_rate": 0.1,
    },
    "mednext_plos": {"widths": (24, 48, 96, 192), "depths": (1, 1, 2, 1)},
}

# The studies' own models at full size: study A's improved ConvNeXt-Tiny (configs/brain_mri.py) and study
# B's MedNeXt-PLOS tiny (mednext_plos_scratch), e.g. as students of configs/pretrain.py:student=study.
STUDY_MODELS = {
    "convnext": {
        "variant": "tiny",
        "pooling": "avg+max",
        "fusion": "concat",
        "sevector_ratio": 16,
        "drop_path_rate": 0.1,
    },
    "mednext_plos": {"variant": "tiny", "drop_path_rate": 0.1},
}


def from_scratch(config: ml_collections.ConfigDict) -> None:
    """Undoes the pretrained start (for ``:synthetic`` and ``:smoke`` variants, which have no weights):
    no weights file, no schedule."""
    config.init_from.path = None
    config.init_from.reinit_head = None
    config.optim.unfreeze = None


# CT slices gathered from many scanners and papers (UCSD COVID-CT, SARS-CoV-2 CT-scan) differ in crop,
# zoom and windowing, so beyond study C's rotations and flips the CT recipe adds crops and intensity jitter.
CT_AUGMENT = {
    "hflip": True,
    "rotation_degrees": 15.0,
    "random_resized_crop_scale": (0.75, 1.0),
    "brightness": 0.1,
    "contrast": 0.1,
}


def imagenet_ct(config: ml_collections.ConfigDict, *, image_size: int) -> None:
    """The ImageNet MobileNetV2 recipe for 2-class CT slices, chosen on UCSD COVID-CT's validation split
    (``results/ucsd_covid_ct.md``). It keeps study C's model, weights, Adam with cosine annealing and
    augmentation (plus :data:`CT_AUGMENT`) and departs from it where validation said so:

    * every layer trains from the first step at learning rate 1e-4, instead of the unfreezing schedule at
      1e-3 (validation AUC 0.835 against 0.787 at 160 px);
    * inputs in [-1, 1], the weights' own range (a linear probe of the ImageNet features: validation AUC
      0.67-0.69 against 0.63 in [0, 1]);
    * the best checkpoint and early stopping (patience 5) on validation AUC, not loss: on about a hundred
      validation slices the loss rose while the AUC climbed (over-confident errors), and selecting on loss
      kept the untrained head-only epoch.
    """
    imagenet_mobilenet_v2(config, image_size=image_size, input_range="symmetric", learning_rate=1e-4)
    config.optim.unfreeze = None
    config.data.augment.update(CT_AUGMENT)
    config.train.select_best_on = "auc"
    config.train.early_stopping.monitor = "auc"
    config.train.early_stopping.patience = 5


def mednext_plos_scratch(config: ml_collections.ConfigDict, *, image_size: int = 224) -> None:
    """Study B's model (``mednext_plos`` tiny) trained from scratch: AdamW 2e-3, weight decay 0.05, one
    warm-up epoch, cosine, drop path 0.1, flips and 10 degree rotations; 30 epochs, patience 5."""
    config.model_name = "mednext_plos"
    config.model = config_lib.model_config("mednext_plos", **STUDY_MODELS["mednext_plos"])
    from_scratch(config)
    config.data.image_size = image_size
    config.data.channels = 3
    config.data.normalize = ml_collections.ConfigDict(INPUT_RANGES["unit"])
    config.data.augment.hflip = True
    config.data.augment.rotation_degrees = 10.0
    config.optim.name = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = 30.0
    config.train.early_stopping.patience = 5
