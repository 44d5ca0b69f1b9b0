"""The demo VAE trains in the regime inference runs it: a clip streamed through the causal caches (a warm prefix
without gradients, then frames with gradients) is encoded as one `vae.encode` of the whole clip and decoded as
avatarcli.decode.stream.StreamingDecoder decodes the same latents."""

from __future__ import annotations

import numpy as np
import torch


def _vae():
    from avatarcli.demo.train import DemoSizes, fold_latent_statistics, new_vae

    torch.manual_seed(0)
    vae = new_vae(DemoSizes(vae_base=4)).eval()
    fold_latent_statistics(vae, torch.randn(16) * 0.1, torch.rand(16) + 0.5)
    return vae


def test_streamed_training_step_encodes_and_decodes_as_inference(one_thread):
    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.demo.train import vae_stream_step, video_frames

    vae = _vae()
    warm, grad = 3, 2
    x = torch.rand(1, 3, video_frames(warm + grad), 16, 16) * 2 - 1
    target, recon, posterior = vae_stream_step(vae, x, warm, train_encoder=True, sample=False)
    prefix = video_frames(warm)
    assert target.shape[2] == x.shape[2] - prefix == 4 * grad and recon.shape == target.shape
    with torch.no_grad():
        whole = vae.encode(x).latent_dist
    # the chunked encode with carried caches is vae.encode of the whole clip
    torch.testing.assert_close(posterior.mean, whole.mean[:, :, warm:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, whole.logvar[:, :, warm:], rtol=1e-5, atol=1e-5)
    # the decode with carried caches is what the inference stream writes for the same latents
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    normalised = (whole.mode() - mean) / std
    stream = StreamingDecoder(vae)
    head = stream.push(normalised[:, :, :warm])
    tail = stream.push(normalised[:, :, warm:])
    assert head.shape[0] == prefix and tail.shape[0] == 4 * grad
    trained = ((recon.detach()[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().numpy()
    assert np.abs(trained - tail.astype(float)).max() <= 1  # (z / (1/std) + mean) rounds apart from z
    with torch.no_grad():
        torch.testing.assert_close(recon.detach().clamp(-1, 1), vae.decode(whole.mode()).sample[:, :, prefix:],
                                   rtol=1e-4, atol=1e-4)
    # a different warm prefix changes the output: the caches really carry the past
    other = x.clone()
    other[:, :, :prefix] = -other[:, :, :prefix]
    _, recon_other, _ = vae_stream_step(vae, other, warm, train_encoder=True, sample=False)
    assert (recon_other - recon).abs().max() > 1e-3


def test_streamed_training_step_backpropagates_only_through_the_frames_with_gradients(one_thread):
    from avatarcli.demo.train import vae_stream_step, video_frames

    vae = _vae().train()
    x = torch.rand(1, 3, video_frames(2 + 2), 16, 16) * 2 - 1
    x.requires_grad_(True)
    target, recon, posterior = vae_stream_step(vae, x, 2, train_encoder=True)
    (recon - target).abs().mean().add(posterior.mean.square().mean()).backward()
    assert x.grad[:, :, : video_frames(2)].abs().max() == 0  # the warm prefix is cut off (no_grad, detached caches)
    assert x.grad[:, :, video_frames(2) :].abs().max() > 0
    assert vae.encoder.conv_in.weight.grad.abs().max() > 0 and vae.decoder.conv_out.weight.grad.abs().max() > 0
    vae.zero_grad(set_to_none=True)
    _, recon, _ = vae_stream_step(vae, x.detach(), 2, train_encoder=False)
    recon.abs().mean().backward()
    assert vae.encoder.conv_in.weight.grad is None and vae.decoder.conv_out.weight.grad.abs().max() > 0


def test_video_frames_counts_one_then_four():
    from avatarcli.demo.train import video_frames

    assert [video_frames(n) for n in range(5)] == [0, 1, 5, 9, 13]
