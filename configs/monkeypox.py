"""Study B's MedNeXt (Xue et al., PLoS One 2026) on the Monkeypox Skin Lesion Dataset v1: Monkey Pox (1)
vs Others (0), 228 skin photos (the study reports 98.12 % accuracy; its split is not stated). medjax draws
a seeded, stratified 70/10/20 split of the original photos (the released augmented copies would leak
between splits, see medjax/data/builders/monkeypox.py); colour is kept, lesions are judged by it.

Variants (``--config=configs/monkeypox.py:<variant>``):
  (none)     ``mednext_plos`` tiny at 224x224 RGB on the release under ``data.manual_dir`` (default
             ``~/medjax_data/monkeypox``), 30 epochs.
  cpu        the same data at 64x64 RGB with a reduced MedNeXt (widths 24-192, depths 1-1-2-1), 60
             epochs of 5 steps (160 training photos): about 300 steps, a few minutes on 2 cores.
  synthetic  the cpu recipe on generated ``synthetic_ct`` slices (not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/monkeypox.py:cpu --config.data.manual_dir=~/data/monkeypox
"""

import ml_collections

from medjax import config_lib

CPU_MODEL = {"widths": (24, 48, 96, 192), "depths": (1, 1, 2, 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "monkeypox"

    config.model_name = "mednext_plos"
    config.model = config_lib.model_config("mednext_plos", variant="tiny", drop_path_rate=0.1)

    config.data.name = "monkeypox"
    config.data.manual_dir = "~/medjax_data/monkeypox"
    config.data.builder_kwargs = ml_collections.ConfigDict({"image_size": 224, "channels": 3, "seed": 0})
    config.data.image_size = 224
    config.data.channels = 3
    config.data.batch_size = 32
    config.data.normalize = ml_collections.ConfigDict(
        {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    )
    # Photos of skin from any angle: flips both ways and rotations do not change the diagnosis.
    config.data.augment.update({"hflip": True, "vflip": True, "rotation_degrees": 20.0})

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 3.0  # 5 steps per epoch: a warm-up of 15 steps.
    config.train.num_epochs = 30.0
    config.train.early_stopping.patience = 10

    if args.variant in ("cpu", "synthetic"):
        config.model.update({**CPU_MODEL, "drop_path_rate": 0.0})
        config.data.builder_kwargs.image_size = 64
        config.data.image_size = 64
        config.train.num_epochs = 60.0
    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.data.augment.update({"vflip": False, "rotation_degrees": 0.0})
        config.train.num_epochs = 8.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.update({"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    elif args.variant not in ("real", "cpu"):
        raise ValueError(f"Unknown variant {args.variant!r} of monkeypox; use real, cpu, synthetic or smoke.")
    return config
