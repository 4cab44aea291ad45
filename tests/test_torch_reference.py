"""The PyTorch peers of ``launch/benchmark.py`` are the models medjax trains (skipped without torch).

A speed ratio means something only if both sides compute the same network: the peers must have
medjax's parameter counts, and MedNeXt's, a transcription of medjax's own model (the paper published no
code), must give medjax's logits when loaded with medjax's weights. torch is not a CI dependency (the
benchmark is run by hand, with ``torch==2.13.0``), so in CI these tests skip.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.evaluate import model_card as profiling
from tests.conftest import ROOT

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "launch"))
import torch_reference  # noqa: E402  (a script directory, importable only once torch is.)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("mobilenet_v2", {"width_multiplier": 1.0}, 3_504_872),
        ("convnext", {"variant": "tiny"}, 28_589_128),
        ("mednext_plos", {"variant": "tiny"}, 5_610_904),
    ],
)
def test_peer_has_medjax_parameter_count(name, kwargs, expected):
    model = models.get_model(name, num_classes=1000, **kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    assert profiling.count_params(shapes["params"]) == expected
    peer = torch_reference.MODELS[name](1000)
    assert sum(p.numel() for p in peer.parameters()) == expected


def _load_mednext(peer, params: dict) -> int:
    """Copies medjax ``mednext_plos`` parameters into the peer; returns how many values were copied."""
    copied = 0

    def put(tensor, value):
        nonlocal copied
        assert tuple(tensor.shape) == value.shape, (tensor.shape, value.shape)
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        copied += value.size

    def dense(layer, p):
        put(layer.weight, p["kernel"].T)
        put(layer.bias, p["bias"])

    def conv(layer, p):  # (kh, kw, in, out), depthwise (kh, kw, 1, C) -> (out, in, kh, kw).
        put(layer.weight, p["kernel"].transpose(3, 2, 0, 1))
        put(layer.bias, p["bias"])

    def norm(layer, p):
        put(layer.weight, p["scale"])
        put(layer.bias, p["bias"])

    encoder = params["encoder"]
    conv(peer.stem, encoder["stem"])
    norm(peer.stem_norm, encoder["stem_norm"])
    layers = iter(peer.features)
    for s, depth in enumerate(torch_reference.MEDNEXT_TINY[0]):
        if s > 0:
            down = next(layers)
            norm(down.norm, encoder[f"down{s}_norm"])
            conv(down.conv, encoder[f"down{s}"])
        for b in range(depth):
            block, p = next(layers), encoder[f"stage{s + 1}_block{b}"]
            for i in (0, 1):
                norm(getattr(block, f"norm{i}"), p[f"norm{i}"])
                put(getattr(block, f"gamma{i}"), p[f"gamma{i}"])
            dense(block.sem.proj_in, p["sem"]["proj_in"])
            dense(block.sem.proj_out, p["sem"]["proj_out"])
            for layer, (k, d) in zip(block.sem.branches, torch_reference.MEDNEXT_SEM_BRANCHES, strict=True):
                conv(layer, p["sem"][f"dw{k}_d{d}"])
            for name, layer in block.ffn0.named_children():
                (conv if isinstance(layer, torch.nn.Conv2d) else dense)(layer, p["ffn0"][name])
    assert next(layers, None) is None
    norm(peer.head_norm, params["head_norm"])
    dense(peer.head, params["head"])
    return copied


def test_mednext_peer_computes_medjax_logits():
    model = models.get_model("mednext_plos", num_classes=10, variant="tiny")
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.asarray(x), train=False)["params"])
    # Layer scale 0.5 and a random head: with the defaults (1e-6, zero head) every logit is the bias.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: np.full_like(v, 0.5) if path[-1].key.startswith("gamma") else v, params
    )
    params["head"]["kernel"] = (0.05 * rng.standard_normal(params["head"]["kernel"].shape)).astype(np.float32)
    peer = torch_reference.MedNeXt(10).eval().to(memory_format=torch.channels_last)
    assert _load_mednext(peer, params) == sum(p.numel() for p in peer.parameters())
    expected = np.asarray(model.apply({"params": params}, jnp.asarray(x), train=False)[0])
    assert expected.std() > 0.1  # Input-dependent logits, so the comparison can fail.
    images = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = peer(images).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
