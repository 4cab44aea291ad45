"""Loss terms and their composition from ``config.loss``.

Every term is a pure, keyword-only function ``term(*, logits, labels, aux, reduction=True, **params)``
returning the mean over the batch (``reduction=True``) or one value per example (``reduction=False``).
``aux`` is the model's auxiliary dict (``aux['features']`` is the pre-logit vector). A term may also
accept ``weights`` (per-example, 0 for padding) when it needs them for more than the final average, as
feature smoothing does for its class means.

``config.loss`` maps term names to ``{'weight': w, **params}``; :func:`make_loss_fn` turns it into one
function returning the weighted total and every term, so all of them are logged. Terms defined outside
the package (e.g. in a notebook) are passed in ``extra_terms`` without editing this module.
"""

import inspect
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

LossTerm = Callable[..., jax.Array]


def _reduce(per_example: jax.Array, reduction: bool) -> jax.Array:
    return jnp.mean(per_example) if reduction else per_example


def cross_entropy(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping | None = None,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Softmax cross-entropy with optional label smoothing and per-class weights.

    Label smoothing mixes the one-hot target with the uniform distribution:
    ``(1 - s) * onehot + s / K``. Class weights multiply each example's loss by the weight of its true
    class (``'balanced'`` in the config is resolved to ``N / (K * n_k)`` by :func:`make_loss_fn`).
    """
    del aux
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if class_weights is not None:
        per_example = per_example * jnp.asarray(class_weights, jnp.float32)[labels]
    return _reduce(per_example, reduction)


def focal(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping | None = None,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``; gamma 0 is cross-entropy."""
    del aux
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    log_p_true = jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    per_example = -((1.0 - jnp.exp(log_p_true)) ** gamma) * log_p_true
    if alpha is not None:
        per_example = per_example * jnp.asarray(alpha, jnp.float32)[labels]
    return _reduce(per_example, reduction)


def feature_smoothing(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping,
    weights: jax.Array | None = None,
    normalize: bool = False,
    reduction: bool = True,
) -> jax.Array:
    """Study A's feature-smoothing term: squared distance of each feature to its class's batch mean.

    ``L = mean_i ||f_i - mu_{y_i}||^2`` with ``mu_k`` the mean feature of the batch's class-``k`` examples
    (weighted by ``weights`` so padded examples take no part). It is the batch's intra-class variance
    summed over feature dimensions, and pulls same-class features together. Classes absent from the batch
    contribute nothing; a one-example class contributes zero. This is our documented reading of the paper
    (PAPERS.md A); the gradient through ``mu`` cancels exactly (``sum_i (f_i - mu) = 0``), so stopping it
    would change nothing. ``normalize=True`` L2-normalises features first, which bounds the term.
    """
    features = aux["features"].astype(jnp.float32)
    if normalize:
        features = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * w[:, None]  # (B, K)
    counts = onehot.sum(axis=0)  # (K,)
    means = (onehot.T @ features) / jnp.maximum(counts, 1.0)[:, None]  # (K, D)
    per_example = jnp.sum((features - means[labels]) ** 2, axis=-1) * (w > 0)
    return _reduce(per_example, reduction)


TERMS: dict[str, LossTerm] = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "feature_smoothing": feature_smoothing,
}


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """``N / (K * n_k)`` (scikit-learn's 'balanced'); a class with no examples gets weight 0."""
    counts = [float(c) for c in class_counts]
    total, k = sum(counts), len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


def make_loss_fn(
    loss_config: Mapping,
    *,
    class_counts: Sequence[int] | None = None,
    extra_terms: Mapping[str, LossTerm] | None = None,
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """Builds ``loss_fn(logits, labels, aux, weights) -> (total, {term: value})`` from ``config.loss``.

    Args:
      loss_config: ``{name: {'weight': w, **params}}``. A ``class_weights`` or ``alpha`` of
        ``'balanced'`` is resolved from ``class_counts``.
      class_counts: training examples per class (needed only for ``'balanced'``).
      extra_terms: additional terms by name, e.g. defined in a notebook; they override built-ins.

    Raises:
      ValueError: for an unknown term (listing the known ones) or a term without a ``weight``.
    """
    registry = {**TERMS, **(extra_terms or {})}
    terms = []
    for name, spec in dict(loss_config).items():
        if name not in registry:
            raise ValueError(f"Unknown loss term {name!r}; known terms: {', '.join(sorted(registry))}.")
        params = dict(spec)
        if "weight" not in params:
            raise ValueError(f"Loss term {name!r} needs a 'weight' (got keys {sorted(params)}).")
        weight = float(params.pop("weight"))
        for key in ("class_weights", "alpha"):
            if params.get(key) == "balanced":
                if class_counts is None:
                    raise ValueError(f"loss.{name}.{key}='balanced' needs the training label counts.")
                params[key] = balanced_class_weights(class_counts)
        fn = registry[name]
        takes_weights = "weights" in inspect.signature(fn).parameters
        terms.append((name, weight, fn, params, takes_weights))

    def loss_fn(logits, labels, aux, weights=None):
        w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
        denom = jnp.maximum(w.sum(), 1.0)
        values, total = {}, 0.0
        for name, weight, fn, params, takes_weights in terms:
            extra = {"weights": w} if takes_weights else {}
            per_example = fn(logits=logits, labels=labels, aux=aux, reduction=False, **extra, **params)
            values[name] = jnp.sum(per_example * w) / denom
            total = total + weight * values[name]
        return total, values

    return loss_fn
