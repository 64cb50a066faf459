"""GANomaly: an adversarially trained encoder-decoder-encoder; anomalies move the latent code.

Paper: Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018 (arXiv:1805.06725).

The generator is an encoder G_E (image -> latent z), a decoder G_D (z -> reconstruction x') and a
second encoder E (x' -> latent z'); all are DCGAN-style convolution stacks.  A discriminator D
(DCGAN encoder + a real/fake head) judges x against x'.  Generator loss =
w_adv * ||f(x) - f(x')||_2 (feature matching on D's last features) + w_con * |x - x'|_1 +
w_enc * ||z - z'||_2; D minimises binary cross-entropy and is re-initialised when its loss
collapses (< 1e-5).  Trained on good images only, the pair of encoders agrees on normal images;
on a defective one the reconstruction is pulled towards normal, so z' drifts from z.
Image score = mean |z - z'|^2 (the paper's A(x)).  The paper has no pixel map; here the map is
the reconstruction error mean_c |x - x'| upsampled to the input and smoothed (sigma 4), so the
model fits the common contract.  Note the score and the map measure different things: the map's
maximum is not the score.

Training recipe (paper): Adam lr 2e-4, betas (0.5, 0.999), 15 epochs, batch 64, 32 px images,
latent size 100, w_adv 1, w_con 50, w_enc 1.  CPU default here: the same optimizer and weights,
30 epochs, width 16, images resized to 128 px inside the model (`input_size`).

Deviations from the paper:
- One optimizer for both players: D's loss is computed on the detached reconstruction and the
  generator's adversarial term through a parameter-detached copy of D (torch.func), so the sum
  of the two losses gives each network exactly its own gradient.  The shared training loop
  (one optimizer, one loss) then trains a GAN without a special case; the paper alternates two
  optimizers with the same settings, which updates in the same directions.
- Inputs are resized to `input_size` (DCGAN stacks need a fixed power-of-two size) and
  normalised to [-1, 1] (tanh output), as in the reference DCGAN design.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..components.blur import upsample_and_blur
from ..data.sample import Batch
from ..errors import AnomalensError, Interval, OneOf
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

W_ADV, W_CON, W_ENC = 1.0, 50.0, 1.0  # the paper's loss weights
D_COLLAPSE = 1e-5  # re-initialise D when its loss falls below this (paper)


# --------------------------------------------------------------------------- networks
def _encoder(size: int, width: int, out: int) -> nn.Sequential:
    """DCGAN encoder: stride-2 convs from size to 4 x 4, then a 4 x 4 conv to a 1 x 1 x out code."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    c = width
    for _ in range(int(math.log2(size)) - 3):  # size/2 -> 4
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, inplace=True)]
        c *= 2
    layers.append(nn.Conv2d(c, out, 4, 1, 0, bias=False))
    return nn.Sequential(*layers)


def _decoder(size: int, width: int, latent: int) -> nn.Sequential:
    """DCGAN decoder: the mirror of `_encoder`, ending in tanh."""
    c = width * 2 ** (int(math.log2(size)) - 3)
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c),
                               nn.ReLU(inplace=True)]
    while c > width:
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(inplace=True)]
        c //= 2
    layers += [nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """DCGAN encoder as a feature extractor plus a 4 x 4 conv head giving one real/fake logit."""

    def __init__(self, size: int, width: int):
        super().__init__()
        encoder = _encoder(size, width, 1)
        self.features, self.head = encoder[:-1], encoder[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f).flatten(), f


def _dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales (the DCGAN initialisation the paper uses)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- model
@register_model
class GANomaly(AnomalyModel):
    """Encoder-decoder-encoder GAN; latent distance score, reconstruction-error map."""

    name = "ganomaly"
    description = "Encoder-decoder-encoder GAN: anomalies shift the re-encoded latent (Akcay et al. 2018)."
    constraints = {
        "input_size": OneOf(32, 64, 128, 256),
        "latent_size": Interval(int, 1, 4096),
        "width": Interval(int, 1, 512),
        "blur_sigma": Interval(float, 0, None),
    }
    defaults = {
        "input_size": 128,  # images are resized to this inside the model (paper: 32)
        "latent_size": 100,  # paper: 100
        "width": 16,  # channels of the first DCGAN layer, doubled per layer (paper: 64)
        "blur_sigma": 4.0,
    }
    tags = {"trainable": True, "test_params": {"input_size": 32, "width": 8, "latent_size": 16},
            "test_training": {"max_epochs": 1, "max_steps": 2}}
    training_defaults = {
        "max_epochs": 30,
        "optimizer": {"name": "adam", "lr": 2e-4, "betas": [0.5, 0.999]},
    }

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        size, width, latent = hp["input_size"], hp["width"], hp["latent_size"]
        self.encoder = _encoder(size, width, latent)
        self.decoder = _decoder(size, width, latent)
        self.encoder2 = _encoder(size, width, latent)
        self.discriminator = Discriminator(size, width)
        for net in (self.encoder, self.decoder, self.encoder2, self.discriminator):
            _dcgan_init(net)
        self.register_trained_flag()
        self._reset_discriminator = False

    def _generate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x in [-1, 1] at input_size, reconstruction x', z, z')."""
        size = self.hparams["input_size"]
        x = images * 2 - 1
        if tuple(x.shape[-2:]) != (size, size):
            # Box-average by the whole factor, then bilinear for the rest: anti-aliased like
            # `antialias=True`, but computed alike by torch, ONNX Runtime and OpenVINO.
            factor = min(x.shape[-2] // size, x.shape[-1] // size)
            if factor > 1:
                x = F.avg_pool2d(x, factor)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        z = self.encoder(x)
        fake = self.decoder(z)
        return x, fake, z, self.encoder2(fake)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self._reset_discriminator:  # flagged last step; re-initialised only now, after its update
            _dcgan_init(self.discriminator)
            self._reset_discriminator = False
        x, fake, z, z2 = self._generate(batch.image)
        # Generator: D's parameters are detached here, so this term trains the generator only.
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        buffers = dict(self.discriminator.named_buffers())
        _, f_real = functional_call(self.discriminator, (frozen, buffers), (x,))
        _, f_fake = functional_call(self.discriminator, (frozen, buffers), (fake,))
        adversarial = (f_real.detach() - f_fake).pow(2).mean()
        contextual = (x - fake).abs().mean()
        encoder = (z - z2).pow(2).mean()
        generator = W_ADV * adversarial + W_CON * contextual + W_ENC * encoder
        # Discriminator: on the detached reconstruction, so this term trains D only.
        logit_real, _ = self.discriminator(x)
        logit_fake, _ = self.discriminator(fake.detach())
        discriminator = 0.5 * (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
                               + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
        # The paper's remedy for a discriminator that has won: start it afresh (at the next step).
        self._reset_discriminator = self.training and float(discriminator.detach()) < D_COLLAPSE
        self.mark_trained()
        return {"loss": generator + discriminator, "adversarial": adversarial, "contextual": contextual,
                "encoder": encoder, "discriminator": discriminator}

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("GANomaly is not fitted; call fit() first.")
        x, fake, z, z2 = self._generate(images)
        score = (z - z2).pow(2).mean(dim=(1, 2, 3))
        error = (x - fake).abs().mean(dim=1, keepdim=True)
        anomaly_map = upsample_and_blur(error, tuple(images.shape[-2:]), self.hparams["blur_sigma"])
        return AnomalyOutput(score, anomaly_map)
