"""Which files SFD reads and `avatarcli download sfd-*` fetches (no torch here: the CLI lists them in its help)."""

from __future__ import annotations

from dataclasses import dataclass

SFD_REPO = "SFD-Project/SFD"
VAE_REPO = "hustvl/va-vae-imagenet256-experimental-variants"
VAE_FILE = "ldm-imagenet256-f16d32-50ep.ckpt"
LATENT_SET = "imagenet1k-latents/sdvae_f16d32_semvaebasech16_repadinov2_vitb14_reg/imagenet_train_256"
TEXTURE_STATS_FILE = f"{LATENT_SET}/latents_stats.pt"


@dataclass(frozen=True)
class SfdModelFiles:
    """Files one CLI model reads. AutoGuidance checkpoint and scale per the SFD README table (800 epochs)."""

    checkpoint: str
    guidance_checkpoint: str
    guidance_scale: float
    preset: str


SFD_MODELS: dict[str, SfdModelFiles] = {
    "xl": SfdModelFiles(
        "model_weights/sfd_xl/checkpoints/4000000.pt",
        "model_weights/sfd_autoguidance_b/checkpoints/0070000.pt", 1.5, "LightningDiT-XL/1"),
    "xxl": SfdModelFiles(
        "model_weights/sfd_1p0/checkpoints/4000000.pt",
        "model_weights/sfd_autoguidance_b/checkpoints/0120000.pt", 1.5, "LightningDiT-1p0B/1"),
}

# What `avatarcli download NAME` fetches: (Hub repo, allow_patterns). The texture VAE lives in another repo,
# so `sfd-vae` is needed alongside `sfd-xl` or `sfd-xxl`.
SFD_DOWNLOADS: dict[str, tuple[str, list[str]]] = {
    f"sfd-{name}": (SFD_REPO, [files.checkpoint, files.guidance_checkpoint, TEXTURE_STATS_FILE])
    for name, files in SFD_MODELS.items()
}
SFD_DOWNLOADS["sfd-vae"] = (VAE_REPO, [VAE_FILE])
