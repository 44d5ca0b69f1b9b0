"""The demo VAE trains in the regime inference runs it: clips streamed piece by piece through encoder and decoder
with the causal caches carried (truncated backprop between pieces) are encoded as one `vae.encode` of the whole clip
and decoded as avatarcli.decode.stream.StreamingDecoder decodes the same latents."""

from __future__ import annotations

import numpy as np
import torch


def _vae():
    from avatarcli.demo.training import DemoSizes, fold_latent_statistics, new_vae

    torch.manual_seed(0)
    vae = new_vae(DemoSizes(vae_base=4), per_frame=False).eval()
    fold_latent_statistics(vae, torch.randn(16) * 0.1, torch.rand(16) + 0.5)
    return vae


def _pieces(x, latents_per_piece):
    from avatarcli.demo.training import video_frames

    pos = 0
    for n in latents_per_piece:
        yield x[:, :, video_frames(pos) : video_frames(pos + n)]
        pos += n


def test_streamed_training_pieces_encode_and_decode_as_inference(one_thread):
    from avatarcli.decode.stream import StreamingDecoder
    from avatarcli.demo.training import CausalStream, vae_piece, video_frames

    vae = _vae()
    split = [2, 3, 2]  # a piece without gradients, then two with, as consecutive training steps stream them
    x = torch.rand(1, 3, video_frames(sum(split)), 16, 16) * 2 - 1
    stream = CausalStream(vae)
    recons, posteriors = [], []
    for k, piece in enumerate(_pieces(x, split)):
        with torch.set_grad_enabled(k > 0):
            recon, posterior = vae_piece(stream, piece, train_encoder=True, sample=False)
        assert recon.requires_grad == (k > 0) and recon.shape == piece.shape
        recons.append(recon.detach())
        posteriors.append(posterior)
        stream.detach()
    with torch.no_grad():
        whole = vae.encode(x).latent_dist
    # the chunked encode with carried caches is vae.encode of the whole clip
    torch.testing.assert_close(torch.cat([p.mean.detach() for p in posteriors], 2), whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.logvar.detach() for p in posteriors], 2), whole.logvar, rtol=1e-5,
                               atol=1e-5)
    # the decode with carried caches is what the inference stream writes for the same latents, piece for piece
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    normalised = (whole.mode() - mean) / std
    decoder = StreamingDecoder(vae)
    pos = 0
    for n, recon in zip(split, recons):
        pushed = decoder.push(normalised[:, :, pos : pos + n])
        trained = ((recon[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().numpy()
        assert pushed.shape == trained.shape
        assert np.abs(trained - pushed.astype(float)).max() <= 1  # z / (1/std) + mean rounds apart from z
        pos += n
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(recons, 2).clamp(-1, 1), vae.decode(whole.mode()).sample,
                                   rtol=1e-4, atol=1e-4)
    # another start of the clip changes a later piece: the caches really carry the past
    other = x.clone()
    other[:, :, : video_frames(2)] *= -1
    stream = CausalStream(vae)
    with torch.no_grad():
        for piece in _pieces(other, split[:2]):
            recon_other, _ = vae_piece(stream, piece, train_encoder=True, sample=False)
    assert (recon_other - recons[1]).abs().max() > 1e-3


def test_detached_caches_cut_the_gradient_between_pieces(one_thread):
    from avatarcli.demo.training import CausalStream, vae_piece, video_frames

    vae = _vae().train()
    x = torch.rand(1, 3, video_frames(4), 16, 16) * 2 - 1
    first, second = x[:, :, : video_frames(2)].clone(), x[:, :, video_frames(2) :].clone()
    first.requires_grad_(True)
    second.requires_grad_(True)
    stream = CausalStream(vae)
    vae_piece(stream, first, train_encoder=True)
    stream.detach()
    recon, posterior = vae_piece(stream, second, train_encoder=True)
    (recon - second).abs().mean().add(posterior.mean.square().mean()).backward()
    assert first.grad is None and second.grad.abs().max() > 0  # nothing flows back into the earlier piece
    assert vae.encoder.conv_in.weight.grad.abs().max() > 0 and vae.decoder.conv_out.weight.grad.abs().max() > 0
    # without the detach the second piece's loss reaches the first (what truncation cuts)
    first.grad = None
    stream = CausalStream(vae)
    vae_piece(stream, first, train_encoder=True)
    recon, _ = vae_piece(stream, second, train_encoder=True)
    recon.abs().mean().backward()
    assert first.grad.abs().max() > 0
    # a decoder-only fine-tune leaves the encoder without gradients
    vae.zero_grad(set_to_none=True)
    recon, _ = vae_piece(CausalStream(vae), first.detach(), train_encoder=False)
    recon.abs().mean().backward()
    assert vae.encoder.conv_in.weight.grad is None and vae.decoder.conv_out.weight.grad.abs().max() > 0


def test_video_frames_counts_one_then_four():
    from avatarcli.demo.training import video_frames

    assert [video_frames(n) for n in range(5)] == [0, 1, 5, 9, 13]


def test_a_new_vae_is_per_frame_on_video_so_what_stills_teach_holds_on_clips(one_thread):
    """per_frame_start: a latent frame after the first is the still encoding of the first video frame of its 4, and
    each of the 4 frames it decodes to is its still decode (the past taps and the temporal resampling start neutral).
    Without it, the random temporal taps make them differ."""
    from avatarcli.demo.training import DemoSizes, new_vae

    torch.manual_seed(1)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    for per_frame in (True, False):
        vae = new_vae(DemoSizes(vae_base=4), per_frame=per_frame).eval()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()  # 3 latent frames: frame 0, then frames 1-4, 5-8
            still_z = torch.cat([vae.encode(x[:, :, i : i + 1]).latent_dist.mode() for i in (0, 1, 5)], dim=2)
            frames = vae.decode(z).sample
            still_frames = torch.cat([vae.decode(z[:, :, i : i + 1]).sample for i in range(3)], dim=2)
        same_z = torch.allclose(z, still_z, atol=1e-5)
        same_frames = all(torch.allclose(frames[:, :, f], still_frames[:, :, (f + 3) // 4], atol=1e-5)
                          for f in range(9))
        assert same_z == per_frame and same_frames == per_frame, (per_frame, same_z, same_frames)


def test_still_convolutions_compute_what_the_causal_3d_convolutions_do_with_their_gradients(one_thread):
    from avatarcli.demo.training import DemoSizes, new_vae, still_convolutions

    torch.manual_seed(2)
    vae = new_vae(DemoSizes(vae_base=4), per_frame=False)
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    results = []
    for patched in (False, True):
        vae.zero_grad(set_to_none=True)
        if patched:
            with still_convolutions():
                out = vae.decode(vae.encode(x).latent_dist.mode()).sample
        else:
            out = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.square().mean().backward()
        conv = vae.encoder.conv_in
        results.append((out.detach(), conv.weight.grad[:, :, -1].clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    assert WanCausalConv3d.forward.__name__ == "forward" and "still" not in WanCausalConv3d.forward.__qualname__
