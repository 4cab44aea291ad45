"""Multi-organ CT segmentation on Synapse (BTCV; TransUNet's 18/12 case split, 8 organs), as Study B presents
its MedNeXt (reported mean Dice 79.45 %). Volumes become 2-D axial slices resampled to 224x224
(TransUNet's protocol; ``nifti_volumes`` with ``layout='synapse'``, CT window [-125, 275] HU); the test
split keeps every slice, so ``python -m medjax.evaluate`` reports 3-D Dice and HD95 (mm) per case.
Not measured here (no Synapse data on this machine).

Variants (``--config=configs/synapse.py:<variant>``; ``model=mednext|unet``, default mednext):
  (none)     ``RawData/Training/img/img00NN.nii.gz`` + ``label/label00NN.nii.gz`` under ``data.manual_dir``
             (default ``~/medjax_data/synapse``).
  synthetic  the offline demo on ``synthetic_ct`` lesion masks (GENERATED, not medical data).
  smoke      seconds on a tiny synthetic set; used by the tests.

Example:
  python -m medjax.launch --config=configs/synapse.py --workdir=runs/synapse_mednext
  python -m medjax.evaluate --workdir=runs/synapse_mednext
"""

import ml_collections

from medjax import seg_recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return seg_recipes.volume_config("synapse", arg, layout="synapse", default_dir="~/medjax_data/synapse")
