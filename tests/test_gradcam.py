"""Grad-CAM / Grad-CAM++: hand-computed maps on a model whose score gradient is known, the weights against
a numpy transcription of the paper's formula, the models' perturbation hook, and the sanity check that a
model trained on ``synthetic_ct`` puts its CAM mass on the generated lesions."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medjax import config_lib, gradcam, models, run_dir, train
from medjax.data import pipeline

from .conftest import ROOT

SIZE, CHANNELS, CLASSES = 6, 4, 3


class LinearHead(nn.Module):
    """relu(conv) feature map (at the input resolution unless ``stride`` > 1), then a Dense over the
    flattened map: the score of class k is ``sum_ijc A_ijc V_ijck + b_k``, so its gradient is
    ``V[..., k]``."""

    stride: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        a = nn.relu(nn.Conv(CHANNELS, (3, 3), strides=self.stride)(x))
        a = a if self.is_initializing() else self.perturb("feature_map", a)
        logits = nn.Dense(CLASSES, kernel_init=nn.initializers.normal(1.0))(a.reshape(len(a), -1))
        return logits, {"feature_map": a}


@pytest.fixture(scope="module")
def linear_head():
    model = LinearHead()
    x = np.random.default_rng(0).normal(size=(5, SIZE, SIZE, 1)).astype(np.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    logits, aux = model.apply(variables, x, train=False)
    v = np.asarray(variables["params"]["Dense_0"]["kernel"]).reshape(SIZE, SIZE, CHANNELS, CLASSES)
    return model, variables, x, np.asarray(logits), np.asarray(aux["feature_map"]), v


def _normalised(maps: np.ndarray) -> np.ndarray:
    """relu, bilinear upsampling to the input size with Pillow (independent of jax.image), peak -> 1."""
    bilinear = Image.Resampling.BILINEAR
    maps = np.stack(
        [
            Image.fromarray(m, "F").resize((SIZE, SIZE), bilinear)
            for m in np.maximum(maps, 0.0).astype(np.float32)
        ]
    )
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0)


def _gradcam_pp_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Chattopadhay et al. 2018, eq. 19 (exponential score), one image and channel at a time."""
    weights = np.zeros(a.shape[::3])
    for n in range(a.shape[0]):
        for c in range(a.shape[-1]):
            gc, ac = g[n, ..., c].astype(np.float64), a[n, ..., c].astype(np.float64)
            den = 2 * gc**2 + ac.sum() * gc**3
            alpha = np.divide(gc**2, den, out=np.zeros_like(gc), where=den != 0)
            weights[n, c] = (alpha * np.maximum(gc, 0)).sum()
    return weights


def test_gradcam_equals_hand_computation(linear_head):
    model, variables, x, logits, a, v = linear_head
    predicted = logits.argmax(-1)
    cams = gradcam.cam(model, variables, x)  # Predicted class by default.
    expected = _normalised(np.einsum("nhwc,nc->nhw", a, v.mean(axis=(0, 1))[:, predicted].T))
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-6)
    targets = np.array([2, 0, 1, 1, 0])
    cams = gradcam.cam(model, variables, x, target_class=targets)
    expected = _normalised(np.einsum("nhwc,nc->nhw", a, v.mean(axis=(0, 1))[:, targets].T))
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-6)
    assert cams.shape == (5, SIZE, SIZE) and cams.min() >= 0.0
    peaks = cams.max(axis=(1, 2))  # 1, or 0 where no position has positive evidence for the target.
    assert np.all(np.isclose(peaks, 1.0) | (peaks == 0.0)) and np.isclose(peaks, 1.0).sum() >= 3


def test_coarse_map_is_upsampled_to_the_input():
    model = LinearHead(stride=2)
    x = np.random.default_rng(2).normal(size=(3, SIZE, SIZE, 1)).astype(np.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
    a = np.asarray(model.apply(variables, x, train=False)[1]["feature_map"])
    h = SIZE // 2
    v = np.asarray(variables["params"]["Dense_0"]["kernel"]).reshape(h, h, CHANNELS, CLASSES)
    cams = gradcam.cam(model, variables, x, target_class=0)
    expected = _normalised(np.einsum("nhwc,c->nhw", a, v[..., 0].mean(axis=(0, 1))))
    assert a.shape[1:3] == (h, h) and cams.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-6)


def test_gradcam_plus_plus_equals_numpy_reference(linear_head):
    model, variables, x, _, a, v = linear_head
    out = gradcam.explain(model, variables, x, target_class=1, method="gradcam++", batch_size=2)
    g = np.broadcast_to(v[..., 1], a.shape)  # d score_1 / dA, the same for every image.
    expected = _normalised(np.einsum("nhwc,nc->nhw", a, _gradcam_pp_weights(a, g)))
    np.testing.assert_allclose(out.cams, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.target, 1)
    np.testing.assert_allclose(
        out.probs, jax.nn.softmax(model.apply(variables, x, train=False)[0]), rtol=1e-5
    )


def test_channel_weights_against_numpy_on_signed_maps():
    """Random signed activations and gradients with exact zeros: Grad-CAM is the spatial mean; Grad-CAM++
    sums relu(A) (our documented choice for signed maps) and gives 0 where the denominator vanishes."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    g = rng.normal(size=a.shape).astype(np.float32) * (rng.random(a.shape) > 0.3)
    np.testing.assert_allclose(
        gradcam.channel_weights(a, g, method="gradcam"), g.mean(axis=(1, 2)), rtol=1e-6
    )
    pp = gradcam.channel_weights(a, g, method="gradcam++")
    np.testing.assert_allclose(pp, _gradcam_pp_weights(np.maximum(a, 0.0), g), rtol=1e-4, atol=1e-6)
    assert not np.allclose(pp, _gradcam_pp_weights(a, g), rtol=1e-2)  # The relu matters on signed maps.
    with pytest.raises(ValueError, match="gradcam"):
        gradcam.channel_weights(a, g, method="cam")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mobilenet_v2", {"width_multiplier": 0.35}),
        ("convnext", {"depths": (1, 1), "widths": (8, 16)}),
        ("mednext_plos", {"widths": (8, 16), "depths": (1, 1), "ffn": ("smooth", "la")}),
    ],
)
def test_models_route_feature_map_through_perturbation(name, kwargs):
    """``init`` still returns only params / batch_stats, and the logits read a 'perturbations' entry shaped
    like ``aux['feature_map']`` (traced only, no compilation; the values are checked on ``LinearHead``
    and, for ConvNeXt, by the lesion-mask test)."""
    model = models.get_model(name, num_classes=2, **kwargs)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert set(variables) <= {"params", "batch_stats"}
    fmap = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)[1]["feature_map"]

    def logits(v, perturbation):
        return model.apply({**v, "perturbations": {"feature_map": perturbation}}, x, train=False)[0]

    closed = jax.make_jaxpr(logits)(variables, fmap)
    perturbation = closed.jaxpr.invars[-1]
    assert any(perturbation in eqn.invars for eqn in closed.jaxpr.eqns)


def test_mask_mass_fraction():
    cams = np.array([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = np.array([[[True, False], [False, False]]] * 2)
    np.testing.assert_array_equal(gradcam.mask_mass_fraction(cams, masks), [0.25, np.nan])


@pytest.fixture(scope="module")
def lesion_run(tfds_data_dir, tmp_path_factory):
    """A 2-stage ConvNeXt (8x8 feature map at 64 px, 15.6 k parameters, max pooling) trained 120 steps on
    easy synthetic_ct lesions: test AUC 0.991; about 30 s of CPU time, 60-130 s wall on the busy machine."""
    config = config_lib.load_config_file(f"{ROOT}/configs/covid_ct.py:synthetic")
    config.data.data_dir = str(tfds_data_dir)
    config.data.builder_kwargs.update(
        {
            "num_train": 640,
            "num_validation": 32,
            "num_test": 64,
            "lesion_contrast": (0.4, 0.6),
            "lesion_radius": (0.15, 0.3),
        }
    )
    config.data.eval_batch_size = 32
    config.model_name = "convnext"
    # XLA's depthwise convolution: on 16x16 and 8x8 maps it is as fast, and its gradient compiles in a
    # fraction of the custom one's time (same losses to the printed digit; about 10 s less per session).
    config.model = config_lib.model_config(
        "convnext", depths=(1, 1), widths=(16, 32), pooling="max", depthwise_impl="xla"
    )
    config.optim.learning_rate = 4e-3
    config.optim.warmup_epochs = 0.2
    config.train.num_epochs = 6.0
    config.train.eval_every_epochs = 6.0
    config.train.progress_bar = False
    workdir = tmp_path_factory.mktemp("lesion_run")
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.mark.parametrize("method", gradcam.METHODS)
def test_cam_mass_falls_inside_lesion_mask(lesion_run, method):
    """For lesion images, the lesion class's CAM puts several times more of its
    mass inside ``lesion_mask`` than the mask's area (what a map blind to the lesion would get)."""
    report = json.loads((lesion_run / "report.json").read_text())
    assert report["test"]["auc"] > 0.9, "the model did not learn; the CAM check would mean nothing"
    model = run_dir.load_run(lesion_run)
    source, _ = pipeline.load_source(model.config.data, "test")
    records = [source[i] for i in range(len(source)) if source[i]["label"] == 1]
    x = np.stack([model.preprocess(r["image"]) for r in records])
    masks = np.stack([r["lesion_mask"][..., 0] > 0 for r in records])
    cams = gradcam.cam(model, None, x, target_class=1, method=method)
    inside = float(np.nanmean(gradcam.mask_mass_fraction(cams, masks)))
    chance = float(masks.mean())
    print(f"{method}: CAM mass in lesion mask {inside:.3f}, mask area (chance) {chance:.3f}")
    assert inside > 3.0 * chance


def test_cli_core_writes_grid_and_summary(lesion_run, tmp_path):
    """``python -m medjax.gradcam``'s :func:`gradcam.run`: every test example counted once, the figure and
    the JSON written, and the mask statistic (predicted class, correct lesion images) above chance too."""
    figure, summary = gradcam.run(lesion_run, out=tmp_path, per_group=2, method="gradcam++")
    assert figure == tmp_path / "gradcampp_test.png"
    assert json.loads((tmp_path / "gradcampp_test.json").read_text()) == summary
    assert sum(summary["counts"].values()) == 64
    mask = summary["lesion_mask"]
    assert mask["examples"] >= 16 and mask["cam_mass_in_mask"] > 3.0 * mask["mask_area_fraction"]
    rows = sum(n > 0 for n in summary["counts"].values())
    with Image.open(figure) as image:  # One row of 2.4 inches at 100 dpi per (class, right/wrong) group.
        assert image.size[1] == round(240 * rows)
