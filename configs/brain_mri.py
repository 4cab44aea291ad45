"""Study A: improved ConvNeXt-Tiny for brain tumour MRI (Xia, Yin, Li 2025, arXiv 2508.11532).

The three changes of the study, each a config switch for ablation: dual global pooling
(``model.pooling='avg+max'``, fused by ``model.fusion``), the SEVector channel attention on the pooled
vector (``model.sevector_ratio``; None disables) and the feature-smoothing loss term
(``loss.feature_smoothing.weight``). Recipe: 224x224, AdamW with cosine schedule and warm-up, batch 32,
10 epochs (the study reports 89.10 % test accuracy within 10 epochs on a CPU). Where the study is silent
(fusion, placement, lambda) the defaults are medjax's documented choices (../shared/docs/PAPERS.md).

Variants (``--config=configs/brain_mri.py:<variant>``):
  (none)     the 4-class Training/ Testing/ archive (glioma, meningioma, notumor, pituitary) under
             ``data.manual_dir`` (default ``~/medjax_data/brain_mri``).
  cpu        the same archive at 64x64 grey with a reduced ConvNeXt (depths 2-2-2-2, widths 32-256)
             keeping study A's head and loss, 10 epochs of about 160 steps (5,140 training slices): about
             1,600 steps, 5-10 min of training on 2 cores plus 1-2 min to prepare 7,000 JPEGs.
  synthetic  the same head, loss and optimizer on generated ``synthetic_ct`` slices (not medical data),
             with the cpu variant's reduced ConvNeXt so the demo runs in minutes.
  smoke      seconds on a tiny synthetic set; used by the tests.

Pretrained start: no ImageNet ConvNeXt exists offline, but a pretraining run on unlabelled images
(``configs/pretrain.py``, README "Pretrain on your own unlabelled images") starts this config through
``init_from.path``: its backbone, pooling and SEVector are copied and the classifier starts fresh. The
student must be this config's model at this config's input: ``student=cpu,size=64`` (the default) for
the ``cpu`` and ``synthetic`` variants, ``student=study,size=224`` for the full ConvNeXt-Tiny. The start
measured to help this model on a few hundred labelled CT slices is distillation from the ImageNet
MobileNetV2 on the archive's own images, teacher at 224, then the classifier alone for 20 epochs before
everything (validation AUC 0.676 against 0.615 from scratch, README "Pretrain on your own unlabelled
images"): the commands below.

Example:
  python -m medjax.launch --config=configs/brain_mri.py:synthetic
  python -m medjax.launch --config=configs/pretrain.py:variant=folder,method=distillation \
      --config.data.manual_dir=~/mri_images --workdir=runs/pretrain_mri \
      --config.loss.distillation.teacher_image_size=224 --config.train.num_epochs=100
  python -m medjax.launch --config=configs/brain_mri.py:cpu --config.init_from.path=runs/pretrain_mri \
      "--config.optim.unfreeze=({'epoch': 0.0, 'trainable': ('classifier/.*',)}, \
      {'epoch': 20.0, 'trainable': None})"
"""

import ml_collections

from medjax import config_lib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "brain_mri"

    config.model_name = "convnext"
    config.model = config_lib.model_config("convnext", **recipes.STUDY_MODELS["convnext"])
    config.loss = ml_collections.ConfigDict(
        {
            "cross_entropy": {"weight": 1.0, "label_smoothing": 0.0},
            # On L2-normalised features: raw squared distances sum over the 512-1536 feature dimensions
            # and swamp cross-entropy (on :synthetic the training loss then stayed at 0.693, chance). The
            # weight ramps up over 100 steps: the zero-initialised head sends cross-entropy no gradient
            # into the features at first, and the term alone would pull them to one point.
            "feature_smoothing": {"weight": 0.1, "normalize": True, "warmup_steps": 100},
        }
    )

    config.data.name = "brain_mri"
    config.data.manual_dir = "~/medjax_data/brain_mri"
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {"variant": "four_class", "image_size": 224, "channels": 3}
    )
    config.data.image_size = 224
    config.data.channels = 3
    config.data.normalize = ml_collections.ConfigDict(
        {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    )
    config.data.augment.hflip = True
    config.data.augment.rotation_degrees = 10.0

    config.optim.name = "adamw"
    config.optim.learning_rate = 5e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = 10.0

    if args.variant in ("cpu", "synthetic"):
        config.model.depths = (2, 2, 2, 2)
        config.model.widths = (32, 64, 128, 256)
        config.data.builder_kwargs.update({"image_size": 64, "channels": 1})
        config.data.image_size = 64
        config.data.channels = 1
        config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.train.num_epochs = 8.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.depths = (1, 1, 1, 1)
        config.model.widths = (8, 16, 32, 64)
    elif args.variant not in ("real", "cpu"):
        raise ValueError(f"Unknown variant {args.variant!r} of brain_mri; use real, cpu, synthetic or smoke.")
    return config
