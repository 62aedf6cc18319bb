"""The tiny SD3 / FLUX.1 / Qwen-Image components: built from config with tokenizers written locally, the same
weights for the same seed, and the diffusers pipelines run end to end on them (two steps, square and non-square
sizes, true CFG for Qwen-Image), offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline  # noqa: E402

from diffsteer.guidance.tiny_transformers import (  # noqa: E402
    tiny_flux_components,
    tiny_qwen2_tokenizer,
    tiny_qwenimage_components,
    tiny_sd3_components,
    tiny_t5_tokenizer,
    write_t5_tokenizer,
)

FAMILIES = {
    "sd3": (StableDiffusion3Pipeline, tiny_sd3_components),
    "sd3.5-medium": (StableDiffusion3Pipeline, partial(tiny_sd3_components, dual_attention_layers=(0,))),
    "flux-dev": (FluxPipeline, partial(tiny_flux_components, guidance_embeds=True)),
    "flux-schnell": (FluxPipeline, partial(tiny_flux_components, guidance_embeds=False)),
    "qwenimage": (QwenImagePipeline, tiny_qwenimage_components),
}
QWEN_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


def pipeline(family: str, seed: int = 0):
    cls, build = FAMILIES[family]
    pipe = cls(**build(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, height: int, width: int, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        "a red cat on a blue square",
        height=height,
        width=width,
        num_inference_steps=2,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


def modules(components: dict) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_on_cpu_in_eval_fp32(family):
    build = FAMILIES[family][1]
    first, second, other = modules(build(7)), modules(build(7)), modules(build(8))
    assert first.keys() == second.keys() and len(first) >= 3
    for name, module in first.items():
        assert not module.training
        a, b, c = module.state_dict(), second[name].state_dict(), other[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name  # the seed matters
        params = list(module.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params), name
        assert sum(p.numel() for p in params) < 300_000, name  # tiny


@pytest.mark.parametrize("shape", ["square", "non-square"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_two_steps(family, shape):
    pipe = pipeline(family)
    assert pipe.vae_scale_factor == 2
    multiple = pipe.vae_scale_factor * 2  # SD3: times the patch size; FLUX, Qwen-Image: the 2x2 packing
    height, width = (8 * multiple, 8 * multiple) if shape == "square" else (6 * multiple, 10 * multiple)
    images = generate(pipe, height, width)
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_qwenimage_true_cfg_with_a_negative_prompt():
    pipe = pipeline("qwenimage")
    plain = generate(pipe, 24, 40, true_cfg_scale=1.0)
    guided = generate(pipe, 24, 40, negative_prompt="blurry, low quality", true_cfg_scale=4.0)
    assert guided.shape == plain.shape == (1, 24, 40, 3)
    assert np.isfinite(guided).all()
    assert not np.allclose(guided, plain)


def test_flux_guidance_embedding_is_dev_or_schnell():
    dev, schnell = pipeline("flux-dev").transformer, pipeline("flux-schnell").transformer
    assert dev.config.guidance_embeds and hasattr(dev.time_text_embed, "guidance_embedder")
    assert not schnell.config.guidance_embeds and not hasattr(schnell.time_text_embed, "guidance_embedder")
    assert dev.config.in_channels == 4 * pipeline("flux-dev").vae.config.latent_channels


def test_sd3_prompt_embeddings_join_clip_and_t5():
    pipe = pipeline("sd3")
    embeds, _, pooled, _ = pipe.encode_prompt("a red cat", None, None, do_classifier_free_guidance=False)
    clip_widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert embeds.shape == (1, 77 + 256, pipe.transformer.config.joint_attention_dim)
    assert torch.all(embeds[:, :77, clip_widths:] == 0)  # the CLIP states are zero-padded to T5's width
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)


def test_qwen_tokenizer_template_prefix_is_the_34_dropped_tokens():
    tokenizer = tiny_qwen2_tokenizer()
    pipe = pipeline("qwenimage")
    assert pipe.prompt_template_encode.startswith(QWEN_TEMPLATE_PREFIX)
    prefix = tokenizer(QWEN_TEMPLATE_PREFIX).input_ids
    assert len(prefix) == pipe.prompt_template_encode_start_idx == 34
    assert tokenizer.convert_ids_to_tokens(prefix[-3:]) == ["<|im_start|>", "user", "Ċ"]
    assert tokenizer.decode(tokenizer("a zebra, über").input_ids) == "a zebra, über"  # bytes cover anything


def test_qwenimage_prompt_lengths_give_embedding_lengths():
    pipe = pipeline("qwenimage")
    short, short_mask = pipe.encode_prompt("a cat", device="cpu")
    long, _ = pipe.encode_prompt("a red cat on a blue square with two small dogs", device="cpu")
    assert short.shape[1] < long.shape[1] and short_mask is None
    both, mask = pipe.encode_prompt(["a cat", "a red cat on a blue square with two small dogs"], device="cpu")
    assert both.shape == (2, long.shape[1], 32)
    assert mask.sum(dim=1).tolist() == [short.shape[1], long.shape[1]]
    assert torch.allclose(both[0, : short.shape[1]], short[0], atol=1e-5)


def test_t5_tokenizer_unknown_words_and_eos(tmp_path):
    tokenizer = tiny_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red zebra").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁red", "<unk>", "</s>"]
    padded = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert padded[:3] == tokenizer.convert_tokens_to_ids(["▁a", "▁cat", "</s>"]) and padded[3:] == [0] * 5
    own = type(tokenizer).from_pretrained(write_t5_tokenizer(tmp_path, words=("zebra",), max_length=16))
    assert own.convert_ids_to_tokens(own("zebra cat").input_ids) == ["▁zebra", "<unk>", "</s>"]
    assert own.model_max_length == 16


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "qwenimage"])
def test_saved_pipeline_reloads_offline(family, tmp_path):
    pipe = pipeline(family)
    pipe.save_pretrained(tmp_path)
    reloaded = FAMILIES[family][0].from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(pipe, 32, 32), generate(reloaded, 32, 32))


def test_bad_overrides_are_refused():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_flux_components(attention_head_dim=8)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_qwenimage_components(axes_dims_rope=(2, 2, 2))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        tiny_sd3_components(joint_attention_dim=16)
