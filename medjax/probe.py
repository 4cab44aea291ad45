"""Linear probe of frozen features: what a start knows about a labelled task before fine-tuning moves it.

A fine-tune's validation AUC mixes the start's features with the fine-tuning recipe and, on a validation
split of about a hundred images, a seed's luck. The probe fixes the features and fits only a logistic
regression on them (its regularisation chosen by stratified cross-validation on the labelled training
images alone, so validation is read once, to score). Comparing a start's probe with its fine-tune says
whether a weak result is the start or the recipe; comparing it with the teacher's probe says how much of
the teacher distillation carried over.

Features are the model's ``aux['features']`` (what its classifier reads: for ConvNeXt with study A's head,
after pooling, LayerNorm and SEVector), flattened per image, in evaluation mode.
"""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sklearn import linear_model, metrics, model_selection, pipeline, preprocessing

from medjax import inference, models, pretraining, run_dir, train_step

FeatureFn = Callable[[jax.Array], jax.Array]
# Inverse regularisation strengths the probe chooses among; 5 folds at most (fewer for a class with fewer
# images), scored by AUC like the fine-tunes.
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0)
PROBE_FOLDS = 5


def _flat_features(model, variables) -> FeatureFn:
    def features(images: jax.Array) -> jax.Array:
        _, aux = model.apply(variables, images, train=False)
        return aux["features"].reshape(images.shape[0], -1)

    return jax.jit(features)


def run_features(workdir: str | Path) -> FeatureFn:
    """Features of the best checkpoint of a run directory: a pretraining run's student, or a classifier."""
    run = run_dir.load_run(workdir, predicts=False)
    return _flat_features(run.model, run.variables)


def initial_features(config: ml_collections.ConfigDict, *, seed: int = 0) -> FeatureFn:
    """Features of ``config``'s model at its random initialisation (the from-scratch start)."""
    model = models.get_model(config.model_name, num_classes=2, **config.model)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    return _flat_features(
        model, train_step.init_variables(model, rng=jax.random.key(seed), image_shape=shape)
    )


def teacher_features(path: str, data_cfg: ml_collections.ConfigDict, image_size: int | None) -> FeatureFn:
    """Features of a distillation teacher (:func:`medjax.pretraining.load_teacher`) on the images of
    ``data_cfg`` (normalisation undone), resized to ``image_size`` as distillation feeds it."""
    teacher = pretraining.load_teacher(path)
    mean = jnp.asarray(data_cfg.normalize.mean, jnp.float32)
    std = jnp.asarray(data_cfg.normalize.std, jnp.float32)
    return jax.jit(lambda images: teacher.features(teacher.variables, images * std + mean, image_size))


def split_features(fn: FeatureFn, data_cfg: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, ...]:
    """``(features, labels)`` of every image of ``split``, in storage order, without augmentation."""
    out = inference.predict_split(
        lambda batch: {"features": fn(jnp.asarray(batch["image"]))}, data_cfg, split=split
    )
    return np.asarray(out["features"], np.float64), np.asarray(out["label"])


def linear_probe_auc(
    train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], *, seed: int = 0
) -> dict:
    """Fits a standardised logistic regression on ``train`` ``(features, labels)`` (C among
    :data:`PROBE_CS` by stratified cross-validation on train, scored by AUC) and scores ``validation``.

    Returns:
      ``{'auc', 'c', 'dim'}``: validation AUC (binary labels; one-vs-rest macro AUC otherwise), the chosen
      C and the feature width.
    """
    x, y = train
    folds = min(PROBE_FOLDS, int(np.bincount(y).min()))
    cv = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
    binary = len(np.unique(y)) == 2
    probe = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegressionCV(
            Cs=list(PROBE_CS),
            cv=cv,
            scoring="roc_auc" if binary else "roc_auc_ovr",
            max_iter=5000,
            l1_ratios=(0.0,),  # L2 only (scikit-learn 1.10's default, said explicitly).
            use_legacy_attributes=False,  # C_ a float, as from scikit-learn 1.10.
        ),
    ).fit(x, y)
    scores = probe.predict_proba(validation[0])
    auc = metrics.roc_auc_score(
        validation[1], scores[:, 1] if binary else scores, multi_class="raise" if binary else "ovr"
    )
    return {"auc": float(auc), "c": float(probe[-1].C_), "dim": int(x.shape[1])}


def probe(fn: FeatureFn, data_cfg: ml_collections.ConfigDict) -> dict:
    """:func:`linear_probe_auc` of ``fn``'s features on ``data_cfg``'s train and validation splits."""
    return linear_probe_auc(
        split_features(fn, data_cfg, data_cfg.train_split), split_features(fn, data_cfg, data_cfg.eval_split)
    )
