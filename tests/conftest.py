import os

# Tests never touch a model hub; the bundled text encoder loads from its package folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
