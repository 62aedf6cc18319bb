import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sd_model():
    from diffsteer.guidance.models import load_model

    return load_model("builtin:tiny", device="cpu")


@pytest.fixture(scope="session")
def sdxl_model():
    from diffsteer.guidance.models import load_model

    return load_model("builtin:tiny-sdxl", device="cpu")


@pytest.fixture(scope="session")
def vpred_model():
    from diffsteer.guidance.models import load_model

    return load_model("builtin:tiny-v", device="cpu")
