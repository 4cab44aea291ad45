"""Exports a trained run for deployment: ``python -m medjax.export --workdir=RUN [--out=DIR] [--onnx]``.

A deployment should need neither the training state nor medjax's model code. From the run's best
checkpoint (:func:`medjax.run_dir.load_run`) this writes, into ``<out>`` (default ``<workdir>/export``):

- ``params/``: an Orbax checkpoint of ``{'params', 'batch_stats'}`` only (no optimizer state, no data
  iterator), restorable with no target tree (:func:`load_params`), for fine-tuning or re-export. An
  ensemble's holds ``{'member_<k>': {'params', 'batch_stats'}}``.
- ``probs_<dtype>.jax``: a serialized :mod:`jax.export` artifact, ``(B, H, W, C) images -> (B, K)
  class probabilities``, weights embedded as constants and ``B`` symbolic, so one file serves every batch
  size. ``uint8`` takes decoded pixels already resized to ``H x W`` with ``C`` channels and applies the
  run's ``/255`` and ``(x - mean) / std`` inside the graph (a deployer cannot get normalisation wrong);
  ``float32`` takes the output of :meth:`TrainedModel.preprocess`. Each file holds its own copy of the
  weights, so ``--input_dtypes=uint8`` halves the export. Loading needs only ``jax`` and ``flatbuffers``
  (:func:`load_exported` shows the five lines).
- ``probs_<dtype>.onnx`` with ``--onnx`` (needs ``jax2onnx`` and ``onnxruntime``): the same function as
  ONNX with a dynamic batch axis, checked against onnxruntime at export time.
- ``metadata.json``: class names, input shape and dtypes, normalisation, jax version, parameter count,
  the size in bytes of every artifact, and under ``members`` each run's workdir, config and model name,
  training step and parameter count.

``--workdir`` repeated (with ``--out``) exports an ensemble as one artifact: the mean of the runs' class
probabilities, exactly what ``python -m medjax.evaluate`` judges for the same runs. Its members must
share class names, input shape and normalisation (runs of one config with different seeds do).

Resizing stays outside the artifacts: it is data-dependent and the run resized with Pillow
(``config.data.interpolation``), which a deployer reproduces with the same library.
"""

import contextlib
import io
import json
import logging as std_logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import linen as nn

from medjax import cli, run_dir
from medjax.errors import MedjaxError
from medjax.finite import check_outputs
from medjax.models import native

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
INPUT_DTYPES = ("uint8", "float32")
# Largest |ONNX - JAX| probability accepted at export time: the runtimes' kernels round differently, and
# deep nets amplify float32 rounding (1e-5 seen on tests/test_export.py's model for a 1-ulp change).
ONNX_TOLERANCE = 1e-4


def probability_fn(
    model: nn.Module, variables: dict, *, input_dtype: str, mean: np.ndarray, std: np.ndarray
) -> Callable[[jax.Array], jax.Array]:
    """``images -> softmax probabilities`` in inference mode, ``variables`` closed over.

    Closing over the variables (instead of passing them) makes the exported graph carry them as
    constants, so the artifact is the whole model.

    Args:
      model: the Flax module of the run.
      variables: its ``{'params', 'batch_stats'}``.
      input_dtype: 'uint8' (pixels in 0..255, normalised inside) or 'float32' (already preprocessed).
      mean, std: the run's ``config.data.normalize`` after scaling to [0, 1] (scalar or per channel).
    """
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    # uint8 -> normalised float through a (256, C) table computed by numpy exactly as ScaleAndNormalize
    # does, so the artifact sees bit-identical inputs (XLA would rewrite / 255 as * (1 / 255)).
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

    def probabilities(images: jax.Array) -> jax.Array:
        if input_dtype == "uint8":
            channels = images.shape[-1]
            x = jnp.asarray(np.broadcast_to(table, (256, channels)))[images, jnp.arange(channels)]
        else:
            x = images.astype(jnp.float32)
        # Without the barrier XLA constant-folds the BatchNorm arithmetic into the weights and rounds it
        # differently from the jitted model with weights as arguments (1e-5 on probabilities of a
        # sensitive net); with it the artifact computes exactly what TrainedModel.predict_proba does.
        logits, _ = model.apply(jax.lax.optimization_barrier(variables), x, train=False)
        return jax.nn.softmax(logits, axis=-1)

    return probabilities


def _configured_normalisation(trained: run_dir.TrainedModel) -> list:
    """``[mean, std]`` as the config states them (plain numbers: messages show 0.4, not 0.40000001)."""
    norm = trained.config.data.normalize
    return [np.asarray(norm.mean).tolist(), np.asarray(norm.std).tolist()]


def _normalisation(trained: run_dir.TrainedModel) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` in float32, as the eval pipeline applies them."""
    mean, std = _configured_normalisation(trained)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


Members = run_dir.TrainedModel | Sequence[run_dir.TrainedModel]


def _as_members(members: Members) -> list[run_dir.TrainedModel]:
    """One run or an ensemble's runs as a non-empty list, checked to be exportable as one artifact.

    Raises:
      MedjaxError: when there is no run, or a member's class names, input shape or normalisation
        differ from the first member's (one artifact takes one kind of input), naming both runs.
    """
    members = [members] if isinstance(members, run_dir.TrainedModel) else list(members)
    if not members:
        raise MedjaxError("No run to export: pass at least one --workdir.")
    first = members[0]
    for member in members[1:]:
        for what, get in (
            ("class names", lambda m: list(m.class_names)),
            ("input shape", lambda m: m.image_shape),
            ("normalisation (mean, std)", _configured_normalisation),
        ):
            if get(member) != get(first):
                raise MedjaxError(
                    f"{member.workdir} has {what} {get(member)} but {first.workdir} has {get(first)}: "
                    "an exported ensemble takes one input and names one set of classes, so its members "
                    "must share class names, input shape and normalisation."
                )
    return members


def _members_fn(
    members: Sequence[run_dir.TrainedModel], *, input_dtype: str, depthwise_impl: str | None = None
) -> Callable[[jax.Array], jax.Array]:
    """The :func:`probability_fn` of one run, or the mean of several runs' (an ensemble).

    Args:
      depthwise_impl: rebuilds the models with this ``depthwise_impl`` where they have one.
    """
    fns = []
    for member in members:
        model = member.model
        if depthwise_impl is not None and hasattr(model, "depthwise_impl"):
            model = model.clone(depthwise_impl=depthwise_impl)
        mean, std = _normalisation(member)
        fns.append(probability_fn(model, member.variables, input_dtype=input_dtype, mean=mean, std=std))
    if len(fns) == 1:
        return fns[0]
    return lambda images: jnp.mean(jnp.stack([fn(images) for fn in fns]), axis=0)


def _input_spec(members: Sequence[run_dir.TrainedModel], input_dtype: str, name: str):
    (batch,) = jax.export.symbolic_shape(name, constraints=(f"{name} >= 1",))
    return jax.ShapeDtypeStruct((batch, *members[0].image_shape), jnp.dtype(input_dtype))


def export_probabilities(
    members: Members, *, input_dtype: str, platforms: Sequence[str] = ("cpu",)
) -> jax.export.Exported:
    """The :func:`probability_fn` of a run (or an ensemble's mean of them) exported with a symbolic batch
    dimension ``b >= 1``.

    ``platforms`` may name several, e.g. ('cpu', 'cuda'): lowering for a GPU needs no GPU (the weights
    are stored once), running on it does. The model is traced with XLA's operations only
    (:func:`native.xla_only`, the same function to float rounding): medjax's native kernels are custom
    calls registered in the training process, which an artifact cannot carry to another process, machine
    or platform.
    """
    members = _as_members(members)
    fn = jax.jit(_members_fn(members, input_dtype=input_dtype))
    with native.xla_only():
        return jax.export.export(fn, platforms=tuple(platforms))(_input_spec(members, input_dtype, "b"))


def save_params(variables: dict, directory: Path) -> None:
    """Writes ``{'params', 'batch_stats'}`` as a standalone Orbax checkpoint (replacing any old one)."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(Path(directory).absolute(), variables, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def load_params(directory: str | Path) -> dict:
    """Restores an exported ``params/`` checkpoint as numpy arrays, with no model or train state needed.

    Pass ``<out>/params`` (or ``<out>`` itself).
    """
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).is_dir():
        directory = directory / PARAMS_DIR
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(directory)
    finally:
        checkpointer.close()


def export_onnx(
    members: Members, path: Path, *, input_dtype: str, check_against: jax.export.Exported
) -> float:
    """Writes the :func:`probability_fn` of a run (or an ensemble's mean) as ONNX and checks it with
    onnxruntime.

    The ONNX graph is traced with ``depthwise_impl='xla'``: jax2onnx cannot convert the ``lax.pad`` of
    the fast depthwise path with a symbolic batch, and ONNX runtimes have their own depthwise kernels
    (the fast path only works around XLA CPU). Both paths share parameters and agree to float rounding.

    Returns:
      The largest |onnxruntime - ``check_against``| probability on a random batch of 3.

    Raises:
      MedjaxError: when jax2onnx or onnxruntime is missing, or the two disagree by more than
        ``ONNX_TOLERANCE``.
    """
    try:
        import jax2onnx  # Optional dependencies: imported only for --onnx.
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MedjaxError(f"--onnx needs jax2onnx and onnxruntime ({e}); see medjax/export.py.") from e
    members = _as_members(members)
    fn = _members_fn(members, input_dtype=input_dtype, depthwise_impl="xla")
    # jax2onnx 0.13 prints DEBUG lines per Conv; native kernels are custom calls ONNX cannot carry.
    with contextlib.redirect_stdout(io.StringIO()), native.xla_only():
        proto = jax2onnx.to_onnx(
            fn,
            inputs=[_input_spec(members, input_dtype, "batch")],
            model_name=f"medjax_{members[0].config.get('name', 'model')}",
            input_names=["images"],
            output_names=["probabilities"],
        )
    # One self-contained file: jax2onnx's own file mode moves large weights to a '.data' sidecar.
    onnx.save_model(proto, str(path))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # Its shape-merge warnings on broadcasts are noise here.
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = random_images(3, members[0].image_shape, input_dtype)
    onnx_probs = session.run(None, {"images": images})[0]
    error = float(np.abs(onnx_probs - np.asarray(check_against.call(images))).max())
    if not error <= ONNX_TOLERANCE:
        raise MedjaxError(f"{path}: onnxruntime differs from JAX by {error:.2e} > {ONNX_TOLERANCE}.")
    return error


def random_images(n: int, shape: Sequence[int], dtype: str, *, seed: int = 0) -> np.ndarray:
    """``n`` random inputs of one artifact: uniform pixels for uint8, standard normal for float32."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return rng.standard_normal((n, *shape), dtype=np.float32)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_run(
    workdirs: str | Path | Sequence[str | Path],
    *,
    out: str | Path | None = None,
    input_dtypes: Sequence[str] = INPUT_DTYPES,
    platforms: Sequence[str] = ("cpu",),
    onnx: bool = False,
) -> dict:
    """Exports the best checkpoint of a run directory, or the ensemble of several, into ``out``
    (default ``<workdir>/export``; required for an ensemble, whose export belongs to none of its runs).

    See :func:`export_trained` for the other arguments and the result.

    Raises:
      MedjaxError: when a workdir is not a run with a best checkpoint, an ensemble has no ``out`` or
        incompatible members, or for ``--onnx`` problems.
    """
    paths = [Path(workdirs)] if isinstance(workdirs, str | Path) else [Path(w) for w in workdirs]
    if len(paths) > 1 and out is None:
        raise MedjaxError("An ensemble's export belongs to none of its runs: pass --out.")
    members = [run_dir.load_run(path) for path in paths]
    out = Path(out) if out is not None else run_dir.RunDir(paths[0]).export_dir
    return export_trained(members, out, input_dtypes=input_dtypes, platforms=platforms, onnx=onnx)


def export_trained(
    members: Members,
    out: str | Path,
    *,
    input_dtypes: Sequence[str] = INPUT_DTYPES,
    platforms: Sequence[str] = ("cpu",),
    onnx: bool = False,
) -> dict:
    """Writes the params checkpoint, one artifact per input dtype (and ONNX) and ``metadata.json``.

    Args:
      members: the run to export (a ``TrainedModel``), or an ensemble's runs (mean of probabilities).
      out: the export directory (created; files of the same names are replaced).
      input_dtypes: which of ``INPUT_DTYPES`` to export, one artifact (copy of the weights) each.
      platforms: ``jax.export`` lowering platforms.
      onnx: also write and check ``probs_<dtype>.onnx`` (needs 'cpu' among ``platforms``).

    Returns:
      The metadata written to ``<out>/metadata.json``.
    """
    members = _as_members(members)
    unknown = sorted(set(input_dtypes) - set(INPUT_DTYPES))
    if unknown or not input_dtypes:
        raise MedjaxError(f"input_dtypes must be a non-empty subset of {INPUT_DTYPES}, got {input_dtypes}.")
    if onnx and "cpu" not in platforms:
        raise MedjaxError("onnx=True checks the ONNX file against the JAX one on CPU: add cpu to platforms.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variables = [member.variables for member in members]
    save_params(variables[0] if len(members) == 1 else _member_keyed(variables), out / PARAMS_DIR)
    files = {"params": PARAMS_DIR}
    inputs, onnx_errors = {}, {}
    for dtype in input_dtypes:
        exported = export_probabilities(members, input_dtype=dtype, platforms=platforms)
        if "cpu" in platforms:  # An artifact of a damaged checkpoint would compute NaN for any input.
            probe = random_images(2, members[0].image_shape, dtype)
            check_outputs(np.asarray(exported.call(probe)), what=f"the exported {dtype} artifact")
        name = f"probs_{dtype}.jax"
        (out / name).write_bytes(exported.serialize())
        inputs[dtype] = {"jax": name}
        files[name] = name
        if onnx:
            name = f"probs_{dtype}.onnx"
            onnx_errors[name] = export_onnx(members, out / name, input_dtype=dtype, check_against=exported)
            inputs[dtype]["onnx"] = name
            files[name] = name
    mean, std = _normalisation(members[0])
    runs = [
        {
            "workdir": str(Path(member.workdir).absolute()),
            "config_name": member.config.get("name"),
            "model_name": member.config.model_name,
            "step": member.step,
            "num_parameters": int(sum(x.size for x in jax.tree.leaves(member.variables["params"]))),
        }
        for member in members
    ]
    metadata = {
        "class_names": list(members[0].class_names),
        "input_shape": list(members[0].image_shape),
        "channels": members[0].image_shape[-1],
        "inputs": inputs,
        "normalize": {"mean": mean.tolist(), "std": std.tolist()},
        "normalize_note": "uint8 inputs get (x / 255 - mean) / std inside; float32 inputs must have it.",
        "ensemble": "mean of the members' class probabilities" if len(members) > 1 else None,
        "members": runs,
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "num_parameters": sum(run["num_parameters"] for run in runs),
        "sizes": {key: _size(out / name) for key, name in files.items()},
    }
    if onnx:
        metadata["onnx_max_abs_error_vs_jax"] = onnx_errors
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def _member_keyed(variables: Sequence[dict]) -> dict:
    """An ensemble's variables as one checkpointable tree: ``{'member_<k>': variables of member k}``."""
    return {f"member_{k}": v for k, v in enumerate(variables)}


def load_exported(directory: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> probabilities`` from an export directory, using only jax (no medjax model code).

    The callable picks the artifact by dtype: uint8 pixels (resized to ``metadata['input_shape']``) go to
    ``probs_uint8.jax``, floating inputs (preprocessed like :meth:`TrainedModel.preprocess`) to
    ``probs_float32.jax``. What a deployer runs with only ``pip install jax flatbuffers``::

        import jax, numpy as np
        with open("export/probs_uint8.jax", "rb") as f:
            model = jax.export.deserialize(bytearray(f.read()))
        images = np.zeros((4, *model.in_avals[0].shape[1:]), np.uint8)  # Decoded, resized pixels.
        probs = np.asarray(model.call(images))  # (4, K); class names in export/metadata.json.

    Raises:
      MedjaxError: when ``directory`` holds no ``metadata.json``.
    """
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise MedjaxError(f"{directory / METADATA_FILE} not found: run `python -m medjax.export` first.")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    exported = {
        dtype: jax.export.deserialize(bytearray((directory / files["jax"]).read_bytes()))
        for dtype, files in metadata["inputs"].items()
    }

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        dtype = "float32" if np.issubdtype(images.dtype, np.floating) else images.dtype.name
        if dtype not in exported:
            raise ValueError(f"{directory} takes images of dtype {sorted(exported)}, got {images.dtype}.")
        return np.asarray(exported[dtype].call(images.astype(dtype, copy=False)))

    return predict


def _define_flags() -> None:
    """Defined only when run as a script, so importing this module next to other CLIs defines nothing."""
    flags.DEFINE_multi_string(
        "workdir", None, "Run directory of `python -m medjax.launch`; repeat for an ensemble.", required=True
    )
    flags.DEFINE_string("out", None, "Export directory (default: <workdir>/export; ensembles need one).")
    flags.DEFINE_bool("onnx", False, "Also write ONNX files (needs jax2onnx and onnxruntime).")
    flags.DEFINE_list("input_dtypes", list(INPUT_DTYPES), "Input dtypes to export, one file each.")
    flags.DEFINE_list("platforms", ["cpu"], "jax.export platforms, e.g. cpu,cuda.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup()
    if not flags.FLAGS["verbosity"].present:
        # jax2onnx 0.13 warns with tracebacks about its dm_pix plugins (not ours) under jax 0.10.
        for name in ("jax2onnx", "onnx_ir"):
            std_logging.getLogger(name).setLevel(std_logging.ERROR)
    args = flags.FLAGS
    try:  # export_run picks the default --out, and refuses an ensemble without one.
        metadata = export_run(
            args.workdir,
            out=args.out,
            input_dtypes=args.input_dtypes,
            platforms=args.platforms,
            onnx=args.onnx,
        )
    except MedjaxError as e:
        raise SystemExit(f"medjax: error: {e}") from None
    runs = ", ".join(f"{run['model_name']} step {run['step']}" for run in metadata["members"])
    kind = "the ensemble of " if len(metadata["members"]) > 1 else ""
    out = Path(args.out) if args.out else run_dir.RunDir(args.workdir[0]).export_dir
    print(f"Exported {kind}{runs} to {out}:")
    for name, size in metadata["sizes"].items():
        print(f"  {name:<20} {size / 2**20:8.2f} MiB ({size:,} bytes)")
    for name, error in metadata.get("onnx_max_abs_error_vs_jax", {}).items():
        print(f"  {name}: max |onnxruntime - jax| = {error:.1e}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
