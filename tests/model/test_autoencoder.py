import pytest
import torch

from svd.model.autoencoder import AutoencoderConfig, SpaceToDepthAutoencoder, build_autoencoder


def frames(b: int = 2, t: int = 5, h: int = 16, w: int = 24) -> torch.Tensor:
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_space_to_depth_round_trip_is_lossless():
    ae = SpaceToDepthAutoencoder(factor=4)
    x = frames()
    z = ae.encode(x)
    assert z.shape == (2, 5, 48, 4, 6)
    assert torch.equal(ae.decode(z), x)


@pytest.mark.parametrize("kind", ["kl", "kl_temporal"])
def test_diffusers_autoencoders_map_frames_to_scaled_latents_and_back(kind):
    torch.manual_seed(0)
    ae = build_autoencoder(AutoencoderConfig(kind=kind, chunk_frames=2))
    assert (ae.latent_channels, ae.downscale) == (4, 2)
    z = ae.encode(frames())
    assert z.shape == (2, 5, 4, 8, 12)
    unscaled = ae.vae.encode(frames()[0, :1]).latent_dist.mode()
    torch.testing.assert_close(z[0, :1], unscaled * 0.18215, atol=1e-5, rtol=1e-5)
    assert ae.decode(z).shape == (2, 5, 3, 16, 24)
    assert not any(p.requires_grad for p in ae.parameters())  # frozen


def test_encoding_in_chunks_equals_encoding_at_once():
    torch.manual_seed(0)
    one = build_autoencoder(AutoencoderConfig(kind="kl", chunk_frames=100))
    chunked = build_autoencoder(AutoencoderConfig(kind="kl", chunk_frames=3))
    chunked.load_state_dict(one.state_dict())
    x = frames()
    torch.testing.assert_close(chunked.encode(x), one.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.decode(one.encode(x)), one.decode(one.encode(x)), atol=1e-5, rtol=1e-5)


def test_posterior_samples_follow_the_generator():
    torch.manual_seed(0)
    ae = build_autoencoder(AutoencoderConfig(kind="kl", sample_posterior=True))
    x = frames(1, 2)
    a = ae.encode(x, torch.Generator().manual_seed(1))
    b = ae.encode(x, torch.Generator().manual_seed(1))
    c = ae.encode(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match=r"autoencoder\.kind='vqgan'"):
        AutoencoderConfig(kind="vqgan")
