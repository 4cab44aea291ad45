"""COVID-19 vs non-COVID CT slices of UCSD-AI4H COVID-CT (Zhao et al. 2020), official split: the real CT
set on which the CT recipe of ``configs/covid_ct.py`` is chosen (study B's SARS-CoV-2 archive is of the
same kind). Published baseline on this split (He et al. 2020, Self-Trans, DenseNet-169 with ImageNet
transfer and contrastive self-supervision): F1 0.85, AUC 0.94, accuracy about 0.86.

The default is the ImageNet MobileNetV2 recipe for CT slices chosen on this split's validation
(:func:`medjax.recipes.imagenet_ct`): MobileNetV2 1.0 at 224x224 RGB in [-1, 1], rotations, flips, crops
and intensity jitter, Adam at 1e-4 with cosine annealing, every layer trained from the first step, early
stopping and the best checkpoint on validation AUC (patience 5). Validation is the official
``val`` split (118 slices); test is reported once, never used to choose. The selection protocol, its
commands and its status: ``results/ucsd_covid_ct.md``.

Data: ``data.manual_dir`` (default ``~/medjax_data/ucsd_covid_ct``) laid out by the release's split lists
as ``{train,val,test}/{CT_COVID,CT_NonCOVID}/*`` (see ``medjax/data/builders/ucsd_covid_ct.py``); with the
copy in ../shared/data: ``--config.data.manual_dir=../shared/data/ucsd_covid_ct``. Weights: see
``configs/chest_xray.py``
(``--config.init_from.path=../shared/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite``).

Variants (``--config=configs/ucsd_covid_ct.py:<variant>``):
  (none)     the recipe above; ``model=mednext_plos`` for study B's model from scratch (AdamW, 30
             epochs) for comparison, e.g. ``--config=configs/ucsd_covid_ct.py:model=mednext_plos``.
  cpu        the ImageNet recipe at 160x160, 15 epochs: about 8 minutes on 2 CPU cores.
  synthetic  the ImageNet-free path on generated ``synthetic_ct`` slices (not medical data), 64x64,
             MobileNetV2 width 0.35 from scratch.
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/ucsd_covid_ct.py:cpu \\
      --config.data.manual_dir=../shared/data/ucsd_covid_ct \\
      --config.init_from.path=../shared/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite
"""

import ml_collections

from medjax import config_lib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real", model="mobilenet_v2")
    config = config_lib.base_config()
    config.name = "ucsd_covid_ct"
    config.data.name = "ucsd_covid_ct"
    config.data.manual_dir = "~/medjax_data/ucsd_covid_ct"
    config.data.builder_kwargs = ml_collections.ConfigDict({"image_size": 224, "channels": 3})

    if args.model == "mednext_plos":
        if args.variant != "real":
            raise ValueError("model=mednext_plos is the default variant's comparison arm only.")
        config.name = "ucsd_covid_ct_mednext_plos"
        recipes.mednext_plos_scratch(config)
        return config
    if args.model != "mobilenet_v2":
        raise ValueError(f"model={args.model!r}: ucsd_covid_ct has mobilenet_v2 or mednext_plos.")
    recipes.imagenet_ct(config, image_size=224)
    config.train.num_epochs = 20.0

    if args.variant == "cpu":
        config.name = "ucsd_covid_ct_cpu"
        config.data.builder_kwargs.image_size = 160
        recipes.imagenet_ct(config, image_size=160)
        config.train.num_epochs = 15.0
    elif args.variant in ("synthetic", "smoke"):
        recipes.from_scratch(config)
        config.model = config_lib.model_config("mobilenet_v2", width_multiplier=0.35, dropout_rate=0.2)
        if args.variant == "synthetic":
            config_lib.use_synthetic_data(config, image_size=64)
            config.train.num_epochs = 10.0
        else:
            config_lib.make_smoke(config)
    elif args.variant != "real":
        raise ValueError(
            f"Unknown variant {args.variant!r} of ucsd_covid_ct; use real, cpu, synthetic or smoke."
        )
    return config
