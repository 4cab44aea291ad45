"""PneumoniaMNIST (MedMNIST v2): paediatric chest X-ray, normal vs pneumonia, 28x28 grey.
Official split 4708 / 524 / 624; the test split comes from another cohort, so report test, not validation.
Published test baselines: ResNet-18 (28) ACC 0.854 AUC 0.944; ResNet-50 (224) ACC 0.884 AUC 0.962.

Variants (``--config=configs/pneumoniamnist.py:<variant>``):
  (none)     the official ``pneumoniamnist.npz`` in ``data.manual_dir`` (default ``~/medjax_data/medmnist``);
             with the copy in ../shared/data: ``--config.data.manual_dir=../shared/data/pneumoniamnist``.
  synthetic  the same recipe on generated ``synthetic_ct`` slices (not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/pneumoniamnist.py
"""

import ml_collections

from medjax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "pneumoniamnist"

    config.model_name = "mobilenet_v2"
    config.model = config_lib.model_config("mobilenet_v2", width_multiplier=0.5, dropout_rate=0.2)
    config_lib.use_medmnist(config, "pneumoniamnist")
    config.data.augment.rotation_degrees = 10.0

    config.optim.name = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = 20.0
    config.train.early_stopping.patience = 5

    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.train.num_epochs = 8.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.width_multiplier = 0.35
    elif args.variant != "real":
        raise ValueError(f"Unknown variant {args.variant!r} of pneumoniamnist; use real, synthetic or smoke.")
    return config
