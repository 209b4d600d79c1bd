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
