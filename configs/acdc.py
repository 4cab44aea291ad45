"""Cardiac MRI segmentation on ACDC (RV, myocardium, LV; 100 training / 50 test patients), as Study B
presents its MedNeXt (reported mean Dice 91.28 %). Each annotated frame is one volume of short-axis
slices, resampled to 224x224 with per-volume percentile intensity scaling (``nifti_volumes`` with
``layout='acdc'``); evaluation gives 3-D Dice and HD95 (mm) per volume. The recipe is Synapse's
(``configs/synapse.py``). Not measured here (no ACDC data on this machine).

Variants (``--config=configs/acdc.py:<variant>``; ``model=mednext|unet``, default mednext):
  (none)     ``training/patientNNN/patientNNN_frameMM[_gt].nii.gz`` and ``testing/...`` under
             ``data.manual_dir`` (default ``~/medjax_data/acdc``).
  synthetic  the offline demo on ``synthetic_ct`` lesion masks (GENERATED, not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/acdc.py:model=unet --workdir=runs/acdc_unet
"""

import ml_collections

from medjax import seg_recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return seg_recipes.volume_config("acdc", arg, layout="acdc", default_dir="~/medjax_data/acdc")
