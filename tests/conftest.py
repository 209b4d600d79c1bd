import os

# Tests never touch a model hub; the bundled text encoder loads from its package folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Image-folder check indexes go to a throwaway cache, never the user's ~/.cache/ldmkit.
if "LDMKIT_CACHE" not in os.environ:
    import tempfile

    os.environ["LDMKIT_CACHE"] = tempfile.mkdtemp(prefix="ldmkit-test-cache-")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """Give every test the thread count it found: a test (or `ldmkit --threads 1` run in-process) that leaves
    one thread set would make later kill-and-resume tests mix a subprocess's default-thread arithmetic with an
    in-process one-thread resume, and bit-for-bit comparisons fail."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _ZeroPredictor(torch.nn.Module):
    """A denoiser that predicts 0 for any input (one parameter, so the pipeline finds its device)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond):
        return torch.zeros_like(z)


@pytest.fixture
def zero_predictor() -> torch.nn.Module:
    """A stand-in U-Net predicting ε̂ = 0: its held-out error is E‖ε‖² = 1 per element, analytically."""
    return _ZeroPredictor()
