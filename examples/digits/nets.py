"""The networks of the digits experiment: the stand-in encoder, the three fusions, the decoder and
DiT configurations, and the evaluation classifier.

Sizes are chosen so that everything trains on two CPU cores in minutes: 32×32 images, patch 8 →
a 4×4 grid of 16 tokens, width 64 → a latent of [64, 4, 4] per image.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import raekern.ops as ops
from raekern.models import DiTDHv2, ViTMAEDecoder
from raekern.models.digits import LatentProbe  # noqa: F401  (GFCG's classifier, shipped with the model)
from raekern.models.encoder import Dinov2Encoder

IMAGE = 32
PATCH = 8
GRID = IMAGE // PATCH
WIDTH = 64
DEPTH = 6
LN_EPS = 1e-6
RAEV2_LAYERS = (1, 3, 5)  # every other block ending at the last, as RAEv2's K=7 picks {11, 13, ..., 23}

ENCODER = dict(hidden_size=WIDTH, depth=DEPTH, num_heads=4, patch_size=PATCH, image_size=IMAGE,
               num_register_tokens=0, input_size=IMAGE)
DECODER = dict(latent_dim=WIDTH, hidden_size=96, depth=3, num_heads=4, intermediate_size=192,
               patch_size=PATCH, num_patches=GRID * GRID, output_space="pixel")
# The DiT models the top PCA_K principal coordinates of the standardised [WIDTH, GRID, GRID] latent,
# laid out [PCA_K / GRID², GRID, GRID] (raekern.models.digits.PrincipalLatent): 64 coordinates hold
# 98.5 % of the latent's variance, and real latents cut to them still decode to digits the judge reads.
PCA_K = 64
LATENT_CHANNELS = PCA_K // (GRID * GRID)
# RAEv2's DiT-DH shape at small scale: in-context t/c tokens, QK-norm, base head at body depth 8.
DIT = dict(input_size=GRID, in_channels=LATENT_CHANNELS, hidden_size=(64, 96), depth=(9, 2), num_heads=(2, 2),
           num_classes=10, num_t_tokens=2, num_c_tokens=4, base_model_depth=8, class_dropout_prob=0.1)
# AutoGuidance's guiding model: the same family, smaller and trained for fewer steps.
WEAK = dict(input_size=GRID, in_channels=LATENT_CHANNELS, hidden_size=(32, 64), depth=(3, 1), num_heads=(1, 1),
            num_classes=10, num_t_tokens=2, num_c_tokens=4, base_model_depth=None, class_dropout_prob=0.1)


def encoder() -> Dinov2Encoder:
    enc = Dinov2Encoder(**ENCODER)
    # a from-scratch ViT: DINOv2's zero-initialised tokens would make CLS identical across images
    nn.init.trunc_normal_(enc.embeddings.position_embeddings, std=0.02)
    nn.init.trunc_normal_(enc.embeddings.cls_token, std=0.02)
    return enc


def decoder() -> ViTMAEDecoder:
    return ViTMAEDecoder(**DECODER)


def dit() -> DiTDHv2:
    return DiTDHv2(**DIT)


def weak_dit() -> DiTDHv2:
    return DiTDHv2(**WEAK)


class EncoderClassifier(nn.Module):
    """The supervised stand-in for a pretrained encoder: ViT → non-affine LN of the last block →
    token mean → Linear. After training the ViT is frozen; its features are the RAE latents."""

    def __init__(self):
        super().__init__()
        self.vit = encoder()
        self.vit.requires_grad_(True)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, images_rgb: torch.Tensor) -> torch.Tensor:
        h = self.vit(images_rgb, [DEPTH - 1])[0]
        z = ops.layer_stack_fuse([h], skip_tokens=1, eps=LN_EPS)
        return self.head(z.mean(1))


# -- fusions: hidden states of all blocks (each [B, 1 + N, D], CLS first) → tokens [B, N, D] -------------
class LastLayer(nn.Module):
    """RAE v1: the non-affine LayerNorm of the last block."""

    def forward(self, hs):
        return ops.layer_stack_fuse([hs[-1]], skip_tokens=1, eps=LN_EPS)


class LayerMean(nn.Module):
    """RAEv2 (code-faithful): mean of the non-affine LN of the selected blocks plus the token mean of the
    last one."""

    def forward(self, hs):
        return ops.layer_stack_fuse([hs[i] for i in RAEV2_LAYERS], skip_tokens=1, eps=LN_EPS,
                                    reduce="mean", add_last_token_mean=True)


class DepthRouted(nn.Module):
    """DRoRAE: one expert MLP per block on its normalised features, a per-token router on the last-layer
    feature with signed unit-L2 ("energy-constrained") weights over depth, and a bounded correction
    ``γ·tanh(Σ_l w_l e_l)`` (γ zero-initialised) added to the last-layer feature, fused by
    ``raekern.ops.depth_route``. γ = 0 makes phase 2 start exactly at the RAE v1 latent."""

    def __init__(self, layers: int = DEPTH, hidden: int = 2 * WIDTH):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, hidden), nn.GELU(), nn.Linear(hidden, WIDTH))
                                     for _ in range(layers))
        self.router = nn.Linear(WIDTH, layers)
        self.gamma = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, hs):
        normed = [ops.layer_stack_fuse([h], skip_tokens=1, eps=LN_EPS) for h in hs]
        base = normed[-1]
        experts = [e(x) for e, x in zip(self.experts, normed)]
        return ops.depth_route(experts, self.router(base), base, energy="l2", bound="tanh", gamma=self.gamma)


FUSIONS = {"rae": LastLayer, "raev2": LayerMean, "drorae": DepthRouted}


class EvalNet(nn.Module):
    """The independent judge: a small CNN on grey pixels, trained on the training split. Its
    penultimate features (64-d) are the Fréchet/diversity feature space; its argmax is "class accuracy".

    The images are 8×8 originals upsampled to 32×32, so the first layer averages 2×2 pixels (16×16
    loses nothing a digit classifier needs) and the channel counts stay small: the convolutions'
    backward pass dominates CPU training time, and at 32 channels on 32×32 inputs it took ~9 minutes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.AvgPool2d(2),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def features(self, x_gray):
        return self.body(x_gray * 2 - 1)

    def forward(self, x_gray):
        return self.fc(self.features(x_gray))
