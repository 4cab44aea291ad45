"""Experiment configuration: the shared defaults every ``configs/*.py`` starts from, and checks on them.

Configs are ml_collections ``ConfigDict``s (big_vision / Flax-examples style). A config file defines
``get_config(arg)``; ``arg`` is the text after ``:`` in ``--config=configs/x.py:smoke`` and selects a
variant. Every knob the library reads lives here with its default, so a config file states only what
differs, and ``validate`` can reject a misspelt key before any work starts.
"""

import ast
import dataclasses
import difflib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from medjax import tasks
from medjax.errors import ConfigError

# Keys (or whole sections) that change how a run is *watched* or judged, or where its files sit, not what
# it computes; a workdir may be resumed (or read back) with them changed.
RESUMABLE_WITH_CHANGES = (
    # Locations: the prepared dataset is named by its builder config (its own keys under data.), so the
    # same data moved to another folder is the same run.
    "data.manual_dir",
    "data.data_dir",
    "train.progress_bar",
    "train.log_every_steps",
    "train.remat",  # Same parameters and gradients (to rounding), only the memory/time trade differs.
    "data.num_workers",
    "eval",
    "cpu_cores",
    "mesh",
)

REQUIRED_KEYS = (
    "seed",
    "model_name",
    "model",
    "data.name",
    "data.image_size",
    "data.channels",
    "data.batch_size",
    "loss",
    "optim.name",
    "optim.learning_rate",
    "train.num_epochs",
)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``'smoke'`` or ``'variant=smoke,seed=3'`` into a ConfigDict over ``defaults``.

    A bare word sets the first default key (usually ``variant``), as in big_vision's ``common.parse_arg``.

    Raises:
      ValueError: for a key not in ``defaults`` (the message lists the accepted ones).
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    first_key = next(iter(defaults))
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = first_key, item
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; accepted: {', '.join(defaults)}.")
        default = defaults[key]
        result[key] = type(default)(value) if default is not None and not isinstance(default, str) else value
    return result


# Sections whose keys are free-form (a model's fields, loss terms, a builder's settings): a config's own
# choice, never filled in from the base defaults.
FREE_FORM_SECTIONS = ("model", "loss", "data.builder_kwargs")


def base_config(task: str = "classification") -> ml_collections.ConfigDict:
    """The defaults every experiment config starts from (documented field by field).

    Args:
      task: a module of :mod:`medjax.tasks`; it sets ``config.task`` and the default ``config.loss``.
    """
    c = ml_collections.ConfigDict()
    # What the model predicts and how it is judged (medjax.tasks): 'classification', 'segmentation' or
    # 'pretrain' (a backbone from unlabelled images, for init_from).
    c.task = task
    c.seed = 0  # Parameter init, data order and augmentation all derive from this.
    # PRNG behind the seed: 'rbg' compiles parameter initialisation about 1.7x faster than 'threefry2x32'
    # on XLA CPU (MobileNetV2-0.35, jitted: 9.7 s vs 16.4 s) and is as reproducible for a given seed.
    c.rng_impl = "rbg"
    # CPU cores the run may use (None: all the process may run on); XLA sizes its thread pool to them
    # (medjax/cores.py). Set it to leave cores to other work, or to match a study's thread count.
    c.cpu_cores = ml_collections.FieldReference(None, field_type=int)

    # Devices each parameter and its optimizer state are split over (the mesh's 'model' axis; batches
    # are split over every device regardless). 1 replicates them: fastest while the model fits on one
    # device. Raise it (a divisor of the device count) when parameters + AdamW state do not fit.
    c.mesh = ml_collections.ConfigDict({"param_shards": 1})

    c.model_name = "mobilenet_v2"  # A module in medjax/models (see medjax.models.available_models()).
    c.model = ml_collections.ConfigDict()  # Keyword arguments of that module's Model.
    # Pretrained weights loaded at the start of a fresh run: a Keras .weights.h5/.keras/.h5, a
    # torchvision/timm/official .pth/.safetensors state dict or a quantized MobileNetV2 .tflite
    # (medjax.models.convert.load_pretrained); or a medjax run directory, whose best checkpoint starts a
    # fine-tuning run (medjax.init_from.from_run).
    c.init_from = ml_collections.ConfigDict(
        {
            "path": ml_collections.FieldReference(None, field_type=str),
            "source": ml_collections.FieldReference(None, field_type=str),  # None: detect from the keys.
            "reinit_head": ml_collections.FieldReference(None, field_type=bool),  # None: when shapes differ.
            # BatchNorm statistics re-measured on this many training images after loading, keeping what the
            # model evaluates (medjax.models.convert.calibrate); None: 256 for a .tflite file (its folded
            # BatchNorms hold no statistics, so training-mode passes would not compute the pretrained
            # network), else 0.
            "calibrate_images": ml_collections.FieldReference(None, field_type=int),
        }
    )

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_ct"  # A module in medjax/data/builders.
    c.data.builder_kwargs = ml_collections.ConfigDict()  # Dataset preparation settings of that builder.
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $MEDJAX_DATA_DIR or TFDS'.
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # Where manual downloads live.
    c.data.image_size = 224
    c.data.channels = 3
    c.data.batch_size = 32  # Global batch size, split over the ('data',) mesh.
    c.data.eval_batch_size = 64
    c.data.num_workers = 0  # Grain worker processes; 0 decodes in the training process.
    c.data.read_threads = 2  # Threads per process producing batches (both cores on a 2-core machine).
    c.data.prefetch_batches = 4  # Batches buffered per process ahead of the train step.
    c.data.interpolation = "bilinear"  # Resizing of images: 'nearest' | 'bilinear' | 'bicubic' | 'lanczos'.
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.test_split = "test"  # '': never evaluated (cross-validation folds keep test unseen).
    c.data.normalize = ml_collections.ConfigDict({"mean": 0.0, "std": 1.0})  # After scaling to [0, 1].
    c.data.augment = ml_collections.ConfigDict(
        {
            "hflip": False,
            "vflip": False,
            "rotation_degrees": 0.0,
            "random_resized_crop_scale": ml_collections.FieldReference(None, field_type=tuple),
            "brightness": 0.0,
            "contrast": 0.0,
        }
    )

    # Loss terms by name (see medjax.losses.TERMS); each has a 'weight' plus the term's own arguments.
    c.loss = ml_collections.ConfigDict(tasks.get_task(task).default_loss())

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # 'adam' | 'adamw' | 'sgd'
    c.optim.learning_rate = 1e-3  # Peak learning rate, reached after warm-up.
    c.optim.weight_decay = 0.05  # Decoupled (AdamW) or L2-into-gradient (SGD); ignored by 'adam'.
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.momentum = 0.9  # SGD only.
    c.optim.nesterov = False  # SGD only.
    c.optim.schedule = "cosine"  # 'cosine' (annealing to min_lr_ratio * lr) | 'constant'
    c.optim.warmup_epochs = 0.0
    c.optim.min_lr_ratio = 0.0
    c.optim.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)  # Global-norm clip.
    # Selective unfreezing: regexes over '/'-joined parameter paths that train, e.g.
    # ('block_1[4-6]/.*', 'head_.*', 'classifier/.*') for MobileNetV2's last 3 blocks + head; None: all.
    c.optim.trainable = ml_collections.FieldReference(None, field_type=tuple)
    # Selective unfreezing as a schedule (medjax/unfreeze.py): phases, each with 'trainable' patterns
    # (None: all) and a start, 'epoch': E or 'plateau': N evaluations without improvement, e.g.
    # ({'epoch': 0, 'trainable': ('classifier/.*',)}, {'epoch': 2, 'trainable': None}). The train step
    # compiles once per phase, without the backward pass of what the phase freezes; exclusive with
    # optim.trainable. None: no schedule.
    c.optim.unfreeze = ml_collections.FieldReference(None, field_type=tuple)
    c.optim.freeze_batch_stats = True  # Frozen BatchNorms keep their running statistics.

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10.0
    c.train.eval_every_epochs = 1.0
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 0  # 0: checkpoint only at evaluations (plus the end).
    c.train.keep_checkpoints = 2  # Latest checkpoints kept; the best-on-validation one is kept besides.
    c.train.progress_bar = True  # A bar on a terminal, plain log lines otherwise.
    c.train.early_stopping = ml_collections.ConfigDict(
        {"monitor": "loss", "patience": 0, "min_delta": 0.0}  # patience 0 disables; counted in evaluations.
    )
    c.train.select_best_on = "loss"  # Validation metric for the best checkpoint ('loss' is minimised).
    # Exponential moving average of the weights (parameters and BatchNorm statistics): when > 0 the
    # average, not the raw weights, is validated, selected as best and tested. The decay at step t is
    # min(ema_decay, (1 + t) / (10 + t)) (the warm-up of TensorFlow's ExponentialMovingAverage), so the
    # average forgets the random init: until t = (10 d - 1) / (1 - d) (890 steps for 0.99, 8990 for
    # 0.999) it spans about the last tenth of the steps taken, and only then the fixed ~1 / (1 - d).
    # 0 disables it.
    c.train.ema_decay = 0.0
    # Rematerialisation of the model's blocks (medjax/models/layers.py::REMAT_POLICIES): 'block' keeps
    # only each block's input for the backward pass and recomputes the rest there, 'block_save_matmuls'
    # also keeps the matmul outputs; 'none' keeps everything (fastest). Parameters and checkpoints are the
    # same either way. README ("--config.train.remat") gives what it saves and costs as measured.
    c.train.remat = "none"

    # `python -m medjax.evaluate`: how a trained run is judged (none of this changes training).
    c.eval = ml_collections.ConfigDict()
    c.eval.bootstrap_samples = 1000  # Resamples behind each 95 % interval.
    c.eval.target_sensitivity = 0.9  # Also report specificity at the validation threshold reaching this.
    c.eval.calibration_bins = 15  # Equal-width confidence bins of the expected calibration error.
    if task == "segmentation":
        _add_segmentation_defaults(c)
    if task == "pretrain":
        _add_pretrain_defaults(c)
    return c


def _add_pretrain_defaults(c: ml_collections.ConfigDict) -> None:
    """The keys pretraining adds (medjax.tasks.pretrain, medjax.pretraining)."""
    # Augmented views of each image per batch, stacked as (B, V, H, W, C): SimSiam compares 2.
    c.data.views = 2
    c.data.test_split = ""  # A pretraining run never looks at a test split.
    c.pretrain = ml_collections.ConfigDict(
        {
            # Output width of the heads: SimSiam's projection, or the teacher's feature width (1280 for
            # the ImageNet MobileNetV2) for distillation.
            "projection_dim": 256,
            "hidden_dim": 1024,  # Hidden width of the projector and distillation MLPs.
        }
    )


def _add_segmentation_defaults(c: ml_collections.ConfigDict) -> None:
    """The keys segmentation adds (medjax.data.seg_transforms, medjax.tasks.segmentation)."""
    # Training on random patches of full-resolution images (medjax.data.seg_transforms.RandomPatch):
    # side(s) of a patch, an int or (H, W); None: data.image_size.
    c.data.patch_size = ml_collections.FieldReference(None, field_type=object)
    c.data.foreground_prob = 0.33  # Patches centred on a labelled pixel (nnU-Net's oversampling).
    c.data.pad_multiple = 32  # Evaluation images are padded up to a multiple of this (the network's stride).
    c.data.cache_decoded = False  # Decode the training split once into memory (small full-res datasets).
    c.data.augment.scale = (1.0, 1.0)  # Zoom range of the joint rotation/zoom; (1, 1): no zoom.
    c.data.augment.elastic_alpha = 0.0  # Elastic deformation strength in pixels; 0: off.
    c.data.augment.elastic_sigma = 8.0  # Smoothness of the elastic displacement field (pixels).
    # Evaluation of images larger than this window (pixels, an int or (H, W)) tiles them with windows
    # overlapping by eval.window_overlap, blended with Gaussian weights; None: the whole image at once.
    c.eval.window = ml_collections.FieldReference(None, field_type=object)
    c.eval.window_overlap = 0.5
    c.eval.overlays = 3  # Best and worst images (cases for volumes) drawn by `python -m medjax.evaluate`.
    # Pixels in a score histogram behind the pixel AUC and its bootstrap (scores binned in [0, 1]).
    c.eval.auc_bins = 4096


def flatten(config: Mapping | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{'optim.learning_rate': 1e-3, ...}``: the dotted leaves of a (Config)dict."""
    items = config.items() if isinstance(config, Mapping) else config.to_dict().items()
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def close_matches(key: str, known: Iterable[str]) -> list[str]:
    """The known dotted keys that look like ``key`` (for 'did you mean' messages)."""
    known = list(known)
    leaf_matches = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    return sorted(set(difflib.get_close_matches(key, known, n=4, cutoff=0.6) + leaf_matches))[:5]


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks, before any work, that the keys the library reads are present and every value is in range
    or among its choices, builder kwargs included (:mod:`medjax.config_checks`).

    Raises:
      ConfigError: naming every missing key, or every value out of range with what it accepts.
    """
    from medjax import config_checks  # It imports the model and dataset registries lazily too.

    flat = flatten(config)
    missing = [k for k in REQUIRED_KEYS if k not in flat and not _is_empty_section(config, k)]
    if missing:
        raise ConfigError(f"Config is missing required keys: {', '.join(missing)}.")
    config_checks.check_values(config)


def complete_builder_kwargs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds every builder kwarg of ``config.data.name`` that ``config.data.builder_kwargs`` leaves out, at
    its default, so each is overridable as ``--config.data.builder_kwargs.<key>=...`` on a locked config
    and recorded in ``config.json``. Explicit defaults name the same prepared dataset as omitted ones.

    Returns ``config`` (changed in place); a config naming an unknown dataset is left for :func:`validate`.
    """
    from medjax.data import builders  # Late: TFDS is slow to import and most callers have it already.

    data = config.get("data")
    if data is None or data.get("name") not in builders.available_datasets():
        return config
    with config.unlocked():
        if data.get("builder_kwargs") is None:
            data.builder_kwargs = ml_collections.ConfigDict()
        kwargs = data.builder_kwargs
        for key, default in builders.accepted_kwargs(data.name).items():
            if key not in kwargs:
                kwargs[key] = (
                    ml_collections.FieldReference(None, field_type=object) if default is None else default
                )
    return config


def define_config_flag(name: str, help_string: str) -> flags.FlagHolder:
    """``config_flags.DEFINE_config_file`` (locked) whose configs carry every builder kwarg, so dotted
    overrides such as ``--config.data.builder_kwargs.skip_corrupt=True`` reach a key that exists."""
    holder = config_flags.DEFINE_config_file(name, None, help_string)
    parser = flags.FLAGS[name].parser
    load = parser.parse  # Loads the file; the flag applies the overrides to what this returns.
    parser.parse = lambda path: _completed(load(path))
    return holder


def _completed(config: Any) -> Any:
    return complete_builder_kwargs(config) if isinstance(config, ml_collections.ConfigDict) else config


def _is_empty_section(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return isinstance(node, ml_collections.ConfigDict)


def with_defaults(saved: Mapping) -> ml_collections.ConfigDict:
    """A saved config (a run's ``config.json``) with every key medjax added since filled in at its
    :func:`base_config` default, so a run written by an older medjax loads and behaves as it trained.

    Free-form sections (:data:`FREE_FORM_SECTIONS`) are taken as saved.
    """
    merged = json.loads(to_json(base_config(saved.get("task", "classification"))))

    def fill(into: dict, values: Mapping, prefix: str) -> None:
        for key, value in values.items():
            name = f"{prefix}{key}"
            if (
                isinstance(value, Mapping)
                and isinstance(into.get(key), dict)
                and name not in FREE_FORM_SECTIONS
            ):
                fill(into[key], value, f"{name}.")
            else:
                into[key] = value

    fill(merged, saved, "")
    return ml_collections.ConfigDict(merged)


def to_json(config: ml_collections.ConfigDict) -> str:
    """Stable JSON text of a config (what a run writes as ``config.json``)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def differing_keys(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring ``RESUMABLE_WITH_CHANGES``.

    A key missing from ``saved`` that ``current`` holds at its :func:`base_config` default does not
    differ: the run was written before medjax had the key, and a new key's default keeps the old
    behaviour.
    """
    a, b = flatten(saved), flatten(json.loads(json.dumps(current, default=str)))
    defaults = flatten(json.loads(to_json(base_config())))
    from medjax.data import builders  # Builder kwargs added later count as defaults too.

    if b.get("data.name") in builders.available_datasets():
        kwargs = {"data": {"builder_kwargs": builders.accepted_kwargs(b["data.name"])}}
        defaults.update(flatten(json.loads(json.dumps(kwargs, default=list))))

    def watched_only(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUMABLE_WITH_CHANGES)

    def added_at_default(key: str) -> bool:
        return key not in a and key in defaults and b.get(key) == defaults[key]

    keys = {k for k in set(a) | set(b) if not watched_only(k) and not added_at_default(k)}
    return sorted(k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>"))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``'configs/x.py[:arg]'`` the way ``--config`` does (for tests, notebooks and messages),
    builder kwargs completed (:func:`complete_builder_kwargs`)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"Config file {path!r} not found.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return complete_builder_kwargs(module.get_config(arg or None))


def unknown_override_keys(config: ml_collections.ConfigDict, argv: Iterable[str]) -> dict[str, list[str]]:
    """``--config.a.b=v`` overrides whose key the config lacks, each with its close matches."""
    known = flatten(config)
    known_all = set(known) | {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    unknown = {}
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known_all:
                unknown[key] = close_matches(key, known)
    return unknown


def apply_overrides(
    config: ml_collections.ConfigDict, assignments: Iterable[str]
) -> ml_collections.ConfigDict:
    """Sets ``'a.b=value'`` assignments on ``config`` (in place), as ``--config.a.b=value`` would, for
    scripts that build many configs; a value is a Python literal (``1e-4``, ``(0.3, 1.0)``, ``None``) or
    else a string.

    Raises:
      ConfigError: for an assignment without ``=`` or a key the config lacks (with its close matches).
    """
    known = flatten(config)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or key not in known:
            hint = f"; did you mean {', '.join(close_matches(key, known))}?" if sep else ""
            raise ConfigError(f"Cannot set {assignment!r}: expected key=value with a key of the config{hint}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[leaf] = value
    return config


def use_synthetic_data(config: ml_collections.ConfigDict, *, image_size: int = 64) -> None:
    """Switches ``config`` to the generated ``synthetic_ct`` dataset (the offline demo; not medical data).

    One grey channel at ``image_size``; every builder setting is spelled out so it can be overridden.
    """
    config.data.name = "synthetic_ct"
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {
            "image_size": image_size,
            "num_train": 1600,
            "num_validation": 400,
            "num_test": 400,
            "seed": 0,
            # Easier lesions than the builder's defaults (0.06-0.35, 0.05-0.15), which a 3-layer CNN needs
            # ~1000 steps for: with these, MobileNetV2 reaches test AUC > 0.9 in ~400 steps (covid_ct).
            "lesion_contrast": (0.25, 0.5),
            "lesion_radius": (0.1, 0.25),
        }
    )
    config.data.image_size = image_size
    config.data.channels = 1
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})


def make_smoke(config: ml_collections.ConfigDict) -> None:
    """Shrinks ``config`` to a run of seconds on tiny synthetic data, for tests (``:smoke`` variants)."""
    use_synthetic_data(config, image_size=32)
    config.data.builder_kwargs.update({"num_train": 64, "num_validation": 24, "num_test": 24})
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.train.num_epochs = 1.0
    config.train.eval_every_epochs = 0.5
    config.train.log_every_steps = 2
    config.train.progress_bar = False


def medmnist_config(
    subset: str, variant: str, *, learning_rate: float, num_epochs: float
) -> ml_collections.ConfigDict:
    """The MedMNIST v2 recipe shared by ``configs/pneumoniamnist.py`` and ``configs/breastmnist.py``.

    MobileNetV2 (width 0.5) on the official ``<subset>.npz`` split (28x28 grey, upsampled to 64 by the
    input pipeline so the stored dataset stays the official one), AdamW with warm-up and cosine decay,
    early stopping on validation loss. The file goes in ``data.manual_dir`` (default
    ``~/medjax_data/medmnist``). ``variant`` is 'real', 'synthetic' or 'smoke' as in every config.

    The augmentation goes beyond rotation (random resized crops, flips, brightness/contrast jitter)
    because PneumoniaMNIST's test images come from another cohort than train and validation, and
    broader augmentation is the usual defence against such a shift. It is a default, not a measured
    choice: no validation or cross-validation comparison backs it yet (``launch/cross_validate.py``
    makes one).
    """
    config = base_config()
    config.name = subset
    config.model_name = "mobilenet_v2"
    config.model = model_config("mobilenet_v2", width_multiplier=0.5, dropout_rate=0.2)
    config.data.name = "medmnist"
    config.data.manual_dir = "~/medjax_data/medmnist"
    config.data.builder_kwargs = ml_collections.ConfigDict(
        {"subset": subset, "image_size": 28, "channels": 1}
    )
    config.data.image_size = 64
    config.data.channels = 1
    config.data.normalize = ml_collections.ConfigDict({"mean": 0.5, "std": 0.25})
    config.data.augment.update(
        {
            "rotation_degrees": 10.0,
            "hflip": True,
            "random_resized_crop_scale": (0.7, 1.0),
            "brightness": 0.2,
            "contrast": 0.2,
        }
    )
    config.optim.name = "adamw"
    config.optim.learning_rate = learning_rate
    config.optim.warmup_epochs = 1.0
    config.train.num_epochs = num_epochs
    config.train.early_stopping.patience = 5
    if variant == "synthetic":
        use_synthetic_data(config, image_size=64)
        config.train.num_epochs = 8.0
    elif variant == "smoke":
        make_smoke(config)
        config.model.width_multiplier = 0.35
    elif variant != "real":
        raise ValueError(f"Unknown variant {variant!r} of {subset}; use real, synthetic or smoke.")
    return config


def model_config(model_name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """Every keyword argument of ``medjax.models.<model_name>.Model`` with its default, then ``overrides``.

    Spelling out all fields makes each one overridable from the command line (the config is locked) and
    recorded in ``config.json``.

    Raises:
      ValueError: for an override that is not a field of the model (listing the fields).
    """
    module = importlib.import_module(f"medjax.models.{model_name}")
    fields = {
        f.name: f.default
        for f in dataclasses.fields(module.Model)
        if f.init
        and f.name not in ("num_classes", "parent", "name", "remat")  # remat: train.remat sets it.
        and isinstance(f.default, bool | int | float | str | tuple | type(None))
    }
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"{model_name}.Model has no field(s) {unknown}; fields: {', '.join(sorted(fields))}."
        )
    fields.update(overrides)
    return ml_collections.ConfigDict(
        {
            k: ml_collections.FieldReference(None, field_type=object) if v is None else v
            for k, v in fields.items()
        }
    )
