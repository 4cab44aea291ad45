"""Pretraining a backbone on unlabelled images, for ``init_from``: ConvNeXt (study A's head) or MedNeXt
from scratch, or the ImageNet MobileNetV2 continued on the target's images (``student=imagenet``).

No ImageNet weights exist here for ConvNeXt or MedNeXt; this run gives them a start from images alone
(:mod:`medjax.tasks.pretrain`, objectives in :mod:`medjax.pretraining`). Its run directory is what a
classification config then names in ``--config.init_from.path``: the backbone (study A's pooling and
SEVector included) is copied, the classifier starts fresh. The student must be the one the fine-tuning
config builds: same ``model_name``, ``model`` settings, ``data.channels`` (and best the same
``data.image_size`` and ``data.normalize``).

Arguments (``--config=configs/pretrain.py:method=distillation,model=mednext_plos,size=64``):
  variant    ``real`` (default): the training images of the registered dataset ``pool`` under
             ``data.manual_dir`` (labels ignored; its validation split, the one its fine-tunes validate
             on, is the validation split; test is never read); ``folder``: any folder of images,
             sub-folders of any name, no classes
             (``image_folder`` with ``unlabelled=True``, 90/10 train/validation); ``synthetic``: the
             offline demo on generated ``synthetic_ct`` slices (not medical data); ``smoke``: seconds
             on tiny synthetic slices (32 px), for the tests.
  pool       ``chest_xray`` (default: Kermany, its patient-grouped validation carve) or
             ``ucsd_covid_ct`` (UCSD COVID-CT, its official validation split).
  method     ``distillation`` (default): match the ImageNet MobileNetV2's pooled 1280-d embedding of each
             augmented view (teacher file: ``loss.distillation.teacher``); ``simsiam``: two views, no
             teacher.
  model      ``convnext`` (study A's head on the reduced ConvNeXt of ``configs/brain_mri.py:cpu`` and
             ``configs/chest_xray.py:scratch``) or ``mednext_plos`` (widths 24-192): the students
             of :data:`medjax.recipes.CPU_MODELS`.
  student    ``cpu`` (default, the reduced models above, for 64 px grey) or ``study``: the studies' full
             models (:data:`medjax.recipes.STUDY_MODELS`: ConvNeXt-Tiny with study A's head as in
             ``configs/brain_mri.py``, MedNeXt-PLOS tiny as in ``configs/covid_ct.py:model=mednext_plos``);
             or ``imagenet`` with ``model=mobilenet_v2,method=simsiam``: Self-Trans' order (He et al.
             2020), SimSiam continued from the ImageNet MobileNetV2 (``init_from.path``, the weights file
             of ``configs/chest_xray.py``) on RGB in [-1, 1], for the fine-tuning configs that start
             from that file (``configs/ucsd_covid_ct.py``, ``configs/covid_ct.py``, with
             ``--config.init_from.path=<this run>``).
  size       image side in pixels (64).
  channels   1 (grey, like the scratch/cpu classification configs) or 3 for a fine-tuning config that
             reads RGB (the stem convolution's shape depends on it); by default 1, and 3 for
             ``student=imagenet``.

Measured (``launch/pretrained_starts.py``, ``results/pretrained_starts_*.md``, README "Pretrain on your
own unlabelled images"): on UCSD COVID-CT at 250 labels, distillation on the 425 training slices (100
epochs, ``loss.distillation.teacher_image_size=224``) lifts study A's ConvNeXt by +0.025 to +0.216
validation AUC depending on the fine-tuning rule (three seeds each), and MedNeXt by +0.023 to +0.132 when
student and fine-tune pool avg+max (``--config.model.pooling=avg+max``; with average pooling, nothing).
Pretraining should run about 1,300 steps: 10 epochs of a few thousand images, 100 of a few hundred
(10-15 min at 64 px on 2 cores). SimSiam collapsed on pools that small.

Examples:
  python -m medjax.launch --config=configs/pretrain.py --workdir=runs/pretrain_distill \\
      --config.data.manual_dir=../shared/data/chest_xray \\
      --config.loss.distillation.teacher=../shared/weights/imagenet_mobilenet_v2/tf2_mobilenet_v2_1.0_224_ptq.tflite
  python -m medjax.launch --config=configs/pretrain.py:variant=folder,method=simsiam \\
      --config.data.manual_dir=~/my_unlabelled_scans --workdir=runs/pretrain_simsiam
  python -m medjax.launch --config=configs/chest_xray.py:variant=scratch,model=convnext \\
      --config.data.manual_dir=../shared/data/chest_xray --config.init_from.path=runs/pretrain_distill
"""

import ml_collections

from medjax import config_lib, recipes

# ImageNet MobileNetV2's pooled feature width: what distillation's projection head must produce.
MOBILENET_V2_FEATURES = 1280
# Registered datasets whose training images (labels ignored) variant=real pretrains on, with the builder
# settings of their fine-tuning configs: Kermany's patient-grouped carve (configs/chest_xray.py:scratch),
# UCSD COVID-CT's official split.
POOLS = {"chest_xray": {"validation_fraction": 0.2, "seed": 0}, "ucsd_covid_ct": {}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg,
        variant="real",
        pool="chest_xray",
        method="distillation",
        model="convnext",
        student="cpu",
        size=64,
        channels=0,
    )
    students = {"cpu": recipes.CPU_MODELS, "study": recipes.STUDY_MODELS}
    imagenet = (args.model, args.student, args.method) == ("mobilenet_v2", "imagenet", "simsiam")
    if not imagenet and (args.model not in recipes.STUDY_MODELS or args.student not in students):
        raise ValueError(
            f"model={args.model!r}, student={args.student!r}, method={args.method!r}: pretrain students "
            "are model=convnext or mednext_plos with student=cpu or study, or "
            "model=mobilenet_v2,student=imagenet,method=simsiam."
        )
    # 0: the student's own, grey for the reduced and study students, RGB for the ImageNet network.
    args.channels = args.channels or (3 if imagenet else 1)
    if imagenet and args.channels != 3:
        raise ValueError(f"channels={args.channels}: the ImageNet MobileNetV2 takes 3 channels.")
    config = config_lib.base_config(task="pretrain")
    config.name = f"pretrain_{args.method}_{args.model}"
    config.model_name = args.model
    if not imagenet:
        config.model = config_lib.model_config(args.model, **students[args.student][args.model])

    if args.variant == "real" and args.pool not in POOLS:
        raise ValueError(f"pool={args.pool!r}: the registered pools are {sorted(POOLS)}; use variant=folder.")
    if args.variant == "real":
        config.data.name = args.pool
        config.data.manual_dir = f"~/medjax_data/{args.pool}"
        # The fine-tuning configs' own builder settings, so the validation split they validate on is the
        # one pretraining validates on: pretraining never reads it for training.
        config.data.builder_kwargs = ml_collections.ConfigDict(
            {"image_size": args.size, "channels": args.channels, **POOLS[args.pool]}
        )
    elif args.variant == "folder":
        config.data.name = "image_folder"
        config.data.manual_dir = "~/medjax_data/unlabelled"
        config.data.builder_kwargs = ml_collections.ConfigDict(
            {
                "unlabelled": True,
                "split_fractions": (0.9, 0.1, 0.0),
                "image_size": args.size,
                "channels": args.channels,
            }
        )
    elif args.variant not in ("synthetic", "smoke"):
        raise ValueError(f"Unknown variant {args.variant!r}; use real, folder, synthetic or smoke.")
    config.data.image_size = args.size
    config.data.channels = args.channels
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.0, "std": 1.0})
    if args.variant == "synthetic":
        config_lib.use_synthetic_data(config, image_size=args.size)
        config.data.channels = args.channels  # The generated slices are grey; the pipeline repeats them.
    config.data.batch_size = 32

    if args.method == "simsiam":
        config.loss = ml_collections.ConfigDict({"simsiam": {"weight": 1.0}})
        config.data.views = 2
        # Two views must differ enough that matching them teaches something (SimSiam crops down to 0.2 of
        # the image on ImageNet; a chest X-ray's findings are small, so down to 0.3).
        config.data.augment.update(
            {"random_resized_crop_scale": (0.3, 1.0), "hflip": True, "rotation_degrees": 10.0}
        )
        config.data.augment.update({"brightness": 0.4, "contrast": 0.4})
    elif args.method == "distillation":
        config.loss = ml_collections.ConfigDict(
            {
                "distillation": {
                    "weight": 1.0,
                    "teacher": recipes.IMAGENET_MOBILENET_V2,
                    "distance": "cosine",
                    # The teacher was trained at 224; at 64 px its last map is 2x2. 128 is a choice (cost
                    # vs. fidelity), not yet measured.
                    "teacher_image_size": 128,
                }
            }
        )
        config.data.views = 1
        config.pretrain.projection_dim = MOBILENET_V2_FEATURES
        config.data.augment.update(
            {"random_resized_crop_scale": (0.5, 1.0), "hflip": True, "rotation_degrees": 10.0}
        )
        config.data.augment.update({"brightness": 0.2, "contrast": 0.2})
    else:
        raise ValueError(f"Unknown method {args.method!r}; use distillation or simsiam.")

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    # The first steps' global gradient norms reached 1.6e6 and 2.1e5 (distillation from the real teacher,
    # 2026-12-01); one such step fills Adam's second moment and stalls the epochs after it. 3.0 is DINO's
    # clip for the same kind of objective.
    config.optim.grad_clip_norm = 3.0
    config.train.num_epochs = 10.0
    config.train.select_best_on = "loss"

    if args.variant == "smoke":
        config_lib.make_smoke(config)
        config.model.depths = (1, 1, 1, 1)
        config.model.widths = (8, 16, 32, 64)
        config.pretrain.hidden_dim = 32
        if args.method == "simsiam":
            config.pretrain.projection_dim = 16
        else:
            config.loss.distillation.teacher_image_size = None
    if imagenet:  # Last: the file's network and input range, whatever the variant's data (smoke's too).
        recipes.imagenet_mobilenet_v2_start(config)
        config.data.normalize = ml_collections.ConfigDict(recipes.INPUT_RANGES["symmetric"])
    return config
