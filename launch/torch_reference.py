"""PyTorch peers of ConvNeXt-Tiny, MobileNetV2 and MedNeXt-tiny for ``launch/benchmark.py``.

Never imported by medjax. Self-contained ``nn.Module`` definitions following the canonical architectures
in PAPERS.md ("Canonical baselines"), so the benchmark needs neither torchvision nor weights: random
initialisation costs the same per step as pretrained weights. Only the training-step cost matters here, so
init schemes are the defaults of ``torch.nn`` layers except where the forward pass depends on them (layer
scale). MedNeXt (PLoS One 2026, study B) has no published code, so its peer transcribes medjax's own
``mednext_plos`` 'tiny' layer for layer: same parameter count, same logits given the same weights.
"""

import time

import torch
import torch.nn.functional as F
from timing import timed
from torch import nn

CONVNEXT_TINY = ((3, 3, 9, 3), (96, 192, 384, 768))
# (expansion t, channels c, repeats n, first stride s) of MobileNetV2 at width 1.0.
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drops whole residual branches per sample (same as medjax ``DropPath``)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4C -> exact GELU -> Linear C -> layer scale -> drop path."""

    def __init__(self, dim: int, drop_rate: float):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_rate, self.training)


class ConvNeXt(nn.Module):
    """ConvNeXt-Tiny (28,589,128 parameters with 1000 classes)."""

    def __init__(self, num_classes: int, *, drop_path_rate: float = 0.0):
        super().__init__()
        depths, widths = CONVNEXT_TINY
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=4), LayerNorm2d(widths[0], eps=1e-6)]
        index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            if stage > 0:
                cin = widths[stage - 1]
                layers += [LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, width, 2, stride=2)]
            layers += [ConvNeXtBlock(width, rates[index + b]) for b in range(depth)]
            index += depth
        self.features = nn.Sequential(*layers)
        self.head_norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.features(x).mean((2, 3))))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion -> depthwise 3x3 -> linear 1x1 projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [_conv_bn(cin, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (3,504,872 parameters with 1000 classes)."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


MEDNEXT_TINY = ((2, 2, 6, 2), (48, 96, 192, 384))
MEDNEXT_FFN = ("smooth", "smooth", "la", "la")  # Channel mixer of each stage's blocks.
MEDNEXT_SEM_BRANCHES = ((3, 1), (7, 1), (7, 3))  # (kernel, dilation) of the SEM's depthwise branches.


def _depthwise(channels: int, kernel: int, dilation: int = 1) -> nn.Conv2d:
    """Depthwise conv with bias and symmetric padding ``(k - 1) * d // 2``, as medjax's ``DepthwiseConv``."""
    padding = (kernel - 1) * dilation // 2
    return nn.Conv2d(channels, channels, kernel, padding=padding, dilation=dilation, groups=channels)


def _on_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Applies an NCHW conv to an NHWC tensor; both permutes are views of the same channels_last memory."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SpatialEncoding(nn.Module):
    """Linear C -> exact GELU -> sum of depthwise 3x3, 7x7, 7x7 dilated 3 -> Linear C (NHWC in and out)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.branches = nn.ModuleList(_depthwise(dim, k, d) for k, d in MEDNEXT_SEM_BRANCHES)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.proj_in(x)).permute(0, 3, 1, 2)
        context = sum(conv(h) for conv in self.branches)
        return self.proj_out(context.permute(0, 2, 3, 1))


class LinearAttentionFFN(nn.Module):
    """medjax's ``attention='conv'`` gate: ``Linear(gelu(DWConv7x7(Linear(x))) * Linear(x))``, hidden 2C."""

    def __init__(self, dim: int, ratio: float = 2.0, kernel: int = 7):
        super().__init__()
        hidden = int(dim * ratio)
        self.gate = nn.Linear(dim, hidden)
        self.gate_dw = _depthwise(hidden, kernel)
        self.value = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(_on_nhwc(self.gate_dw, self.gate(x))) * self.value(x))


class SmoothFFN(nn.Module):
    """Linear 4C -> ``h + DWConv3x3(h)`` -> exact GELU -> Linear C."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = _depthwise(hidden, 3)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h + _on_nhwc(self.dw, h)))


class MedNeXtBlock(nn.Module):
    """Pre-norm ``x + drop_path(gamma0 * SEM(LN(x)))``, then ``x + drop_path(gamma1 * FFN(LN(x)))`` (NHWC).

    Attribute names follow medjax's ``Block`` parameters (``norm0``, ``sem``, ``gamma0``, ...).
    """

    def __init__(self, dim: int, ffn: str, drop_rate: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-6)
        self.sem = SpatialEncoding(dim)
        self.gamma0 = nn.Parameter(torch.full((dim,), 1e-6))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn0 = SmoothFFN(dim) if ffn == "smooth" else LinearAttentionFFN(dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), 1e-6))
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.sem(self.norm0(x)) * self.gamma0, self.drop_rate, self.training)
        return x + drop_path(self.ffn0(self.norm1(x)) * self.gamma1, self.drop_rate, self.training)


class Downsample(nn.Module):
    """LayerNorm then 2x2 stride-2 conv on an NHWC tensor (medjax's TF 'SAME' = no padding for even sides)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.LayerNorm(cin, eps=1e-6)
        self.conv = nn.Conv2d(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_nhwc(self.conv, self.norm(x))


class MedNeXt(nn.Module):
    """MedNeXt-tiny (PLoS One 2026) as medjax's ``mednext_plos`` (5,610,904 parameters with 1000 classes).

    The residual stream between stem and head is NHWC, which for channels_last input is the same memory
    as the NCHW tensors the convolutions see: every MLP is then an ``nn.Linear`` on the last axis (one
    matmul, as in medjax) and every permute is a view.
    """

    def __init__(self, num_classes: int, *, drop_path_rate: float = 0.0):
        super().__init__()
        depths, widths = MEDNEXT_TINY
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stem = nn.Conv2d(3, widths[0], 4, stride=4)
        self.stem_norm = nn.LayerNorm(widths[0], eps=1e-6)
        layers: list[nn.Module] = []
        index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            if stage > 0:
                layers.append(Downsample(widths[stage - 1], width))
            layers += [MedNeXtBlock(width, MEDNEXT_FFN[stage], rates[index + b]) for b in range(depth)]
            index += depth
        self.features = nn.Sequential(*layers)
        self.head_norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1))
        return self.head(self.head_norm(self.features(x).mean((1, 2))))


MODELS = {"convnext": ConvNeXt, "mobilenet_v2": MobileNetV2, "mednext_plos": MedNeXt}


def benchmark(
    name: str,
    *,
    compiled: bool,
    batch: int,
    size: int,
    num_classes: int,
    steps: int,
    warmup: int,
    threads: int,
) -> dict:
    """Training images/s (AdamW, whole steps, median after warm-up), inference latency and throughput.

    channels_last for model and inputs; the first warm-up steps include ``torch.compile``'s compilation,
    whose wall time is reported separately as ``compile_s``.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # medjax's benchmark trains ConvNeXt and MedNeXt with stochastic depth 0.1 (MedNeXt's Encoder default).
    kwargs = {"drop_path_rate": 0.1} if name in ("convnext", "mednext_plos") else {}
    model = MODELS[name](num_classes, **kwargs).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,))
    fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(images), labels)
        loss.backward()
        opt.step()

    model.train()
    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    train_times = timed(step, steps=steps, warmup=max(warmup - 1, 0))

    model.eval()
    one = images[:1].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        start = time.perf_counter()
        fwd(one)
        first_eval_s = time.perf_counter() - start
        latency = timed(lambda: fwd(one), steps=max(steps, 5), warmup=warmup)
        throughput = timed(lambda: fwd(images), steps=steps, warmup=warmup)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "first_step_s": first_s,
        "first_eval_s": first_eval_s,
        "train_step_times_s": train_times,
        "infer_b1_times_s": latency,
        "infer_batch_times_s": throughput,
    }
