"""The FVD feature network: a small random TorchScript 3D network stands in for I3D here (the real file is
the user's download, see the README), loaded from object storage, checked by sha256, fed StyleGAN-V's
preprocessing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from svd.eval.features import FeatureNetwork, FeatureNetworkError

# The stand-in is written in I3D's format, TorchScript, which torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|load)` is deprecated:DeprecationWarning")


class TinyI3D(nn.Module):
    """I3D's calling convention: videos (n, 3, t, h, w) in [−1, 1], StyleGAN-V's keyword flags."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=(1, 4, 4))
        self.head = nn.Linear(8, 16)

    def forward(self, x: Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        if rescale or resize or not return_features:
            raise ValueError("called with the wrong flags")
        return self.head(self.conv(x).relu().mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def network_file(tmp_path_factory) -> tuple[str, str]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def videos(n: int = 2, frames: int = 4, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, frames, height, width, 3), dtype=np.uint8)


def test_features_are_the_networks_output_on_the_preprocessed_videos(network_file, tmp_path):
    path, digest = network_file
    network = FeatureNetwork.load(path, sha256=digest, cache_dir=str(tmp_path))
    clips = videos()
    features = network(clips)
    assert features.dtype == np.float64
    assert features.shape == (2, 16)
    with torch.no_grad():
        direct = torch.jit.load(path)(
            network.preprocess(torch.from_numpy(clips)), rescale=False, resize=False, return_features=True
        )
    np.testing.assert_array_equal(features, direct.double().numpy())
    assert not np.allclose(features[0], features[1])  # each video its own row


def test_from_object_storage_with_the_pinned_checksum(network_file, moto_s3, tmp_path):
    path, digest = network_file
    uri = f"s3://{moto_s3.new_bucket()}/models/i3d.pt"
    fs, key = moto_s3.storage.fsspec(uri)
    fs.put(path, key)
    network = FeatureNetwork.load(
        uri, sha256=digest.upper(), cache_dir=str(tmp_path), storage=moto_s3.storage
    )
    assert network.sha256 == digest
    local = FeatureNetwork.load(path, sha256=digest, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(network(videos()), local(videos()))


def test_frames_are_resized_by_their_short_side_centre_cropped_and_scaled_to_plus_minus_one(
    network_file, tmp_path
):
    path, digest = network_file
    network = FeatureNetwork.load(path, sha256=digest, cache_dir=str(tmp_path))
    clip = np.zeros((1, 3, 64, 128, 3), dtype=np.uint8)
    clip[..., 28:100, 2] = 255  # a blue centre band, black outside: the crop keeps columns 32…96 only
    x = network.preprocess(torch.from_numpy(clip))
    assert tuple(x.shape) == (1, 3, 3, 224, 224)  # (videos, channels, frames, size, size)
    # (bilinear resampling of a constant is that constant, up to float rounding)
    torch.testing.assert_close(x[:, 2], torch.ones_like(x[:, 2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(x[:, :2], -torch.ones_like(x[:, :2]), rtol=0, atol=1e-5)
    tall = network.preprocess(torch.zeros((1, 2, 300, 100, 3), dtype=torch.uint8))
    assert tuple(tall.shape) == (1, 3, 2, 224, 224)


def test_a_network_with_another_checksum_is_refused_naming_both(network_file, tmp_path):
    path, digest = network_file
    with pytest.raises(
        FeatureNetworkError, match=rf"{path} has sha256 {digest}, the protocol pins 0+$|pins 0+:"
    ):
        FeatureNetwork.load(path, sha256="0" * 64, cache_dir=str(tmp_path))


def test_a_file_that_is_not_torchscript_is_named(tmp_path):
    junk = tmp_path / "i3d.pt"
    junk.write_bytes(b"not a network")
    digest = hashlib.sha256(b"not a network").hexdigest()
    with pytest.raises(FeatureNetworkError, match=rf"{junk} is not a TorchScript file"):
        FeatureNetwork.load(str(junk), sha256=digest, cache_dir=str(tmp_path))
    with pytest.raises(FeatureNetworkError, match="cannot read the feature network"):
        FeatureNetwork.load(str(tmp_path / "missing.pt"), sha256=digest, cache_dir=str(tmp_path))


def test_videos_of_another_type_or_layout_are_named(network_file, tmp_path):
    path, digest = network_file
    network = FeatureNetwork.load(path, sha256=digest, cache_dir=str(tmp_path))
    with pytest.raises(
        FeatureNetworkError, match=r"uint8 \(videos, frames, height, width, 3\), got torch.float32"
    ):
        network(np.zeros((1, 2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(FeatureNetworkError, match=r"got torch.uint8 \(2, 32, 32, 3\)"):
        network(np.zeros((2, 32, 32, 3), dtype=np.uint8))
