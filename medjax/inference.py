"""The one inference pass: model outputs for every example of a split, or of an array, exactly once.

Validation during training, ``python -m medjax.evaluate``, Grad-CAM and prediction on files all run a
jitted function over fixed-size batches. Fixed sizes mean one compilation per function; the price is
padding, which this module adds and removes in one place:

* :func:`iterate_split` / :func:`predict_split` read a dataset split through
  :func:`medjax.data.pipeline.iterate_eval`, whose last batch is padded with rows marked ``mask=False``;
  only real rows come back, and :func:`predict_split` returns them in storage order.
* :func:`map_batches` does the same for arrays already in memory (decoded files, notebook inputs).
"""

from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from medjax import sharding
from medjax.data import pipeline

Outputs = dict[str, np.ndarray]


def iterate_split(
    fn: Callable[[dict], dict],
    data_cfg,
    *,
    split: str,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
) -> Iterator[tuple[Outputs, Outputs]]:
    """``(rows, outputs)`` per batch of ``split``, padding rows dropped from both.

    Args:
      fn: called on each padded batch ``{'image', 'label', 'index', 'mask', ...}`` (placed on ``mesh``
        when given, else numpy); returns a dict of arrays. Outputs with a leading batch axis are cut to
        the real rows; 0-d outputs (e.g. a masked loss sum the function computed itself) pass as they are.
      data_cfg: ``config.data`` of the run.
      split: dataset split name.
      mesh: the training mesh, or None to call ``fn`` on host arrays. With a mesh and several
        processes, each reads its rows of every batch (:func:`medjax.sharding.process_shard`) and the
        rows and outputs of all of them come back on every process (a collective: all must call).
      batch_size: default ``data_cfg.eval_batch_size``.
    """
    shard = sharding.process_shard() if mesh is not None else {}
    for batch in pipeline.iterate_eval(data_cfg, split=split, batch_size=batch_size, **shard):
        if mesh is None:
            outputs = jax.device_get(fn(batch))
        else:
            placed = sharding.shard_batch(batch, mesh)
            outputs = sharding.gather(fn(placed))
            if jax.process_count() > 1:  # This process read its rows only; the outputs cover all.
                batch = sharding.gather(placed)
        mask = np.asarray(batch["mask"], bool)
        rows = {key: np.asarray(value)[mask] for key, value in batch.items()}
        yield rows, {key: _real_rows(np.asarray(value), mask) for key, value in outputs.items()}


def predict_split(
    fn: Callable[[dict], dict],
    data_cfg,
    *,
    split: str,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    keep: Sequence[str] = ("label",),
) -> Outputs:
    """Every output of :func:`iterate_split` gathered over the split, in storage order.

    Per-example outputs and the batch fields named in ``keep`` are concatenated and sorted by the
    example's position in the split (``index``, also returned); 0-d outputs are summed over batches.
    """
    gathered: dict[str, list[np.ndarray]] = {}
    for rows, outputs in iterate_split(fn, data_cfg, split=split, mesh=mesh, batch_size=batch_size):
        for key, value in {"index": rows["index"], **{k: rows[k] for k in keep}, **outputs}.items():
            gathered.setdefault(key, []).append(value)
    order = np.argsort(np.concatenate(gathered["index"]))
    return {
        key: np.sum(parts) if np.ndim(parts[0]) == 0 else np.concatenate(parts)[order]
        for key, parts in gathered.items()
    }


def map_batches(
    fn: Callable[..., Sequence[jax.Array]], *arrays: np.ndarray, batch_size: int
) -> tuple[np.ndarray, ...]:
    """``fn`` over equal-length ``arrays`` in chunks of ``batch_size``, outputs concatenated.

    The last chunk is zero-padded to ``batch_size`` (so a jitted ``fn`` compiles once) and its padding
    rows are dropped from every output; ``fn`` returns a sequence of arrays with a leading batch axis.

    Raises:
      ValueError: for empty ``arrays`` (there is no output shape to return).
    """
    n = len(arrays[0])
    if n == 0:
        raise ValueError("map_batches() needs at least one example.")
    chunks: list[Sequence[np.ndarray]] = []
    for start in range(0, n, batch_size):
        parts = [np.asarray(a[start : start + batch_size]) for a in arrays]
        real = len(parts[0])
        padded = [np.concatenate([p, np.zeros((batch_size - real, *p.shape[1:]), p.dtype)]) for p in parts]
        chunks.append([np.asarray(out)[:real] for out in fn(*padded)])
    return tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True))


def _real_rows(value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return value[mask] if value.ndim and value.shape[0] == mask.shape[0] else value
