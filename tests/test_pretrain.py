"""Pretraining (medjax/tasks/pretrain.py, medjax/pretraining.py): the objectives on hand-computed cases,
two-view batches, and a smoke pretraining run whose run directory starts a classification run."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from medjax import (
    config_lib,
    export,
    gradcam,
    init_from,
    models,
    pretraining,
    probe,
    recipes,
    run_dir,
    tasks,
    train,
    train_step,
)
from medjax.data import transforms
from medjax.errors import ConfigError, MedjaxError
from medjax.evaluate.command import evaluate_run
from tests.conftest import ROOT, shared_weights_dir, smoke_config

PRETRAIN_SMOKE = f"{ROOT}/configs/pretrain.py:smoke,method=simsiam"
TFLITE_TEACHER = shared_weights_dir() / recipes.IMAGENET_MOBILENET_V2_FILE


def test_simsiam_loss_hand_computed_and_targets_get_no_gradient():
    # One image: p1 = (1, 0), p2 = (0, 2); z1 = (1, 1), z2 = (3, 0).
    p = jnp.asarray([[[1.0, 0.0], [0.0, 2.0]]])
    z = jnp.asarray([[[1.0, 1.0], [3.0, 0.0]]])
    # cos(p1, z2) = 1, cos(p2, z1) = 1/sqrt(2): loss = -(1 + 0.7071) / 2.
    expected = -(1.0 + 1.0 / np.sqrt(2.0)) / 2.0

    def loss(p, z):
        return pretraining.simsiam(logits={"simsiam": p}, labels=jnp.zeros(1), aux={"projection": z})

    np.testing.assert_allclose(loss(p, z), expected, rtol=1e-6)
    grad_p, grad_z = jax.grad(loss, argnums=(0, 1))(p, z)
    np.testing.assert_array_equal(grad_z, 0.0)  # Stop-gradient: the target branch learns nothing.
    # d/dp2 of -cos(p2, z1)/2 at p2 = (0, 2), z1/|z1| = (1, 1)/sqrt(2): -(u - cos * p2/|p2|) / (2 |p2|).
    u = np.array([1.0, 1.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(grad_p[0, 1], -(u - u[1] * np.array([0.0, 1.0])) / 4.0, atol=1e-6)
    with pytest.raises(ConfigError, match="data.views=2"):
        loss(p[:, :1], z[:, :1])


def test_feature_distances_hand_computed_and_safe_at_zero():
    q = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    t = jnp.asarray([[4.0, 3.0], [1.0, 0.0]])
    # cosine: 1 - 24/25; a zero projection has cosine 0 (distance 1) and a finite gradient.
    np.testing.assert_allclose(
        pretraining.feature_distance(q, t, "cosine"), [1.0 - 24.0 / 25.0, 1.0], rtol=1e-5
    )
    np.testing.assert_allclose(pretraining.feature_distance(q, t, "mse"), [1.0, 0.5])
    grad = jax.grad(lambda q: pretraining.feature_distance(q, t, "cosine").sum())(q)
    assert np.all(np.isfinite(grad))
    with pytest.raises(ConfigError, match="distance"):
        pretraining.feature_distance(q, t, "l1")


def test_views_stacks_independent_augmentations_reproducibly():
    steps = (transforms.RandomHorizontalFlip(), transforms.RandomBrightnessContrast(0.4, 0.4))
    views = transforms.Views(steps, count=2)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    out = views.random_map({"image": image, "label": 1}, np.random.default_rng(3))
    assert out["image"].shape == (2, 8, 8, 1) and out["label"] == 1
    assert not np.array_equal(out["image"][0], out["image"][1])
    again = views.random_map({"image": image, "label": 1}, np.random.default_rng(3))
    np.testing.assert_array_equal(out["image"], again["image"])
    assert isinstance(views, grain.transforms.RandomMap)


def test_students_variables_are_the_classifiers():
    """For both students the wrapper's ``student`` subtree is exactly the classification model's tree,
    so every backbone array transfers (shapes only: nothing is computed)."""
    for model_name in ("convnext", "mednext_plos"):
        config = config_lib.load_config_file(
            f"{PRETRAIN_SMOKE.replace('convnext', model_name)},model={model_name}"
        )
        classifier = models.get_model(model_name, num_classes=4, **config.model)
        wrapper = tasks.training_model(tasks.get_task("pretrain"), classifier, config)
        wrapped = run_dir.abstract_variables(wrapper, (2, 32, 32, 1))  # Two views of 32x32 grey.
        plain = run_dir.abstract_variables(classifier, (32, 32, 1))
        student = pretraining.student_variables(wrapped)
        assert jax.tree.map(lambda x: x.shape, student) == jax.tree.map(lambda x: x.shape, plain)


def test_config_without_objective_is_refused():
    config = config_lib.load_config_file(PRETRAIN_SMOKE)
    config.loss = config_lib.base_config().loss  # Cross-entropy: no pretraining objective.
    classifier = models.get_model(config.model_name, num_classes=2, **config.model)
    with pytest.raises(ConfigError, match="loss.simsiam and/or loss.distillation"):
        tasks.training_model(tasks.get_task("pretrain"), classifier, config)


@pytest.fixture(scope="module")
def pretrain_run(tfds_data_dir, smoke_run, tmp_path_factory):
    """SimSiam and distillation together (one compiled step for both objectives), the session's smoke
    MobileNetV2 run as the teacher."""
    config = smoke_config(tfds_data_dir, PRETRAIN_SMOKE)
    with config.unlocked():
        config.loss.distillation = {"weight": 1.0, "teacher": str(smoke_run), "distance": "cosine"}
    config.pretrain.projection_dim = 1280  # The teacher's feature width.
    workdir = tmp_path_factory.mktemp("pretrain_run")
    report = train.train_and_evaluate(config, workdir)
    return config, workdir, report


def test_pretraining_run_trains_without_touching_the_teacher(pretrain_run):
    config, workdir, report = pretrain_run
    assert "test" not in report and 0.0 < report["validation"]["feature_std"] <= 1.0 + 1e-9  # At most 1.
    lines = run_dir.RunDir(workdir).metrics_file.read_text()
    assert "loss_simsiam" in lines and "loss_distillation" in lines
    # The latest checkpoint's teacher (the distillation term's state) is the teacher as loaded.
    exp = train_step.build(config)
    ckpt = run_dir.RunDir(workdir).checkpointer(config)
    step, state, _ = ckpt.restore_latest(abstract_state=exp.state)
    ckpt.close()
    assert step == report["steps"]
    teacher = pretraining.load_teacher(config.loss.distillation.teacher).variables
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.loss_state["distillation"]), teacher)


def test_pretraining_run_starts_study_a_classifier(pretrain_run, tfds_data_dir):
    _, workdir, _ = pretrain_run
    config = smoke_config(tfds_data_dir, f"{ROOT}/configs/brain_mri.py:smoke")
    config.init_from.path = str(workdir)
    model = models.get_model(config.model_name, num_classes=2, **config.model)
    image_shape = (32, 32, 1)
    fresh = train_step.init_variables(model, rng=jax.random.key(5), image_shape=image_shape)
    started = traverse_util.flatten_dict(init_from.initial_variables(config, model, fresh, image_shape))
    source = run_dir.load_run(workdir, predicts=False).variables
    source = traverse_util.flatten_dict(pretraining.student_variables(source))
    fresh = traverse_util.flatten_dict(fresh)
    assert started.keys() == fresh.keys()
    for path, value in started.items():
        expected = fresh[path] if path[1] == "classifier" else source[path]
        np.testing.assert_array_equal(value, expected, err_msg="/".join(path))
    assert any(path[1] == "sevector" for path in started)  # Study A's head transfers with the backbone.


def test_pretraining_run_continues_from_a_pretrained_student(pretrain_run):
    """Self-Trans' order (a pretrained network, then self-supervision on the target's images): a
    pretraining config's init_from starts the student only; the objectives' heads and the unused
    classifier keep their fresh values."""
    config, workdir, _ = pretrain_run
    config = config.copy_and_resolve_references()
    config.init_from.path = str(workdir)
    task = tasks.get_task("pretrain")
    student = models.get_model(config.model_name, num_classes=2, **config.model)
    model = tasks.training_model(task, student, config)
    image_shape = (32, 32, 1)
    fresh = train_step.init_variables(model, rng=jax.random.key(7), image_shape=image_shape)
    started = traverse_util.flatten_dict(init_from.initial_variables(config, model, fresh, image_shape))
    source = traverse_util.flatten_dict(run_dir.load_run(workdir, predicts=False).variables)
    fresh = traverse_util.flatten_dict(fresh)
    assert started.keys() == fresh.keys()
    copied = 0
    for path, value in started.items():
        from_source = path[1] == "student" and path[2] != "classifier"
        np.testing.assert_array_equal(value, source[path] if from_source else fresh[path], "/".join(path))
        copied += from_source and not np.array_equal(source[path], fresh[path])
    assert copied > 10  # The source trained: its student differs from a fresh one.


def test_probe_reads_the_students_features_of_a_pretraining_run(pretrain_run):
    config, workdir, _ = pretrain_run
    images = jnp.asarray(np.random.default_rng(0).random((3, 32, 32, 1), np.float32))
    run = run_dir.load_run(workdir, predicts=False)
    _, aux = run.model.apply(run.variables, images, train=False)
    np.testing.assert_allclose(probe.run_features(workdir)(images), aux["features"][:, 0], atol=1e-6)
    data = config.data.copy_and_resolve_references()
    data.views = 1  # The probe reads labelled images one view each, as a fine-tune would.
    scored = probe.probe(probe.run_features(workdir), data)
    assert 0.0 <= scored["auc"] <= 1.0 and scored["dim"] == aux["features"].shape[-1]
    scratch = probe.initial_features(config)(images)
    assert scratch.shape == (3, aux["features"].shape[-1]) and not np.allclose(scratch, aux["features"][:, 0])


def test_after_training_commands_refuse_a_pretraining_run_naming_the_fix(tmp_path):
    """predict (which calls load_run), Grad-CAM, export and evaluate stop at the run's config.json,
    before reading anything else (this run directory holds nothing more), and say what the run is and
    how to fine-tune from it."""
    config = config_lib.load_config_file(f"{ROOT}/configs/pretrain.py:smoke")  # Distillation.
    workdir = tmp_path / "pretrain_run"
    run_dir.RunDir(workdir).write_config(config)
    commands = {
        "load_run": run_dir.load_run,
        "gradcam": gradcam.run,
        "export": export.export_run,
        "evaluate": lambda w: evaluate_run(w, out=tmp_path / "evaluation"),
    }
    teacher = config.loss.distillation.teacher
    for name, command in commands.items():
        with pytest.raises(MedjaxError) as raised:
            command(workdir)
        message = str(raised.value)
        assert message.startswith(
            f"{workdir} is a pretraining run (task 'pretrain', distillation from {teacher}): its checkpoint "
            "holds a convnext backbone"
        ), name
        assert (
            "python -m medjax.launch --config=configs/chest_xray.py:variant=scratch,model=convnext "
            f"--config.data.manual_dir=<labelled images> --config.init_from.path={workdir}" in message
        ), name
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "pretrain_run"]  # Nothing written.


@pytest.mark.skipif(not TFLITE_TEACHER.is_file(), reason=f"no ImageNet MobileNetV2 at {TFLITE_TEACHER}")
def test_distillation_from_the_imagenet_tflite_teacher(tfds_data_dir, tmp_path):
    """configs/pretrain.py's default objective with the real .tflite teacher, two steps on 32 px grey
    views (the teacher at the student's size), and the teacher fed as the file wants: the cat picture
    in [0, 1], through :meth:`Teacher.features` and the file's own classifier, is its documented
    'Egyptian cat' (../shared/data/README.md), which a wrong range, channel count or order breaks."""
    config = smoke_config(
        tfds_data_dir, f"{ROOT}/configs/pretrain.py:smoke", num_epochs=2 / 8, eval_every_epochs=2 / 8
    )
    config.loss.distillation.teacher = str(TFLITE_TEACHER)
    report = train.train_and_evaluate(config, tmp_path / "run")
    assert report["steps"] == 2 and 0.0 < report["validation"]["feature_std"] <= 1.0 + 1e-9
    # 1 - cos of a projection and a ReLU6 embedding: finite, and in [0, 2].
    assert 0.0 < report["validation"]["loss"] < 2.0
    assert "loss_distillation" in run_dir.RunDir(tmp_path / "run").metrics_file.read_text()

    teacher = pretraining.load_teacher(str(TFLITE_TEACHER))
    folder = TFLITE_TEACHER.parent
    cat = Image.open(folder / "cat.bmp").convert("RGB").resize((224, 224), Image.BILINEAR)
    pixels = jnp.asarray(np.asarray(cat, np.float32)[None] / 255.0)
    features = jax.jit(lambda v, x: teacher.features(v, x, None))(teacher.variables, pixels)
    head = teacher.variables["params"]["classifier"]
    labels = (folder / "imagenet_labels.txt").read_text().splitlines()
    assert labels[int(jnp.argmax(features @ head["kernel"] + head["bias"]))] == "Egyptian cat"


@pytest.mark.skipif(not TFLITE_TEACHER.is_file(), reason=f"no ImageNet MobileNetV2 at {TFLITE_TEACHER}")
def test_simsiam_continues_from_the_imagenet_mobilenet_v2(tfds_data_dir, tmp_path):
    """configs/pretrain.py's ImageNet student: two SimSiam steps from the converted, calibrated .tflite
    (its student is exactly the network the file's conversion gives before training), and the run then
    starts the fine-tuning config it is meant for, configs/ucsd_covid_ct.py:cpu, array for array."""
    spec = f"{ROOT}/configs/pretrain.py:smoke,model=mobilenet_v2,student=imagenet,method=simsiam"
    config = smoke_config(tfds_data_dir, spec, num_epochs=2 / 8, eval_every_epochs=2 / 8)
    config.init_from.path = str(TFLITE_TEACHER)
    assert config.data.channels == 3 and dict(config.data.normalize) == recipes.INPUT_RANGES["symmetric"]

    student = models.get_model(config.model_name, num_classes=2, **config.model)
    model = tasks.training_model(tasks.get_task("pretrain"), student, config)
    image_shape = (32, 32, 3)
    fresh = train_step.init_variables(model, rng=jax.random.key(3), image_shape=image_shape)
    started = init_from.initial_variables(config, model, fresh, image_shape)
    converted = init_from.initial_variables(
        config, student, pretraining.student_variables(fresh), image_shape
    )
    jax.tree.map(np.testing.assert_array_equal, pretraining.student_variables(started), converted)
    heads = {name: tree for name, tree in started["params"].items() if name != "student"}
    jax.tree.map(np.testing.assert_array_equal, heads, {name: fresh["params"][name] for name in heads})

    report = train.train_and_evaluate(config, tmp_path / "run")
    assert report["steps"] == 2 and 0.0 < report["validation"]["feature_std"] <= 1.0 + 1e-9

    finetune = config_lib.load_config_file(f"{ROOT}/configs/ucsd_covid_ct.py:cpu")
    finetune.init_from.path = str(tmp_path / "run")
    classifier = models.get_model(finetune.model_name, num_classes=2, **finetune.model)
    target = train_step.init_variables(classifier, rng=jax.random.key(4), image_shape=image_shape)
    copied = init_from.initial_variables(finetune, classifier, target, image_shape)
    source = pretraining.student_variables(run_dir.load_run(tmp_path / "run", predicts=False).variables)
    np.testing.assert_array_equal(
        copied["params"]["block_16"]["project"]["kernel"], source["params"]["block_16"]["project"]["kernel"]
    )
