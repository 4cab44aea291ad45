"""COVID-19 vs non-COVID on the SARS-CoV-2 CT-scan dataset (Soares et al. 2020), the dataset of study B
(Xue et al., PLoS One 2026, MedNeXt: 98.39 % accuracy).

The default is study C's fine-tuning recipe from ImageNet MobileNetV2 for CT slices
(:func:`medjax.recipes.imagenet_ct`), the same function as ``configs/ucsd_covid_ct.py`` uses, so what UCSD
COVID-CT's validation split (a CT COVID set of the same kind) selected carries over here
(``results/ucsd_covid_ct.md``): 224x224 RGB in [-1, 1] (RGBA and grey slices of any size are decoded to
RGB and resized by the builder), rotations, flips, crops and intensity jitter, Adam at 1e-4 with cosine
annealing, every layer trained from the first step; early stopping and the best checkpoint on validation
AUC (patience 5). ``model=mednext_plos`` is
study B's model from scratch (``mednext_plos`` is that study's 2-D large-kernel conv + MLP network, not
DKFZ's 3-D MedNeXt; its open choices are documented in medjax/models/mednext_plos.py).

Data: place the public release's ``COVID/`` and ``non-COVID/`` folders under ``data.manual_dir`` (default
``~/medjax_data/sars_cov2_ct``); the archive has no official split, so a seeded stratified 70/10/20 split
is drawn with pixel-identical slices kept on one side. The file names carry no patient key, so slices of
one patient can sit on both sides: expect validation and test to read higher than on unseen patients.
Weights: see ``configs/chest_xray.py`` (``--config.init_from.path=...tflite``).

Variants (``--config=configs/covid_ct.py:<variant>``):
  (none)     the recipe above; ``model=mednext_plos`` for study B's model from scratch
             (AdamW, 30 epochs), e.g. ``--config=configs/covid_ct.py:model=mednext_plos``.
  cpu        the ImageNet recipe sized for 2 CPU cores: 160x160, 15 epochs of about 1,740 training
             slices (about 35 minutes by the rate measured on UCSD COVID-CT).
  synthetic  the offline demo on ``synthetic_ct``, GENERATED CT-like slices (not medical data), 64x64,
             with a reduced MedNeXt (widths 24-192, depths 1-1-2-1) so it runs in minutes on 2 CPU cores.
  smoke      seconds on a tiny synthetic set; used by the tests.

Pretrained start for ``model=mednext_plos`` (no ImageNet MedNeXt exists offline): a pretraining run
(``configs/pretrain.py``, README "Pretrain on your own unlabelled images") with the same student, here
``configs/pretrain.py:model=mednext_plos,student=study,size=224,channels=3`` (this config reads RGB),
starts it through ``--config.init_from.path=<that run>``; the backbone is copied, the classifier fresh.
Measured on UCSD COVID-CT at 250 labels (64 px students, three seeds), distillation helps MedNeXt only
with ``model.pooling=avg+max`` in both the pretraining student and the fine-tune: +0.056 validation AUC
under the best-on-AUC rule (0.672 against 0.616 from scratch with the same head, README "Pretrain on your
own unlabelled images"); with average pooling no start helped. The ImageNet MobileNetV2 (the default
model, 0.706 there) is still the best start on CT.

Example:
  python -m medjax.launch --config=configs/covid_ct.py:synthetic
  python -m medjax.launch --config=configs/covid_ct.py:cpu --config.data.manual_dir=~/data/sars_cov2_ct
  python -m medjax.launch --config=configs/covid_ct.py:model=mednext_plos --config.model.pooling=avg+max \
      --config.data.manual_dir=~/data/sars_cov2_ct --config.init_from.path=runs/pretrain_mednext
"""

import ml_collections

from medjax import config_lib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real", model="mobilenet_v2")
    config = config_lib.base_config()
    config.name = "covid_ct"
    config.data.name = "sars_cov2_ct"
    config.data.manual_dir = "~/medjax_data/sars_cov2_ct"
    config.data.batch_size = 32

    if args.model not in ("mobilenet_v2", "mednext_plos"):
        raise ValueError(f"model={args.model!r}: covid_ct has mobilenet_v2 (ImageNet start) or mednext_plos.")
    if args.variant in ("synthetic", "smoke") or args.model == "mednext_plos":
        if args.variant == "cpu":
            raise ValueError("The cpu variant is the ImageNet MobileNetV2 recipe; drop model=mednext_plos.")
        recipes.mednext_plos_scratch(config)
    else:
        recipes.imagenet_ct(config, image_size=224)
        config.train.num_epochs = 20.0

    if args.variant == "cpu":
        config.name = "covid_ct_cpu"
        config.data.builder_kwargs = ml_collections.ConfigDict({"image_size": 160})
        recipes.imagenet_ct(config, image_size=160)
        config.train.num_epochs = 15.0
    elif args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.data.augment.rotation_degrees = 0.0
        # Max pooling keeps a small lesion's response that averaging over the map would dilute.
        config.model.update({"widths": (24, 48, 96, 192), "depths": (1, 1, 2, 1), "pooling": "max"})
        config.model.drop_path_rate = 0.0
        config.optim.learning_rate = 1e-3
        config.train.num_epochs = 10.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.update({"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    elif args.variant != "real":
        raise ValueError(f"Unknown variant {args.variant!r} of covid_ct; use real, cpu, synthetic or smoke.")
    return config
