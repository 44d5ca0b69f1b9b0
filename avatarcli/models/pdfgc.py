"""PD-FGC's expression encoder (`FanEncoder`, the `pd_fpg.pth` of FrancisRing/FlashPortrait).

A FAN face-alignment trunk (one stacked hourglass) turned into a 512-d face descriptor, followed by one head per
factor: head pose 6, eye 6, emotion 30, mouth 512. FlashPortrait's per-frame expression feature is
cat[headpose, eye, emo, mouth] = 554 values, in that order; the mouth value is the raw `to_mouth` output (the
checkpoint's `mouth_embed` head is loaded but unused). Attribute names equal the checkpoint's key names.
Input: aligned 224 x 224 RGB crops scaled to [-1, 1], NCHW. Runs in eval mode (BatchNorm running statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_SPLIT = {"headpose": 6, "eye": 6, "emo": 30, "mouth": 512}
FEATURE_DIM = sum(FEATURE_SPLIT.values())  # 554


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's residual block: three pre-activated 3x3 convs (out/2, out/4, out/4 channels) concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = _conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = _conv3x3(cout // 4, cout // 4)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(True),
                                            nn.Conv2d(cin, cout, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat((a, b, c), dim=1) + skip


class HourGlass(nn.Module):
    """Recursive hourglass of 256-channel ConvBlocks; level L has b1_L (skip), b2_L (down), b3_L (up)."""

    def __init__(self, depth: int = 4, channels: int = 256):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))
        self.add_module("b2_plus_1", ConvBlock(channels, channels))

    def _level(self, level: int, x: Tensor) -> Tensor:
        skip = self._modules[f"b1_{level}"](x)  # (the reference's dropout here is inactive in eval mode)
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self._modules["b2_plus_1"](low)
        low = self._modules[f"b3_{level}"](low)
        return skip + F.interpolate(low, size=skip.shape[2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._level(self.depth, x)


class FanTrunk(nn.Module):
    """224 x 224 image -> 68 heatmaps at 56 x 56 -> one 28 x 28 map -> 512-d descriptor.

    `width` is the stem's channel count (64 in the published model; the hourglass runs at 4 x width); smaller
    widths exist only for tiny test checkpoints with the published key names.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        hourglass = 4 * width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = ConvBlock(width, 2 * width)
        self.conv3 = ConvBlock(2 * width, 2 * width)
        self.conv4 = ConvBlock(2 * width, hourglass)
        self.m0 = HourGlass(4, hourglass)
        self.top_m_0 = ConvBlock(hourglass, hourglass)
        self.conv_last0 = nn.Conv2d(hourglass, hourglass, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(hourglass)
        self.l0 = nn.Conv2d(hourglass, 68, kernel_size=1)
        self.bn5 = nn.BatchNorm2d(68)
        self.conv6 = nn.Conv2d(68, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(28 * 28, 512)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        heatmaps = self.l0(F.relu(self.bn_end0(self.conv_last0(x))))
        x = self.conv6(F.relu(self.bn5(heatmaps)))
        return self.fc(F.relu(x.flatten(1)))


def _projection() -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Linear(512, 512))


def _embedding(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(512, dim))


class FanEncoder(nn.Module):
    """PD-FGC expression encoder; `forward` returns (headpose 6, eye 6, emo 30, mouth 512)."""

    def __init__(self, pose_dim: int = 6, eye_dim: int = 6, emo_dim: int = 30, width: int = 64):
        super().__init__()
        self.model = FanTrunk(width)
        self.to_mouth = _projection()
        self.mouth_embed = _embedding(512 - pose_dim - eye_dim)
        self.to_headpose = _projection()
        self.headpose_embed = _embedding(pose_dim)
        self.to_eye = _projection()
        self.eye_embed = _embedding(eye_dim)
        self.to_emo = _projection()
        self.emo_embed = _embedding(emo_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        face = self.model(x)
        headpose = self.headpose_embed(self.to_headpose(face))
        eye = self.eye_embed(self.to_eye(face))
        emo = self.emo_embed(self.to_emo(face))
        mouth = self.to_mouth(face)
        return headpose, eye, emo, mouth

    def features(self, x: Tensor) -> Tensor:
        """[B, 554] = cat[headpose, eye, emo, mouth], FlashPortrait's per-frame expression feature."""
        return torch.cat(self.forward(x), dim=1)
