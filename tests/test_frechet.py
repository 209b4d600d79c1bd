"""The Fréchet distance of ldmkit.evaluate.frechet: the formula against its closed form, the trained
features against degradations they were never trained on, the cache, and the errors."""

import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ldmkit.data import build_dataset
from ldmkit.errors import LdmkitError
from ldmkit.evaluate import frechet as fr


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 3, S, S), reflect-padded."""
    k = 2 * round(3 * sigma) + 1
    t = torch.arange(k) - (k - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)


def test_formula_matches_the_closed_form_for_diagonal_gaussians():
    # For N(μ1, diag σ1²) and N(μ2, diag σ2²), Σ1 Σ2 is diagonal and (Σ1 Σ2)^½ = diag(σ1 σ2), so
    # d² = ||μ1 − μ2||² + Σ (σ1 − σ2)². Large samples: the estimate is within a few percent.
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([2.0, 1.0, 0.5, 3.0])
    n = 50_000
    a = mu1 + s1 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    b = mu2 + s2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    exact = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # 6 + 7 = 13
    assert fr.frechet_from_features(a, b) == pytest.approx(exact, rel=0.03)


def test_formula_matches_scipy_sqrtm_on_the_sample_statistics():
    # The reference implementation of FID (Heusel et al.'s TTUR code) takes scipy.linalg.sqrtm of
    # Σ1 Σ2; on correlated features both must agree to rounding.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.3
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert fr.frechet_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)


@pytest.fixture(scope="module")
def faces():
    """The 100 bundled faces at 32 px, split at random into two halves of 50, and the trained network."""
    real = torch.cat([build_dataset("faces", 32, "train").images, build_dataset("faces", 32, "val").images])
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))
    net = fr.feature_network("faces", 32)  # trained once here (about 15 s of one thread), then cached
    return real[perm[:50]], real[perm[50:]], net


@pytest.mark.slow
def test_real_halves_are_far_closer_than_degraded_images(faces):
    a, b, _ = faces
    g = torch.Generator().manual_seed(2)
    floor = fr.frechet_distance(a, b, "faces")
    noised = (b + 0.1 * torch.randn(b.shape, generator=g)).clamp(-1, 1)
    shuffled = b.flatten(2)[:, :, torch.randperm(32 * 32, generator=g)].view_as(b)  # same pixels, no structure
    for name, x in (("blurred", _blur(b, 1.0)), ("noised", noised), ("shuffled", shuffled)):
        d = fr.frechet_distance(a, x, "faces")
        assert d > 3 * floor, f"{name}: {d:.2f} against real halves {floor:.2f}"


@pytest.mark.slow
def test_distance_grows_with_blur(faces):
    a, b, _ = faces
    ds = [fr.frechet_distance(a, _blur(b, s), "faces") for s in (0.5, 1.0, 2.0, 3.0)]
    assert ds == sorted(ds) and ds[0] < ds[-1], ds


@pytest.mark.slow
def test_the_cached_network_is_loaded_not_trained(faces, monkeypatch):
    a, _, net = faces
    assert (fr._cache_dir() / f"faces-32px-v{fr.VERSION}.safetensors").is_file()
    assert fr.network_info("faces", 32)["classes"] == 90
    monkeypatch.setattr(fr, "_loaded", {})  # a new process: nothing in memory

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(fr, "_train", no_training)
    again = fr.feature_network("faces", 32)
    assert again is not net
    with torch.no_grad():
        torch.testing.assert_close(again(a), net(a), rtol=0, atol=0)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(fr, "STEPS", 5)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    one, meta = fr._train("digits", 8)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    with torch.no_grad():  # as when first asked for inside an evaluation: training still works, identically
        two, _ = fr._train("digits", 8)
    for (k, v), w in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(v, w), k
    assert meta["features"] == fr.FEATURES and meta["classes"] == 10
    out = one(build_dataset("digits", 8, "val").images[:5])
    assert out.shape == (5, fr.FEATURES)


def test_names_say_what_the_distance_is():
    assert fr.distance_name("faces", inception="/some/inception.pth") == "FID"
    name = fr.distance_name("photos")
    assert name.startswith("FD-photos") and "FID" not in name and f"{fr.FEATURES}-d" in name


def test_a_bad_dataset_name_is_one_clear_error():
    x = torch.zeros(4, 3, 32, 32)
    for call in (lambda: fr.feature_network("cifar10", 32), lambda: fr.frechet_distance(x, x, "cifar10"),
                 lambda: fr.distance_name("cifar10")):
        with pytest.raises(LdmkitError, match="cifar10.*faces, photos"):
            call()


def test_a_missing_inception_file_is_one_clear_error(tmp_path):
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(LdmkitError, match=f"no Inception weights file at .*{fr.INCEPTION_FILE}"):
        fr.frechet_distance(x, x, "faces", inception=str(tmp_path / "missing.pth"))


def test_a_wrong_inception_file_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    x = torch.zeros(4, 3, 32, 32)
    # without torch-fidelity: "pip install ldmkit[fid]"; with it: the file is not the expected one
    with pytest.raises(LdmkitError, match=r"ldmkit\[fid\]|is not torch-fidelity's"):
        fr.frechet_distance(x, x, "faces", inception=str(junk))


def test_missing_torchmetrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # import fails as if not installed
    with pytest.raises(LdmkitError, match=r"pip install ldmkit\[study\]"):
        fr.frechet_from_features(torch.randn(5, 2), torch.randn(5, 2))


def test_bad_image_batches_are_clear_errors():
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(LdmkitError, match="differ in size"):
        fr.frechet_distance(x, torch.zeros(4, 3, 16, 16), "faces")
    with pytest.raises(LdmkitError, match="at least 2 images"):
        fr.frechet_distance(x, x[:1], "faces")
    with pytest.raises(LdmkitError, match=r"\(N, 3, S, S\)"):
        fr.frechet_distance(x[0], x, "faces")
