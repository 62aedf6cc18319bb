"""Tiny Stable-Diffusion-family components built from config in well under a second.

They have random weights and exist so that the sampler, the CLI, the service and the tests run anywhere,
offline: the same code paths as a real SD 1.x / 2.x (v-prediction) / SDXL checkpoint, at toy size. The
tokenizer is a real CLIP byte-level BPE tokenizer whose vocabulary and merges are written here (the byte
alphabet plus whole-word merges for a few words), since none can be downloaded.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_WORDS = (
    "a an the of and to with in on photo painting red green blue yellow white black cat dog "
    "circle square triangle house tree car small large left right above below two three"
).split()


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE (printable bytes map to
    themselves, the rest to code points from 256 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_tokenizer(directory: str | Path, words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a CLIP tokenizer with whole-word merges."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@lru_cache(maxsize=4)
def _tokenizer_dir(max_length: int) -> str:
    return str(write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="diffsteer-tok-")), max_length=max_length))


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(_tokenizer_dir(max_length))


def tiny_text_encoder(vocab_size: int, hidden: int = 32, projection_dim: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=projection_dim or hidden,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_vae(seed: int = 0, blocks: int = 2) -> AutoencoderKL:
    torch.manual_seed(seed)
    channels = [16, 32, 32, 32][:blocks]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(channels),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def tiny_unet(cross_dim: int, sample_size: int = 16, seed: int = 0, sdxl_pooled_dim: int | None = None):
    torch.manual_seed(seed)
    kwargs = {}
    if sdxl_pooled_dim is not None:
        kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + sdxl_pooled_dim,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        **kwargs,
    ).eval()


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(sched.config)


def tiny_sd_components(prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """Components of a tiny SD 1.x (epsilon) or SD 2.x-style (v_prediction) pipeline."""
    tokenizer = tiny_tokenizer()
    return {
        "unet": tiny_unet(cross_dim=32, seed=seed),
        "vae": tiny_vae(seed=seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), seed=seed + 2),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config(tiny_scheduler_config(prediction_type)),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Components of a tiny SDXL pipeline: two text encoders (the second with projection), text_time."""
    tokenizer = tiny_tokenizer()
    return {
        "unet": tiny_unet(cross_dim=64, seed=seed, sdxl_pooled_dim=32),
        "vae": tiny_vae(seed=seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), hidden=32, seed=seed + 2),
        "text_encoder_2": tiny_text_encoder(len(tokenizer), hidden=32, projection_dim=32, seed=seed + 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "scheduler": EulerDiscreteScheduler.from_config(tiny_scheduler_config()),
        "image_encoder": None,
        "feature_extractor": None,
    }
