import os

# Tests never touch a model hub; the bundled text encoder loads from its package folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Image-folder check indexes go to a throwaway cache, never the user's ~/.cache/ldmkit.
if "LDMKIT_CACHE" not in os.environ:
    import tempfile

    os.environ["LDMKIT_CACHE"] = tempfile.mkdtemp(prefix="ldmkit-test-cache-")
