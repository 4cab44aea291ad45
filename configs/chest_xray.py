"""Study C: MobileNetV2 for pneumonia on the Kermany pediatric chest X-ray (NORMAL vs PNEUMONIA).

The default is study C's recipe from the ImageNet start (:func:`medjax.recipes.imagenet_mobilenet_v2`):
MobileNetV2 1.0 at 224x224 with ImageNet weights, pixels scaled to [0, 1], random rotations and
horizontal flips, Adam with cosine annealing, selective unfreezing as a schedule (the new classifier for
2 epochs, then the last blocks for 2, then all), early stopping on validation loss. Validation is 20 % of
the official train split carved **by patient** (the ``personNNNN_`` / ``IM-NNNN`` file-name keys; the
builder's ``group_pattern``), so no child is on both sides; the official test split is kept.

Weights: ``init_from.path`` defaults to
``~/medjax_data/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite`` (Keras MobileNetV2
1.0/224, quantized TFLite; see ../shared/data/README.md for its provenance). With the copy in
../shared, as in the example below:
``--config.init_from.path=../shared/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite``.

Variants (``--config=configs/chest_xray.py:<variant>``):
  (none)     the recipe above on the real archive under ``data.manual_dir`` (default
             ``~/medjax_data/chest_xray``), laid out as ``[chest_xray/]train|test[|val]/NORMAL|PNEUMONIA/*``.
             With the copy in ../shared/data: ``--config.data.manual_dir=../shared/data/chest_xray``.
  cpu        the same recipe at 224x224 sized for 2 CPU cores in about 30 minutes: 5 epochs, the head
             alone for 1 epoch and the last blocks for 1, then all for 3.
  cohort     study C's recipe hardened for a test cohort other than the training one (results/
             chest_xray_imagenet.md): CT's random resized crops and brightness/contrast jitter
             (``recipes.CT_AUGMENT``), a class-balanced loss (the train split is 74 % pneumonia), and Adam at
             1e-4 instead of 1e-3 (at 8e-4 the all-layer epochs made the validation loss jump tenfold).
  scratch    the real archive at a CPU-feasible 64x64 grey, trained from scratch, with ``model=`` one of
             the three studies' families: ``mobilenet_v2`` (width 1.4), ``convnext`` (study A's head:
             avg+max pooling, SEVector, depths 2-2-2-2, widths 32-256) or ``mednext_plos`` (widths 24-192,
             depths 1-1-2-1), e.g. ``--config=configs/chest_xray.py:variant=scratch,model=convnext``.
             This is what ``launch/reproduce.py`` runs for RESULTS.md.
  synthetic  MobileNetV2 (width 0.35) from scratch on generated ``synthetic_ct`` slices (not medical
             data), 64x64.
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/chest_xray.py:cpu \\
      --config.data.manual_dir=../shared/data/chest_xray \\
      --config.init_from.path=../shared/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite
"""

import ml_collections

from medjax import config_lib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real", model="mobilenet_v2")
    config = config_lib.base_config()
    config.name = "chest_xray"
    config.data.name = "chest_xray"
    config.data.manual_dir = "~/medjax_data/chest_xray"
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {"image_size": 224, "channels": 3, "validation_fraction": 0.2, "seed": 0}
    )
    recipes.imagenet_mobilenet_v2(config, image_size=224, head_epochs=2.0)
    config.train.num_epochs = 15.0

    if args.model != "mobilenet_v2" and args.variant != "scratch":
        raise ValueError("model= is an argument of the scratch variant only.")
    if args.variant == "cpu":
        config.name = "chest_xray_cpu"
        recipes.imagenet_mobilenet_v2(config, image_size=224, head_epochs=1.0)
        config.train.num_epochs = 5.0
    elif args.variant == "cohort":
        config.name = "chest_xray_cohort"
        recipes.imagenet_mobilenet_v2(config, image_size=224, head_epochs=2.0, learning_rate=1e-4)
        config.data.augment.update(recipes.CT_AUGMENT)
        config.loss.cross_entropy.class_weights = "balanced"
    elif args.variant in ("scratch", "synthetic", "smoke"):
        _from_scratch(config, args)
    elif args.variant != "real":
        raise ValueError(
            f"Unknown variant {args.variant!r} of chest_xray; use real, cpu, cohort, scratch, synthetic or "
            "smoke."
        )
    return config


def _from_scratch(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
    """The variants without pretrained weights: torchvision-style models, static training."""
    recipes.from_scratch(config)
    config.model = config_lib.model_config("mobilenet_v2", width_multiplier=1.0, dropout_rate=0.2)
    config.data.augment.rotation_degrees = 15.0
    if args.variant == "scratch":
        if args.model not in recipes.CPU_MODELS:
            known = ", ".join(recipes.CPU_MODELS)
            raise ValueError(f"model={args.model!r}: the scratch variant has {known}.")
        config.name = f"chest_xray_{args.model}"
        config.model_name = args.model
        config.model = config_lib.model_config(args.model, **recipes.CPU_MODELS[args.model])
        config.data.builder_kwargs.update({"image_size": 64, "channels": 1})
        config.data.image_size = 64
        config.data.channels = 1
        config.data.normalize = ml_collections.ConfigDict({"mean": 0.0, "std": 1.0})
        # The official test split is another cohort than the train split validation is carved from;
        # crops and intensity jitter widen what training sees.
        config.data.augment.update(
            {"random_resized_crop_scale": (0.7, 1.0), "brightness": 0.2, "contrast": 0.2}
        )
        config.optim.learning_rate = 1e-3
        if args.model == "convnext":
            # Without warm-up at 1e-3, ConvNeXt sat near chance (validation AUC 0.50-0.84) for 8 of 15
            # epochs; one warm-up epoch at 5e-4 and room for 25 epochs (patience 5) let it train.
            config.optim.warmup_epochs = 1.0
            config.optim.learning_rate = 5e-4
            config.train.num_epochs = 25.0
            config.train.early_stopping.patience = 5
    elif args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.data.augment.rotation_degrees = 10.0
        config.model.width_multiplier = 0.35
        config.train.num_epochs = 12.0
    else:
        config_lib.make_smoke(config)
        config.model.width_multiplier = 0.35
