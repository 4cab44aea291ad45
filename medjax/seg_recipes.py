"""What every segmentation config shares: the two models, the synthetic and smoke variants.

``configs/{drive,synapse,acdc,seg_folder}.py`` start from :func:`segmentation_config` and state only
their dataset and recipe. Models (``model=`` in the config argument):

* ``unet``: the plain 2-D U-Net baseline (:mod:`medjax.models.unet`), four levels of 16-128 channels by
  default (Ronneberger's 64-1024 is 30x the compute, too much for training at full resolution on a CPU);
* ``mednext``: Study B's MedNeXt encoder with a U-shaped decoder (:mod:`medjax.models.mednext_plos_seg`).
"""

import ml_collections

from medjax import config_lib

MODELS = {"unet": "unet", "mednext": "mednext_plos_seg"}


def model_settings(model: str, *, size: str = "default") -> tuple[str, ml_collections.ConfigDict]:
    """``(model_name, config.model)`` of a model choice at ``size`` 'default' or 'smoke'."""
    if model not in MODELS:
        raise ValueError(f"Unknown segmentation model {model!r}; use one of {', '.join(MODELS)}.")
    name = MODELS[model]
    if model == "unet":
        widths = (16, 32, 64, 128) if size == "default" else (4, 8)
        return name, config_lib.model_config(name, widths=widths)
    if size == "default":
        return name, config_lib.model_config(name, widths=(32, 64, 128, 256), depths=(1, 1, 2, 1))
    return name, config_lib.model_config(
        name, widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1)
    )


def segmentation_config(name: str, model: str) -> ml_collections.ConfigDict:
    """``base_config(task='segmentation')`` with the chosen model and the shared optimizer settings."""
    config = config_lib.base_config(task="segmentation")
    config.name = name
    config.model_name, config.model = model_settings(model)
    config.optim.name = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 1e-4
    config.train.select_best_on = "mean_dice"
    return config


def use_synthetic_segmentation(config: ml_collections.ConfigDict, *, image_size: int = 64) -> None:
    """Switches to ``synthetic_ct`` lesion masks (GENERATED CT-like slices, not medical data): whole
    64x64 images as patches, one grey channel, half the slices without a lesion."""
    config_lib.use_synthetic_data(config, image_size=image_size)
    config.data.builder_kwargs.task = "segmentation"
    config.data.patch_size = image_size
    config.data.foreground_prob = 0.0  # Whole images: the patch is the image.
    config.data.cache_decoded = True
    config.data.batch_size = 16
    config.data.eval_batch_size = 50
    config.data.augment.hflip = True
    config.data.augment.vflip = False
    config.data.augment.rotation_degrees = 0.0
    config.data.augment.elastic_alpha = 0.0
    config.data.augment.scale = (1.0, 1.0)
    config.data.augment.brightness = 0.0
    config.data.augment.contrast = 0.0
    config.eval.window = None
    config.loss.dice.batch = True  # Half the slices have no lesion (see losses.dice).


def apply_variant(config: ml_collections.ConfigDict, variant: str, model: str) -> ml_collections.ConfigDict:
    """Every segmentation config's variants: 'real' (as is), 'synthetic' (the offline demo's recipe) or
    'smoke'; returns ``config``.

    Raises:
      ValueError: for another variant.
    """
    if variant == "synthetic":
        use_synthetic_segmentation(config, image_size=64)
        config.train.num_epochs = 3.0
        config.train.eval_every_epochs = 1.0
        config.optim.learning_rate = 6e-3  # Chosen on validation: 2e-3 had not left Dice 0 by step 300.
        config.optim.warmup_epochs = 0.5
    elif variant == "smoke":
        make_smoke(config, model)
    elif variant != "real":
        raise ValueError(f"Unknown variant {variant!r} of {config.name}; use real, synthetic or smoke.")
    return config


def make_smoke(config: ml_collections.ConfigDict, model: str) -> None:
    """Seconds on tiny synthetic data at 32 px with a tiny model, for tests."""
    config_lib.make_smoke(config)
    use_synthetic_segmentation(config, image_size=32)
    config.data.builder_kwargs.update({"num_train": 64, "num_validation": 24, "num_test": 24})
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.model_name, config.model = model_settings(model, size="smoke")


def volume_config(name: str, arg: str | None, *, layout: str, default_dir: str) -> ml_collections.ConfigDict:
    """``configs/synapse.py`` and ``configs/acdc.py``: NIfTI volumes of ``layout`` as 224x224 slices
    (TransUNet's protocol), whole slices as patches, rotation and zoom."""
    args = config_lib.parse_arg(arg, variant="real", model="mednext")
    config = segmentation_config(name, args.model)
    config.data.name = "nifti_volumes"
    config.data.manual_dir = default_dir
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {
            "layout": layout,
            "resample": "size",
            "image_size": 224,
            "slices": "foreground",
            "validation_fraction": 0.1,
        }
    )
    config.data.image_size = 224
    config.data.patch_size = 224
    config.data.foreground_prob = 0.0  # Whole slices (foreground slices only in train and validation).
    config.data.channels = 1
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    config.data.batch_size = 16
    config.data.eval_batch_size = 16
    config.data.augment.update({"hflip": False, "rotation_degrees": 20.0, "scale": (0.9, 1.1)})
    config.train.num_epochs = 100.0
    config.train.eval_every_epochs = 5.0
    config.optim.warmup_epochs = 2.0
    return apply_variant(config, args.variant, args.model)
