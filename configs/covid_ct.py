"""Study B: MedNeXt (Xue et al., PLoS One 2026) for COVID-19 vs non-COVID on the SARS-CoV-2 CT-scan dataset
(Soares et al. 2020; the study reports 98.39 % accuracy). ``mednext_plos`` is that study's 2-D
large-kernel conv + MLP network, not DKFZ's 3-D MedNeXt; its open choices are documented in
medjax/models/mednext_plos.py.

Variants (``--config=configs/covid_ct.py:<variant>``):
  (none)     the real SARS-CoV-2 CT-scan PNGs: place the public release's ``COVID/`` and ``non-COVID/``
             folders under ``data.manual_dir`` (default ``~/medjax_data/sars_cov2_ct``); a 70/10/20 split
             is drawn with duplicates kept on one side.
  synthetic  the offline demo on ``synthetic_ct``, GENERATED CT-like slices (not medical data), 64x64,
             with a reduced MedNeXt (widths 24-192, depths 1-1-2-1) so it runs in minutes on 2 CPU cores.
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

    config.model_name = "mednext_plos"
    config.model = config_lib.model_config("mednext_plos", variant="tiny", drop_path_rate=0.1)

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
        # Max pooling keeps a small lesion's response that averaging over the map would dilute.
        config.model.update({"widths": (24, 48, 96, 192), "depths": (1, 1, 2, 1), "pooling": "max"})
        config.model.drop_path_rate = 0.0
        config.optim.learning_rate = 1e-3
        config.train.num_epochs = 10.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.update({"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    elif args.variant != "real":
        raise ValueError(f"Unknown variant {args.variant!r} of covid_ct; use real, synthetic or smoke.")
    return config
