import os
import shutil
import tempfile

# Offline, quiet, and a cache of our own so tests never touch ~/.cache/treg or the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
_OWN_CACHE = "TREG_CACHE_DIR" not in os.environ
os.environ.setdefault("TREG_CACHE_DIR", tempfile.mkdtemp(prefix="treg-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is as fast and immune to contention on a busy 2-core machine (seen: 500x slower with 2).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny SFT model and tokenizer (built once per test session)."""
    from treg.synthetic import load_tiny_model

    model, tokenizer, path = load_tiny_model(show_progress=False)
    return model, tokenizer, path


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's own cache (tiny model, converted SmolLM2: ~0.6 GB) unless the caller chose the folder."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["TREG_CACHE_DIR"], ignore_errors=True)
