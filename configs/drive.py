"""Retinal vessel segmentation on DRIVE (Staal et al. 2004) at full resolution on a CPU.

The 1st observer is the reference, metrics count only pixels inside the field of view, and the test
split's 2nd observer is scored against the 1st as the human level (``python -m medjax.evaluate``).
Published test F1 / AUC inside the FOV: U-Net about 0.81-0.82 / 0.975-0.98, SA-UNet (Guo et al. 2020)
0.826 / 0.986; the 2nd observer 0.788 F1 (accuracy 0.947). Training samples random 96x96 patches
(half centred on vessel pixels) of the 16 training images, with flips, rotation and zoom; validation
(4 training images, seeded) and test predict whole images. RESULTS.md gives the measured numbers.

Variants (``--config=configs/drive.py:<variant>``; ``model=unet|mednext``, e.g. ``:model=mednext``):
  (none)     DRIVE's official layout (training/, test/ with images, 1st_manual, 2nd_manual, mask) under
             ``data.manual_dir`` (default ``~/medjax_data/drive``); here:
             ``--config.data.manual_dir=../shared/data/drive``.
  synthetic  the offline demo: lesion masks of ``synthetic_ct`` (GENERATED CT-like slices, not medical
             data), 64x64 whole images; test lesion Dice 0.88 in 4.3 min on 2 cores
             (results/segmentation_drive.md).
  smoke      seconds on a tiny synthetic set at 32 px; used by the tests.

Example:
  python -m medjax.launch --config=configs/drive.py --config.data.manual_dir=../shared/data/drive \
      --workdir=runs/drive_unet
  python -m medjax.evaluate --workdir=runs/drive_unet
"""

import ml_collections

from medjax import config_lib, seg_recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real", model="unet")
    config = seg_recipes.segmentation_config("drive", args.model)

    config.data.name = "drive"
    config.data.manual_dir = "~/medjax_data/drive"
    config.data.builder_kwargs = ml_collections.ConfigDict({"num_validation": 4, "seed": 0})
    config.data.image_size = 96  # The model is built (and profiled) at the patch size.
    config.data.patch_size = 96
    config.data.foreground_prob = 0.5
    config.data.cache_decoded = True  # 16 images: decoding PNGs would dominate patch sampling.
    config.data.channels = 3
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    config.data.batch_size = 8
    config.data.eval_batch_size = 4
    config.data.augment.update(
        {
            "hflip": True,
            "vflip": True,
            "rotation_degrees": 20.0,
            "scale": (0.9, 1.1),
            "brightness": 0.1,
            "contrast": 0.1,
        }
    )
    # Two steps make an epoch of 16 images, so epochs are counted in hundreds.
    config.train.num_epochs = 400.0
    config.train.eval_every_epochs = 50.0
    config.train.log_every_steps = 20
    config.optim.warmup_epochs = 10.0
    return seg_recipes.apply_variant(config, args.variant, args.model)
