"""Tiny flow-matching transformer pipelines built from config: SD3 / SD3.5, FLUX.1 (dev and schnell), Qwen-Image,
Z-Image.

Like ``tiny.py`` for the UNet families, these are random-weight models at toy size, for the tests and for users
trying the sampler offline: each builder returns the keyword arguments of the diffusers pipeline
(``StableDiffusion3Pipeline(**tiny_sd3_components())``, ``FluxPipeline``, ``QwenImagePipeline``,
``ZImagePipeline``), and the pipeline runs the same code paths as the real checkpoint (MMDiT with three text
encoders, packed 2x2 latents with rotary positions and guidance embedding, a Qwen2.5-VL text encoder behind a chat
template, a causal 3-D VAE, dynamic timestep shifting, Z-Image's single-stream transformer over per-image token
lists with a Qwen3 text encoder). Nothing is downloaded: the CLIP tokenizers come from ``tiny.py``, and the T5
(Unigram) and Qwen2/Qwen3 (byte-level BPE, the latter with a chat template) tokenizers are written here. Weights
depend only on ``seed``.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffsteer.guidance.tiny import DEFAULT_WORDS, byte_alphabet, tiny_text_encoder, tiny_tokenizer

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The words of QwenImagePipeline's prompt template, merged whole so that its system part and the user header
# come to exactly 34 tokens, as with Qwen's own tokenizer: the pipeline drops the first 34 hidden states.
QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
QWEN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
# Qwen-Image's VAE statistics for its first latent channels (the tiny VAE has fewer).
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743)


def write_t5_tokenizer(directory: str | Path, words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 512) -> Path:
    """Write tokenizer.json and tokenizer_config.json of a T5 (SentencePiece Unigram) tokenizer whose pieces are
    the given whole words: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended to every sequence, and a word
    outside the list (or a character no piece covers) is ``<unk>``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    pieces += [(p, -5.0) for p in (",", ".")]
    pieces += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(words))]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tokenizer.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": max_length,
        "pad_token": T5_PAD,
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": T5_PAD, "eos_token": T5_EOS, "unk_token": T5_UNK})
    )
    return directory


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: merge the adjacent pair of lowest rank until none is left."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_qwen2_tokenizer(directory: str | Path, words: tuple[str, ...] = DEFAULT_WORDS) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a Qwen2 byte-level BPE tokenizer: the 256 byte
    symbols, whole-word merges (bare and after a space) for the words and the pipeline template's words, and
    Qwen's chat and vision special tokens. Each word, bare or after a space, is one token: a word's merges rank
    after all earlier ones, which therefore still tokenize whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys((*QWEN_TEMPLATE_WORDS, *words)):
        for variant in (word, " " + word):
            pieces = _bpe([alphabet[b] for b in variant.encode()], ranks)
            while len(pieces) > 1:  # merges of later rank than all before, so earlier words keep their tokens
                ranks[(pieces[0], pieces[1])] = len(ranks)
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    for token in QWEN_SPECIAL:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    special = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for t in QWEN_SPECIAL
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": special,
        "additional_special_tokens": list(QWEN_SPECIAL[1:]),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@lru_cache(maxsize=4)
def _t5_dir(max_length: int) -> str:
    return str(write_t5_tokenizer(Path(tempfile.mkdtemp(prefix="diffsteer-t5tok-")), max_length=max_length))


@lru_cache(maxsize=1)
def _qwen2_dir() -> str:
    return str(write_qwen2_tokenizer(Path(tempfile.mkdtemp(prefix="diffsteer-qwentok-"))))


def tiny_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """The local T5 tokenizer over ``DEFAULT_WORDS`` (written once per process)."""
    return T5TokenizerFast.from_pretrained(_t5_dir(max_length))


def tiny_qwen2_tokenizer() -> Qwen2TokenizerFast:
    """The local Qwen2 tokenizer over ``DEFAULT_WORDS`` and the Qwen-Image template (written once per process)."""
    return Qwen2TokenizerFast.from_pretrained(_qwen2_dir())


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A one-layer T5 v1.1-style encoder (gated GELU, relative position buckets)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def tiny_flow_vae(scaling_factor: float, shift_factor: float, seed: int = 0, latent_channels: int = 4) -> AutoencoderKL:
    """A two-block KL VAE (vae_scale_factor 2) without quant convs, as in SD3 and FLUX."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _check_rope_axes(config: dict) -> None:
    if sum(config["axes_dims_rope"]) != config["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope {config['axes_dims_rope']} must sum to attention_head_dim")


def tiny_sd3_components(
    seed: int = 0,
    *,
    sample_size: int = 16,
    patch_size: int = 2,
    num_layers: int = 1,
    joint_attention_dim: int = 32,
    **transformer_overrides,
) -> dict:
    """Components of a tiny SD3 / SD3.5 pipeline (``StableDiffusion3Pipeline(**components)``): an MMDiT (SD3.5
    Large-style RMS qk-norm; ``dual_attention_layers=(0,)`` makes it 3.5 Medium-style), two CLIP encoders with
    projection (widths 8 and 16, concatenated and zero-padded to the T5 width ``joint_attention_dim``, their
    pooled projections concatenated), a T5 encoder and SD3's shift-3 flow-matching scheduler. ``sample_size``
    is in latents (the default image is ``2 * sample_size`` pixels); positions go to four times that."""
    tokenizer = tiny_tokenizer()
    tokenizer_3 = tiny_t5_tokenizer()
    widths = (8, 16)
    if joint_attention_dim < sum(widths):
        raise ValueError(f"joint_attention_dim must hold the two CLIP widths {widths}, got {joint_attention_dim}")
    config = dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=sum(widths),
        pos_embed_max_size=4 * sample_size // patch_size,
        qk_norm="rms_norm",
    )
    config.update(transformer_overrides)
    config["caption_projection_dim"] = config["attention_head_dim"] * config["num_attention_heads"]  # the inner width
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config).eval()
    return {
        "transformer": transformer,
        "vae": tiny_flow_vae(scaling_factor=1.5035, shift_factor=0.0609, seed=seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), hidden=widths[0], projection_dim=widths[0], seed=seed + 2),
        "text_encoder_2": tiny_text_encoder(len(tokenizer), hidden=widths[1], projection_dim=widths[1], seed=seed + 3),
        "text_encoder_3": tiny_t5_encoder(len(tokenizer_3), d_model=joint_attention_dim, seed=seed + 4),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components(
    seed: int = 0,
    *,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 1,
    joint_attention_dim: int = 32,
    **transformer_overrides,
) -> dict:
    """Components of a tiny FLUX.1 pipeline (``FluxPipeline(**components)``): a transformer with double- and
    single-stream blocks over 2x2-packed latents (``guidance_embeds`` True is FLUX.1-dev's distilled guidance,
    False is schnell), a CLIP text encoder for the pooled vector, a T5 encoder for the sequence and FLUX's
    resolution-dependent shifting scheduler. The pipeline's default size (128 latents) is 256 pixels here."""
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    latent_channels, clip_width = 4, 32
    config = dict(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(transformer_overrides)
    _check_rope_axes(config)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config).eval()
    return {
        "transformer": transformer,
        "vae": tiny_flow_vae(
            scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1, latent_channels=latent_channels
        ),
        "text_encoder": tiny_text_encoder(len(tokenizer), hidden=clip_width, seed=seed + 2),
        "text_encoder_2": tiny_t5_encoder(len(tokenizer_2), d_model=joint_attention_dim, seed=seed + 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_qwen25vl_encoder(tokenizer, hidden: int = 32, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A one-layer Qwen2.5-VL (multimodal rotary sections, grouped-query attention, a one-block vision tower that
    text-only prompts never run) whose token ids are the tokenizer's."""
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    half = hidden // 2 // 2  # rotary frequencies of a head (two heads), split over time, height and width
    time_part = half // 4
    mrope_section = [time_part, (half - time_part) // 2, half - time_part - (half - time_part) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=4,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_components(seed: int = 0, **transformer_overrides) -> dict:
    """Components of a tiny Qwen-Image pipeline (``QwenImagePipeline(**components)``): an MMDiT over 2x2-packed
    latents with 3-axis rotary positions, a causal 3-D VAE (z_dim 4, vae_scale_factor 2, Qwen's per-channel
    latent statistics), a Qwen2.5-VL text encoder behind the pipeline's chat template, and Qwen-Image's
    exponential dynamic-shift scheduler. The pipeline's default size (128 latents) is 256 pixels here."""
    tokenizer = tiny_qwen2_tokenizer()
    z_dim = 4
    config = dict(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(transformer_overrides)
    _check_rope_axes(config)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**config).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=list(QWEN_LATENTS_MEAN[:z_dim]),
        latents_std=list(QWEN_LATENTS_STD[:z_dim]),
    ).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": tiny_qwen25vl_encoder(tokenizer, hidden=config["joint_attention_dim"], seed=seed + 2),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
    }


# Qwen3's chat format as ZImagePipeline uses it (one user message, the generation prompt, thinking enabled: no
# empty think block); written here, not Qwen's own template, which also formats tools and reasoning turns.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
QWEN3_THINK = ("<think>", "</think>")
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}  # Z-Image-Turbo's


def write_qwen3_tokenizer(directory: str | Path, words: tuple[str, ...] = DEFAULT_WORDS) -> Path:
    """Write a Qwen3 tokenizer: :func:`write_qwen2_tokenizer`'s byte-level BPE with Qwen3's ``<think>`` /
    ``</think>`` added tokens and :data:`QWEN3_CHAT_TEMPLATE`."""
    directory = write_qwen2_tokenizer(directory, words)
    vocab = json.loads((directory / "vocab.json").read_text())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for token in QWEN3_THINK:
        vocab[token] = len(vocab)
        config["added_tokens_decoder"][str(vocab[token])] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    config["chat_template"] = QWEN3_CHAT_TEMPLATE
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@lru_cache(maxsize=1)
def _qwen3_dir() -> str:
    return str(write_qwen3_tokenizer(Path(tempfile.mkdtemp(prefix="diffsteer-qwen3tok-"))))


def tiny_qwen3_tokenizer() -> Qwen2TokenizerFast:
    """The local Qwen3 tokenizer (Qwen2's class, Qwen3's chat template) over ``DEFAULT_WORDS``."""
    return Qwen2TokenizerFast.from_pretrained(_qwen3_dir())


def tiny_qwen3_encoder(tokenizer, hidden: int = 32, num_layers: int = 2, seed: int = 0) -> Qwen3Model:
    """A Qwen3 language model without its head (qk-norm, grouped-query attention), as Z-Image's text encoder;
    two layers, so that the penultimate hidden states ZImagePipeline takes come from a layer, not the embedding."""
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    return Qwen3Model(config).eval()


def tiny_zimage_components(seed: int = 0, *, text_width: int = 32, **transformer_overrides) -> dict:
    """Components of a tiny Z-Image pipeline (``ZImagePipeline(**components)``): the single-stream transformer
    (noise and context refiners, 3-axis rotary positions, per-image token lists padded to multiples of 32, its
    image and caption pad tokens set to random values rather than zeros so that tests see them), FLUX's VAE
    normalisation on a two-block KL VAE (vae_scale_factor 2, 4 channels), a Qwen3 text encoder behind the chat
    template, and Z-Image-Turbo's static shift-3 scheduler. The pipeline's default size (1024 px) is big here."""
    tokenizer = tiny_qwen3_tokenizer()
    latent_channels = 4
    config = dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=text_width,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 512, 512],
    )
    config.update(transformer_overrides)
    if sum(config["axes_dims"]) != config["dim"] // config["n_heads"]:
        raise ValueError(f"axes_dims {config['axes_dims']} must sum to the head width dim / n_heads")
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return {
        "transformer": transformer,
        "vae": tiny_flow_vae(
            scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1, latent_channels=latent_channels
        ),
        "text_encoder": tiny_qwen3_encoder(tokenizer, hidden=text_width, seed=seed + 2),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
    }
