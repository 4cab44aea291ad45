"""BreastMNIST (MedMNIST v2): breast ultrasound, malignant (0) vs normal/benign (1), 28x28 grey.
Official split 546 / 78 / 156. Published test baselines: ResNet-18 (28) ACC 0.863 AUC 0.901.

Variants (``--config=configs/breastmnist.py:<variant>``):
  (none)     the official ``breastmnist.npz`` in ``data.manual_dir`` (default ``~/medjax_data/medmnist``);
             with the copy in ../shared/data: ``--config.data.manual_dir=../shared/data/breastmnist``.
  synthetic  the same recipe on generated ``synthetic_ct`` slices (not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/breastmnist.py
"""

import ml_collections

from medjax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "breastmnist"

    config.model_name = "mobilenet_v2"
    config.model = config_lib.model_config("mobilenet_v2", width_multiplier=0.5, dropout_rate=0.2)
    config_lib.use_medmnist(config, "breastmnist")
    config.data.augment.rotation_degrees = 10.0

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = 40.0
    config.train.early_stopping.patience = 5

    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.train.num_epochs = 8.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.width_multiplier = 0.35
    elif args.variant != "real":
        raise ValueError(f"Unknown variant {args.variant!r} of breastmnist; use real, synthetic or smoke.")
    return config
