"""Train the demo model on the synthetic world (avatarcli.demo.world) and write it in the published StableAvatar
folder layout; benchmarks/train_demo.py runs it.

All stages are reproducible from one seed, their data generated on the fly from the world. In the order run.py runs
them, each module's docstring saying what it trains and on what loss:

* `layout.py`: the fixed components (tiny umT5 + tokenizer and CLIP ViT with fixed random weights, which carry no
  information here) and the published key layouts the trained weights are exported in and verified through.
* `data.py`: the pool of identities speaking their own synthetic speech, rendered once, and the random batches every
  stage cuts from it.
* `wav2vec.py`: a small wav2vec2 trained to predict the mouth openness from the speech of one window (MSE of a linear
  probe), then frozen.
* `vae.py` (+ `vae_stream.py`): a small Wan 2.1 VAE trained in the causal streaming regime inference runs it in
  (whole-frame L1 + squared error of the unclamped decode, the mouth weighted up, a very small KL, truncated
  backprop through the carried caches); why the earlier one lost everything but the mouth is in its docstring.
* `latents.py`: the VAE's latent statistics folded into its quant / post-quant convolutions, the pool encoded and the
  reference conditions computed as inference computes them.
* `dit.py`: a small StableAvatarTransformer3DModel trained by flow matching (weighted MSE on the velocity), on every
  conditioning branch guidance runs at inference, a share of its windows at the video's start; its EMA weights are
  exported. `dit_check.py` measures whether they use their conditions.
* `config.py` (sizes and why, budgets, the H200 time estimate, shared constants), `schedule.py` (learning-rate
  curve, step / time budget, the whole run's budget) and `run.py` (the orchestrator, `train`).

    from avatarcli.demo.training import TrainConfig, train, verify
    summary = train("demo-weights", TrainConfig.tiny(), print)
    verify("demo-weights")
"""

from avatarcli.demo import world
from avatarcli.demo.training.config import (
    H200_FIXED_SECONDS, H200_RATES, HELD_OUT, PROMPT, WINDOW, WINDOW_VIDEO_FRAMES, DemoSizes, TrainConfig, estimate,
    with_overrides,
)
from avatarcli.demo.training.data import Pool, box_mask, make_pool, normalise_audio, render_identity, to_unit
from avatarcli.demo.training.dit import (
    AUDIO_MODULES, SHIFT, branch_inputs, dit_param_groups, dit_velocity, draw_branches, new_transformer, train_dit,
)
from avatarcli.demo.training.dit_check import condition_check
from avatarcli.demo.training.latents import encode_pool, fold_latent_statistics, latent_statistics, reference_conditions
from avatarcli.demo.training.layout import (
    AVATAR, BASE, WAV2VEC, export_transformer, export_vae, transformer_sizes, verify, write_fixed_components,
)
from avatarcli.demo.training.run import train
from avatarcli.demo.training.schedule import Budget, Deadline
from avatarcli.demo.training.vae import (
    dark_pixels, log_round_trips, loss_weights, new_vae, per_frame_start, posterior_noise, round_trip, round_trip_error,
    round_trip_mouth, round_trip_psnr, still_convolutions, train_vae,
)
from avatarcli.demo.training.vae_stream import CausalStream, decode_for_training, vae_piece, video_frames
from avatarcli.demo.training.wav2vec import new_wav2vec, save_wav2vec, train_audio_encoder

__all__ = [
    "AUDIO_MODULES", "AVATAR", "BASE", "H200_FIXED_SECONDS", "H200_RATES", "HELD_OUT", "PROMPT", "SHIFT", "WAV2VEC",
    "WINDOW", "WINDOW_VIDEO_FRAMES", "Budget", "CausalStream", "Deadline", "DemoSizes", "Pool", "TrainConfig",
    "box_mask", "branch_inputs", "condition_check", "dark_pixels", "estimate", "log_round_trips", "loss_weights",
    "posterior_noise", "round_trip_psnr",
    "decode_for_training", "dit_param_groups", "dit_velocity", "draw_branches", "encode_pool", "export_transformer",
    "export_vae", "fold_latent_statistics", "latent_statistics", "make_pool", "new_transformer", "new_vae",
    "new_wav2vec", "per_frame_start", "still_convolutions", "normalise_audio", "reference_conditions",
    "render_identity", "round_trip", "round_trip_error",
    "round_trip_mouth", "save_wav2vec", "to_unit", "train", "train_audio_encoder", "train_dit", "train_vae",
    "transformer_sizes", "vae_piece", "verify", "video_frames", "with_overrides", "world", "write_fixed_components",
]
