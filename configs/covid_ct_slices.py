"""Study B's MedNeXt (Xue et al., PLoS One 2026) on the Large COVID-19 CT slice dataset (Maftouni et al.
2021): Normal (0), COVID (1), CAP (2), about 17,104 slices (the study reports 98.58 % accuracy; its split is
not stated). No official split: a seeded, stratified 70/10/20 split in which exact and near-duplicate
slices never straddle. Slices are grouped by patient only if ``data.builder_kwargs.group_pattern`` says
how a file name carries one (see medjax/data/builders/_folder.py); without it, slices of one scan can
sit in train and test, which flatters any result on this dataset.

Variants (``--config=configs/covid_ct_slices.py:<variant>``):
  (none)     ``mednext_plos`` tiny at 224x224 grey on the release under ``data.manual_dir`` (default
             ``~/medjax_data/covid_ct_slices``), 20 epochs.
  cpu        64x64 grey, reduced MedNeXt (widths 24-192, depths 1-1-2-1), 5 epochs of about 374 steps:
             about 1,900 steps, 10-15 min of training on 2 cores plus 3-5 min to prepare 17k slices.
  synthetic  the cpu recipe on generated ``synthetic_ct`` slices (not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/covid_ct_slices.py:cpu --config.data.manual_dir=~/data/large_ct
"""

import ml_collections

from medjax import config_lib

CPU_MODEL = {"widths": (24, 48, 96, 192), "depths": (1, 1, 2, 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real")
    config = config_lib.base_config()
    config.name = "covid_ct_slices"

    config.model_name = "mednext_plos"
    config.model = config_lib.model_config("mednext_plos", variant="tiny", drop_path_rate=0.1)

    config.data.name = "covid_ct_slices"
    config.data.manual_dir = "~/medjax_data/covid_ct_slices"
    config.data.builder_kwargs = ml_collections.ConfigDict({"image_size": 224, "channels": 1, "seed": 0})
    config.data.image_size = 224
    config.data.channels = 1
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    config.data.augment.update({"hflip": True, "rotation_degrees": 10.0})

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 0.5
    config.train.num_epochs = 20.0
    config.train.early_stopping.patience = 4

    if args.variant in ("cpu", "synthetic"):
        config.model.update({**CPU_MODEL, "drop_path_rate": 0.0})
        config.data.builder_kwargs.image_size = 64
        config.data.image_size = 64
        config.train.num_epochs = 5.0
        config.train.eval_every_epochs = 0.5
    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=64)
        config.train.num_epochs = 8.0
        config.train.eval_every_epochs = 1.0
    elif args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.update({"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    elif args.variant not in ("real", "cpu"):
        raise ValueError(
            f"Unknown variant {args.variant!r} of covid_ct_slices; use real, cpu, synthetic or smoke."
        )
    return config
