"""Study B's task: COVID-19 vs non-COVID on the SARS-CoV-2 CT-scan dataset (Soares et al. 2020).

Variants (``--config=configs/covid_ct.py:<variant>``):
  (none)     the real SARS-CoV-2 CT-scan PNGs: place the public release's ``COVID/`` and ``non-COVID/``
             folders under ``data.manual_dir`` (default ``~/medjax_data/sars_cov2_ct``); a 70/10/20 split
             is drawn with duplicates kept on one side.
  synthetic  the offline demo on ``synthetic_ct``, GENERATED CT-like slices (not medical data), 64x64.
             Expected on 2 CPU cores: a few minutes, test AUC >= 0.90.
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/covid_ct.py:synthetic
"""

import ml_collections

from medjax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "covid_ct"

    config.model_name = "mobilenet_v2"
    config.model = config_lib.model_config("mobilenet_v2", width_multiplier=1.0, dropout_rate=0.2)

    config.data.name = "sars_cov2_ct"
    config.data.manual_dir = "~/medjax_data/sars_cov2_ct"
    config.data.image_size = 224
    config.data.channels = 3
    config.data.batch_size = 32
    config.data.augment.hflip = True
    config.data.augment.rotation_degrees = 10.0

    config.optim.name = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = 30.0
    config.train.early_stopping.patience = 5

    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.data.augment.rotation_degrees = 0.0
        config.model.width_multiplier = 0.5
        config.train.num_epochs = 8.0
        config.train.eval_every_epochs = 1.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.width_multiplier = 0.35
    elif args.variant != "real":
        raise ValueError(f"Unknown variant {args.variant!r} of covid_ct; use real, synthetic or smoke.")
    return config
