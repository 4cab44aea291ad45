"""Loss terms and their composition from ``config.loss``.

Every term is a pure, keyword-only function ``term(*, logits, labels, aux, reduction=True, **params)``
returning the mean over the batch (``reduction=True``) or one value per example (``reduction=False``).
``aux`` is the model's auxiliary dict (``aux['features']`` is the pre-logit vector). A term may also
accept ``weights`` (per-example, 0 for padding) when it needs them for more than the final average, as
feature smoothing does for its class means.

Segmentation: ``logits`` ``(B, H, W, K)`` (any number of spatial axes) and integer ``labels`` ``(B, H, W)``.
The per-pixel terms (``cross_entropy``, ``focal``, ``dice``) accept ``pixel_weights`` ``(B, H, W)``: 0 marks
pixels that take no part (outside a field of view, padding of a sliding window or a short patch), and
``reduction=False`` gives one value per image (the pixel-weighted mean, or the image's Dice loss), so the
per-example weights and the composition below work unchanged. The terms built on ``aux['features']`` (one
vector and one class per image) refuse segmentation labels with a clear error.

``config.loss`` maps term names to ``{'weight': w, 'warmup_steps': n, **params}``; :func:`make_loss_fn`
turns it into one :class:`CompositeLoss` returning the weighted total and every term, so all of them are
logged. Terms defined outside the package (e.g. in a notebook) are passed in ``extra_terms`` without
editing this module. A term that needs state across steps (the class centres of ``center_loss``) is a
:class:`StatefulTerm`; its state lives in the train state and is checkpointed with it.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

LossTerm = Callable[..., jax.Array]


def _reduce(per_example: jax.Array, reduction: bool) -> jax.Array:
    return jnp.mean(per_example) if reduction else per_example


def _per_image(per_pixel: jax.Array, pixel_weights: jax.Array | None) -> jax.Array:
    """Classification values pass through; a per-pixel map becomes each image's weighted pixel mean (an
    image whose weights are all 0 gives 0)."""
    if per_pixel.ndim == 1:
        if pixel_weights is not None:
            raise ValueError("pixel_weights apply to segmentation (labels (B, H, W)), not to labels (B,)")
        return per_pixel
    spatial = tuple(range(1, per_pixel.ndim))
    if pixel_weights is None:
        return jnp.mean(per_pixel, axis=spatial)
    w = jnp.broadcast_to(pixel_weights.astype(jnp.float32), per_pixel.shape)
    return jnp.sum(per_pixel * w, axis=spatial) / jnp.maximum(jnp.sum(w, axis=spatial), 1e-12)


def _require_image_labels(labels: jax.Array, term: str) -> None:
    if labels.ndim != 1:
        raise ValueError(
            f"loss term {term!r} needs one class label per image (labels of shape (B,)), got labels of shape "
            f"{labels.shape}: it compares per-image feature vectors, which a segmentation map does not have. "
            f"Remove loss.{term} from the config of a segmentation run."
        )


def cross_entropy(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping | None = None,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    pixel_weights: jax.Array | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Softmax cross-entropy with optional label smoothing and per-class weights.

    Label smoothing mixes the one-hot target with the uniform distribution:
    ``(1 - s) * onehot + s / K``. Class weights multiply each example's (or pixel's) loss by the weight of
    its true class (``'balanced'`` in the config is resolved to ``N / (K * n_k)`` by :func:`make_loss_fn`).
    For segmentation each image's value is the ``pixel_weights``-weighted mean over its pixels.
    """
    del aux
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if class_weights is not None:
        per_example = per_example * jnp.asarray(class_weights, jnp.float32)[labels]
    return _reduce(_per_image(per_example, pixel_weights), reduction)


def focal(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping | None = None,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    pixel_weights: jax.Array | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``; gamma 0 is cross-entropy.

    For segmentation each image's value is the ``pixel_weights``-weighted mean over its pixels."""
    del aux
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    log_p_true = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    per_example = -((1.0 - jnp.exp(log_p_true)) ** gamma) * log_p_true
    if alpha is not None:
        per_example = per_example * jnp.asarray(alpha, jnp.float32)[labels]
    return _reduce(_per_image(per_example, pixel_weights), reduction)


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
    _require_image_labels(labels, "feature_smoothing")
    features = _features(aux, normalize)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * w[:, None]  # (B, K)
    counts = onehot.sum(axis=0)  # (K,)
    means = (onehot.T @ features) / jnp.maximum(counts, 1.0)[:, None]  # (K, D)
    per_example = jnp.sum((features - means[labels]) ** 2, axis=-1) * (w > 0)
    return _reduce(per_example, reduction)


def center_loss(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping,
    state: Mapping,
    normalize: bool = False,
    update_rate: float = 0.5,
    reduction: bool = True,
) -> jax.Array:
    """Feature smoothing against running class centres (center loss, Wen et al. 2016).

    ``L_i = ||f_i - c_{y_i}||^2`` with ``c`` the non-trainable centres in ``state['centers']`` (``K x D``),
    kept in the train state and checkpointed, and updated after every step by :func:`update_centers`. Unlike
    the batch variant it pulls features towards a class centre that persists across batches, so it also
    works with small batches where a class has one example. The centres get no gradient (they are state).
    ``update_rate`` is Wen et al.'s alpha, used by :func:`update_centers`.
    """
    del logits, update_rate
    _require_image_labels(labels, "center_loss")
    features = _features(aux, normalize)
    centers = jax.lax.stop_gradient(state["centers"])
    return _reduce(jnp.sum((features - centers[labels]) ** 2, axis=-1), reduction)


def init_centers(*, num_classes: int, feature_dim: int, **params) -> dict:
    """Zero centres, as in Wen et al.: the first updates move them to the class means."""
    del params
    return {"centers": jnp.zeros((num_classes, feature_dim), jnp.float32)}


def update_centers(
    state: Mapping,
    *,
    labels: jax.Array,
    aux: Mapping,
    weights: jax.Array,
    update_rate: float = 0.5,
    normalize: bool = False,
    **params,
) -> dict:
    """Wen et al.'s centre update: ``c_k -= update_rate * sum_{i: y_i = k} (c_k - f_i) / (1 + n_k)``.

    An exponential moving average towards the batch's class-``k`` features; classes absent from the batch
    (and padded examples, ``weights == 0``) leave their centre unchanged.
    """
    del params
    features = jax.lax.stop_gradient(_features(aux, normalize))
    centers = state["centers"]
    onehot = jax.nn.one_hot(labels, centers.shape[0], dtype=jnp.float32) * weights[:, None]  # (B, K)
    counts = onehot.sum(axis=0)
    delta = (counts[:, None] * centers - onehot.T @ features) / (1.0 + counts)[:, None]
    return {"centers": centers - update_rate * delta}


def supervised_contrastive(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping,
    weights: jax.Array | None = None,
    temperature: float = 0.1,
    reduction: bool = True,
) -> jax.Array:
    """Supervised contrastive loss (Khosla et al. 2020, ``L_out``) on L2-normalised ``aux['features']``.

    ``L_i = -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t))`` with ``P(i)``
    the other examples of ``i``'s class. An example without positives in the batch contributes 0; padded
    examples (``weights == 0``) are neither anchors nor contrasted against.
    """
    del logits
    _require_image_labels(labels, "supervised_contrastive")
    z = _features(aux, normalize=True)
    valid = jnp.ones(labels.shape, bool) if weights is None else weights > 0
    sim = (z @ z.T) / temperature
    others = valid[None, :] & ~jnp.eye(labels.shape[0], dtype=bool)
    log_prob = sim - jax.nn.logsumexp(jnp.where(others, sim, -jnp.inf), axis=1, keepdims=True)
    positives = others & (labels[:, None] == labels[None, :])
    num_pos = positives.sum(axis=1)
    mean_log_prob = jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)
    per_example = jnp.where(valid & (num_pos > 0), -mean_log_prob, 0.0)
    return _reduce(per_example, reduction)


def dice(
    *,
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping | None = None,
    include_background: bool = False,
    smooth: float = 1e-5,
    pixel_weights: jax.Array | None = None,
    batch: bool = False,
    weights: jax.Array | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Soft Dice loss for segmentation: ``1 - mean_k (2 |P_k G_k| + s) / (|P_k| + |G_k| + s)`` per image.

    ``logits`` are ``(B, H, W, K)`` (any number of spatial axes), ``labels`` integer maps ``(B, H, W)``;
    ``P`` are softmax probabilities and ``G`` one-hot labels, summed over each image's pixels (as MONAI's
    ``DiceLoss(softmax=True, to_onehot_y=True)``). Class 0 is background and left out unless
    ``include_background``. A class absent from both an image's target and prediction scores ``s / s``,
    i.e. no loss. ``pixel_weights`` ``(B, H, W)`` scale each pixel's share of every sum (0: not counted).

    ``batch=True`` sums over the whole batch before the ratio (nnU-Net's batch Dice), leaving out examples
    whose ``weights`` ``(B,)`` are 0 (padding). Per image, an image without foreground scores 1 for any
    false positive however small, so a data set where many images are empty teaches the model to predict
    nothing; pooled, such an image only adds its false positives to the batch's denominator. With
    ``reduction=False`` every example then carries the pooled loss, so any weighted mean of them (what
    :class:`CompositeLoss` takes) is the pooled loss.
    """
    del aux
    if labels.ndim != logits.ndim - 1 or labels.ndim < 2:
        raise ValueError(
            f"dice needs segmentation logits (B, H, W, K) and labels (B, H, W), got {logits.shape} and "
            f"{labels.shape}"
        )
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    w = jnp.ones(labels.shape, jnp.float32) if pixel_weights is None else pixel_weights.astype(jnp.float32)
    if batch and weights is not None:
        w = w * weights.astype(jnp.float32).reshape((-1,) + (1,) * (labels.ndim - 1))
    probs, target = probs * w[..., None], target * w[..., None]
    summed = tuple(range(0 if batch else 1, logits.ndim - 1))
    intersection = jnp.sum(probs * target, axis=summed)  # (B, K), or (K,) pooled
    denominator = jnp.sum(probs, axis=summed) + jnp.sum(target, axis=summed)
    per_class = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        per_class = per_class[..., 1:]
    per_example = jnp.broadcast_to(per_class.mean(axis=-1), labels.shape[:1])
    return _reduce(per_example, reduction)


def _features(aux: Mapping, normalize: bool) -> jax.Array:
    features = aux["features"].astype(jnp.float32)
    if normalize:
        features = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    return features


@dataclasses.dataclass(frozen=True)
class StatefulTerm:
    """A term with non-trainable state (kept in the train state, checkpointed, updated after each step).

    Attributes:
      loss: the term, called with ``state=`` besides the usual arguments.
      init: ``init(*, num_classes, feature_dim, **params) -> state``.
      update: ``update(state, *, labels, aux, weights, **params) -> state``, given stop-gradient features.
    """

    loss: LossTerm
    init: Callable[..., dict]
    update: Callable[..., dict]


TERMS: dict[str, LossTerm | StatefulTerm] = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "feature_smoothing": feature_smoothing,
    "center_loss": StatefulTerm(loss=center_loss, init=init_centers, update=update_centers),
    "supervised_contrastive": supervised_contrastive,
    "dice": dice,
}


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """``N / (K * n_k)`` (scikit-learn's 'balanced'); a class with no examples gets weight 0."""
    counts = [float(c) for c in class_counts]
    total, k = sum(counts), len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


@dataclasses.dataclass(frozen=True)
class _Term:
    name: str
    weight: float
    warmup_steps: int
    fn: LossTerm | StatefulTerm
    params: dict

    @property
    def loss(self) -> LossTerm:
        return self.fn.loss if isinstance(self.fn, StatefulTerm) else self.fn

    @functools.cached_property
    def takes_weights(self) -> bool:
        """Whether the term wants the per-example weights (read once, not at every trace)."""
        return "weights" in inspect.signature(self.loss).parameters

    @functools.cached_property
    def takes_pixel_weights(self) -> bool:
        return "pixel_weights" in inspect.signature(self.loss).parameters


@dataclasses.dataclass(frozen=True)
class CompositeLoss:
    """The weighted sum of configured terms; see :func:`make_loss_fn`.

    ``loss(logits, labels, aux, weights=None, *, pixel_weights=None, state=None, step=None) -> (total,
    {term: value})``: every term is averaged over the examples with non-zero ``weights`` (``(B,)``, 0 marks
    padding). ``pixel_weights`` (segmentation, ``(B, H, W)``) go to every term, which then leaves out the
    pixels weighted 0 (a field of view); a term without that argument is an error rather than ignoring
    them. A term's weight ramps linearly from 0 over its ``warmup_steps`` when ``step`` is given
    (training), and is full otherwise.
    Stateful terms (:class:`StatefulTerm`) read ``state[name]``; :meth:`init_state` and
    :meth:`update_state` create and advance that state, which the trainer keeps in its train state.
    """

    terms: tuple[_Term, ...]

    def __call__(self, logits, labels, aux, weights=None, *, pixel_weights=None, state=None, step=None):
        w = jnp.ones(labels.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
        denom = jnp.maximum(w.sum(), 1.0)
        values, total = {}, 0.0
        for term in self.terms:
            extra = {"weights": w} if term.takes_weights else {}
            if pixel_weights is not None:
                if not term.takes_pixel_weights:
                    raise ValueError(f"loss term {term.name!r} cannot leave pixels out (no pixel_weights)")
                extra["pixel_weights"] = pixel_weights
            if isinstance(term.fn, StatefulTerm):
                extra["state"] = (state or {})[term.name]
            per_example = term.loss(
                logits=logits, labels=labels, aux=aux, reduction=False, **extra, **term.params
            )
            values[term.name] = jnp.sum(per_example * w) / denom
            weight = term.weight
            if step is not None and term.warmup_steps > 0:
                weight = weight * jnp.minimum(1.0, step / term.warmup_steps)
            total = total + weight * values[term.name]
        return total, values

    @property
    def stateful(self) -> bool:
        """Whether any term keeps state (then the trainer needs the feature width to create it)."""
        return any(isinstance(t.fn, StatefulTerm) for t in self.terms)

    def init_state(self, *, num_classes: int, feature_dim: int) -> dict:
        """Initial state of every stateful term, by name (``{}`` when there is none)."""
        return {
            t.name: t.fn.init(num_classes=num_classes, feature_dim=feature_dim, **t.params)
            for t in self.terms
            if isinstance(t.fn, StatefulTerm)
        }

    def update_state(self, state: Mapping, *, labels, aux, weights=None) -> dict:
        """The state after a training step on this batch (features are taken without gradient)."""
        w = jnp.ones(labels.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
        aux = jax.lax.stop_gradient({"features": aux["features"]})
        return {
            t.name: t.fn.update(state[t.name], labels=labels, aux=aux, weights=w, **t.params)
            for t in self.terms
            if isinstance(t.fn, StatefulTerm)
        }


def make_loss_fn(
    loss_config: Mapping,
    *,
    class_counts: Sequence[int] | None = None,
    extra_terms: Mapping[str, LossTerm | StatefulTerm] | None = None,
) -> CompositeLoss:
    """Builds the weighted sum of the terms in ``config.loss``.

    Args:
      loss_config: ``{name: {'weight': w, 'warmup_steps': n (optional), **params}}``. A ``class_weights``
        or ``alpha`` of ``'balanced'`` is resolved from ``class_counts``.
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
        warmup_steps = int(params.pop("warmup_steps", 0))
        for key in ("class_weights", "alpha"):
            if params.get(key) == "balanced":
                if class_counts is None:
                    raise ValueError(f"loss.{name}.{key}='balanced' needs the training label counts.")
                params[key] = balanced_class_weights(class_counts)
        terms.append(_Term(name, weight, warmup_steps, registry[name], params))
    return CompositeLoss(tuple(terms))
