"""Tiny, randomly initialised reward-model architectures written to disk in the real checkpoint formats.

Used by the other ``test_rewards_*`` files; the tests here check the fixtures themselves (that the offline
tokenizer and configs are what the real libraries accept). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

# A ViT-B-style open_clip config shrunk to nothing: 32x32 images, patch 8, width 64, 2 layers.
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_OPEN_CLIP_NAME = "diffsteer-test-tiny-vit"


def write_open_clip_config(folder: Path, cfg: dict | None = None, name: str = TINY_OPEN_CLIP_NAME) -> Path:
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(cfg or TINY_OPEN_CLIP_CFG))
    return path


def make_open_clip_model(cfg: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """Random open_clip CLIP built straight from a config dict (no registry involved)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**(cfg or TINY_OPEN_CLIP_CFG))
    # Random init leaves logit_scale at log(1/0.07); move it so scaling is visible in tests.
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))
    return model.eval()


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer_files(folder: Path) -> dict[str, int]:
    """A minimal CLIP byte-level BPE vocabulary: every byte, every byte + '</w>', a few merges, the two
    special tokens. Returns the special-token ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return {"bos": vocab["<|startoftext|>"], "eos": vocab["<|endoftext|>"], "vocab_size": len(vocab)}


def hf_clip_image_processor_classes():
    """(torchvision-backed, PIL-backed) CLIP image processors: transformers 5 renamed them
    (CLIPImageProcessor / CLIPImageProcessorPil; 4.x: CLIPImageProcessorFast / CLIPImageProcessor)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.CLIPImageProcessor, transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessorFast, transformers.CLIPImageProcessor


def make_tiny_hf_clip(model_dir: Path, processor_dir: Path, image_size: int = 32, seed: int = 0):
    """Random transformers CLIPModel + tokenizer + CLIPImageProcessor saved with save_pretrained.

    Returns (model, tokenizer, image_processor) as saved."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    ids = write_clip_tokenizer_files(processor_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(processor_dir))
    tokenizer.save_pretrained(str(processor_dir))
    processor = hf_clip_image_processor_classes()[0](
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(str(processor_dir))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=ids["vocab_size"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["eos"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
        logit_scale_init_value=float(np.log(40.0)),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(model_dir))
    return model, tokenizer, processor


def smooth_test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 image with photo-like content: smooth colour fields plus mild texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.05), rng.uniform(0.01, 0.05), rng.uniform(0, 6.28)
        chans.append(0.5 + 0.35 * np.sin(fx * xx + ph) * np.cos(fy * yy - ph))
    img = np.stack(chans, -1) + rng.normal(0, 0.02, (height, width, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def noisy_test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 image of full-range i.i.d. noise: the worst case for 8-bit resampling differences (Pillow
    clips the bicubic overshoot between its two passes)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def to_tensor01(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


# ----------------------------------------------------------------------------------------------------
# Tests of the fixtures themselves.


def test_offline_clip_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    ids = write_clip_tokenizer_files(tmp_path / "raw")
    CLIPTokenizer.from_pretrained(str(tmp_path / "raw")).save_pretrained(str(tmp_path / "saved"))
    # The saved folder (tokenizer_config.json names the class) loads like a hub snapshot.
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    assert type(tok).__name__.startswith("CLIPTokenizer")
    enc = tok(["a red cat", "dog"], padding=True, truncation=True, max_length=77)
    first = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert first[0] == "<|startoftext|>" and first[-1] == "<|endoftext|>"
    assert "cat</w>" in first and "red</w>" in first  # merges applied
    assert enc["input_ids"][1][-1] == ids["eos"]  # padded with eos
    assert max(max(r) for r in enc["input_ids"]) < ids["vocab_size"]


def test_tiny_open_clip_config_builds_through_open_clip(tmp_path):
    import open_clip

    model = make_open_clip_model()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000
    out = model.encode_image(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, TINY_OPEN_CLIP_CFG["embed_dim"])
    tokens = open_clip.SimpleTokenizer()(["a photo"])
    assert model.encode_text(tokens).shape == (1, TINY_OPEN_CLIP_CFG["embed_dim"])
