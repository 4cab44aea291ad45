"""Any 2-D segmentation archive laid out as images with masks beside them (``seg_folder``), by options only.

Layouts (``data.builder_kwargs``, see medjax/data/builders/seg_folder.py):
  Kvasir-SEG   ``layout=sibling``, ``image_dir=images``, ``mask_dir=masks`` (same file names; JPEG masks:
               ``label_mode=binary``)
  ISIC 2018    ``layout=sibling``, ``mask_suffix=_segmentation``
  BUSI         ``layout=suffix``, ``mask_suffix=_mask``, ``extra_masks=union`` (second-lesion masks)
  multi-class  ``label_mode=labels`` (integer or palette masks) or ``class_colors`` for colour masks, with
               ``class_names``
Images larger than ``max_size`` are shrunk keeping their aspect ratio (0 keeps them native); a seeded
70/10/20 split is drawn unless the archive has train/val/test folders. Training samples 256x256 patches
(half on foreground), evaluation predicts whole images.

Variants (``--config=configs/seg_folder.py:<variant>``; ``model=unet|mednext``):
  (none)     the archive under ``data.manual_dir`` (default ``~/medjax_data/seg_folder``), sibling layout.
  synthetic  the offline demo on ``synthetic_ct`` lesion masks (GENERATED, not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example (BUSI unpacked in ~/data/Dataset_BUSI_with_GT):
  python -m medjax.launch --config=configs/seg_folder.py \
      --config.data.manual_dir=~/data/Dataset_BUSI_with_GT \
      --config.data.builder_kwargs.layout=suffix --config.data.builder_kwargs.mask_suffix=_mask \
      --config.data.builder_kwargs.extra_masks=union --workdir=runs/busi_unet
"""

import ml_collections

from medjax import config_lib, seg_recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="real", model="unet")
    config = seg_recipes.segmentation_config("seg_folder", args.model)
    config.data.name = "seg_folder"
    config.data.manual_dir = "~/medjax_data/seg_folder"
    # Every option spelled out, so each can be overridden from the command line (the config is locked).
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {
            "root": "",
            "layout": "sibling",
            "image_dir": "images",
            "mask_dir": "masks",
            "mask_suffix": "",
            "image_glob": "*",
            "channels": 3,
            "max_size": 512,
            "label_mode": "auto",
            "class_names": (),
            "extra_masks": "error",
            "skip_corrupt": False,
            "split_fractions": (0.7, 0.1, 0.2),
            "seed": 0,
        }
    )
    config.data.image_size = 256
    config.data.patch_size = 256
    config.data.foreground_prob = 0.5
    config.data.channels = 3
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    config.data.batch_size = 8
    config.data.eval_batch_size = 4
    config.data.augment.update({"hflip": True, "vflip": True, "rotation_degrees": 15.0, "scale": (0.8, 1.2)})
    config.train.num_epochs = 60.0
    config.train.eval_every_epochs = 5.0
    config.optim.warmup_epochs = 1.0
    return seg_recipes.apply_variant(config, args.variant, args.model)
