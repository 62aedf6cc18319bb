"""Train the flow-matching proving-ground model from scratch, on CPU, as a Stable Diffusion 3 pipeline folder.

An ``SD3Transformer2DModel`` (MMDiT) is trained by rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 2–3) on scenes of
:class:`diffsteer.proving_ground.TrainingScenes` (never the held-out split):

    x_t = (1 − t)·x_0 + t·ε,   target v = ε − x_0,   loss = ‖v_θ(x_t, t, c) − v‖²,

with t drawn logit-normally, t = sigmoid(u), u ~ N(m, s²) (Esser et al. 2024, Sec. 3.1, "lognorm(m, s)"), the
timestep fed to the transformer as 1000·t (what ``FlowMatchEulerDiscreteScheduler`` passes at sampling), caption
dropout so that the same network is the unconditional model of classifier-free guidance (Ho & Salimans 2022),
caption noise (a share of the scenes paired with another scene's caption, as web alt-text often misdescribes its
image, so that the conditional model has a spread for guidance to remove), and an exponential moving average of the
weights.

To save CPU time it reuses the shipped UNet model (``builtin:proving-ground``): its VAE, frozen, encodes every
training scene once (its ``shift_factor`` and ``scaling_factor`` are set to the mean and 1/std of the training
latents, as SD3's VAE normalises its latents), and its trained CLIP text encoder, frozen, becomes both of SD3's
CLIP encoders (``CLIPTextModelWithProjection`` with the same weights and an identity projection: the transformer's
pooled embedder is trained, so a further projection would add nothing). There is no T5 (``text_encoder_3`` is
None): ``StableDiffusion3Pipeline`` then appends 256 zero tokens to the CLIP states. Those tokens are identical
at every layer (the context stream has no positions), so attention over them equals attention over one of them
with its logit raised by log 256; training runs on that one token with :class:`RepeatedTokenJointAttention`,
about four times faster, and the saved model is the ordinary one.

The result is a diffusers ``StableDiffusion3Pipeline`` folder (transformer in fp16), loadable by
``StableDiffusion3Pipeline.from_pretrained`` and by ``diffsteer.guidance.models.load_model``:

    python -m diffsteer.proving_ground.build_flow_model --config proving-ground-flow
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffsteer.guidance.models import from_components
from diffsteer.proving_ground import shipped
from diffsteer.proving_ground.build_model import (
    ProvingGroundModelConfig,
    _schedule,
    ema_update,
    encode_latents,
    start_build,
)
from diffsteer.training.config_io import load_config

T5_TOKENS = 256  # the zero tokens StableDiffusion3Pipeline appends without T5 (its max_sequence_length)


@dataclass
class ProvingGroundFlowConfig:
    """The recipe of builtin:proving-ground-flow (python -m diffsteer.proving_ground.build_flow_model)."""

    output: str = field(default=str(shipped.FLOW_MODEL), metadata={"help": "Output pipeline folder."})
    source_model: str = field(
        default=str(shipped.MODEL),
        metadata={"help": "The UNet model folder whose VAE and text encoder are reused (frozen)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data stream and of every initialisation."})
    num_scenes: int = field(default=20_000, metadata={"help": "Training scenes rendered and encoded once."})
    category_weights: dict[str, float] = field(
        default_factory=lambda: dict(ProvingGroundModelConfig().category_weights),
        metadata={"help": "Mix of prompt categories in the training stream."},
    )
    threads: int = field(
        default=1,
        metadata={"help": "torch CPU threads (on the shared 2-core machine two were 2-3x slower than one)."},
    )
    # transformer
    num_layers: int = field(default=4, metadata={"help": "MMDiT joint blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    attention_head_dim: int = field(default=32, metadata={"help": "Width of a head (inner width = heads × this)."})
    patch_size: int = field(default=2, metadata={"help": "Latent patch size (16×16 latents → 8×8 tokens)."})
    pos_embed_max_size: int = field(
        default=32, metadata={"help": "Position grid side (tokens): 32 allows 256×256 images."}
    )
    # training
    steps: int = field(default=2500, metadata={"help": "Optimisation steps."})
    batch: int = field(default=32, metadata={"help": "Batch size."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate (warm-up, cosine decay)."})
    warmup: int = field(default=200, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    caption_dropout: float = field(default=0.15, metadata={"help": "Probability of training on the empty caption."})
    caption_noise: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a training scene is paired with the caption of another random scene, as web "
            "alt-text often fails to describe its image; it gives the conditional model the spread that guidance "
            "removes in real models."
        },
    )
    logit_mean: float = field(default=0.0, metadata={"help": "m of the logit-normal t distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "s of the logit-normal t distribution."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved transformer weights."})
    snapshot_steps: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Also save the EMA model after these steps, as OUTPUT-stepN folders (pilot evaluations)."},
    )
    # sampling
    shift: float = field(default=3.0, metadata={"help": "The scheduler's σ shift at sampling (SD3: 3)."})
    recommended_policy: str = field(
        default="cfg:scale=3",
        metadata={"help": "diffsteer.json's policy: the best one measured by benchmarks/flow_guidance_study.py."},
    )
    recommended_steps: int = field(default=30, metadata={"help": "diffsteer.json's steps."})

    def __post_init__(self) -> None:
        if not 0.0 < self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in (0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(f"caption_noise must be in [0, 1), got {self.caption_noise}")
        if self.steps < 1 or self.batch < 1 or self.num_scenes < self.batch:
            raise ValueError("steps and batch must be ≥ 1 and num_scenes ≥ batch")


class RepeatedTokenJointAttention:
    """SD3's joint attention (image and context tokens in one softmax) where context token j stands for
    ``multiplicity[j]`` identical copies: softmax weights ∝ m_j·exp(q·k_j/√d), i.e. log m_j added to its logits.
    With the last context token standing for the 256 zero T5 tokens this equals the uncompressed model."""

    def __init__(self, log_multiplicity: torch.Tensor):
        self.log_multiplicity = log_multiplicity  # [context tokens]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        bias = torch.cat([torch.zeros(n_image), self.log_multiplicity]).to(q.dtype).view(1, -1)
        out = F.scaled_dot_product_attention(
            torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), attn_mask=bias
        )
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def compressed_attention(transformer, clip_tokens: int) -> None:
    """Install :class:`RepeatedTokenJointAttention` for context = ``clip_tokens`` CLIP tokens + one T5 token."""
    log_m = torch.zeros(clip_tokens + 1)
    log_m[-1] = math.log(T5_TOKENS)
    transformer.set_attn_processor(RepeatedTokenJointAttention(log_m))


def with_projection(text_encoder):
    """The CLIPTextModel as a CLIPTextModelWithProjection with the same weights and an identity projection."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(text_encoder.config)
    config.projection_dim = config.hidden_size
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    model.text_model.load_state_dict(text_encoder.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return model.eval()


def build_transformer(cfg: ProvingGroundFlowConfig, text_width: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(cfg.seed + 3)
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=cfg.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=2 * text_width,  # the two CLIP widths side by side, no padding
        caption_projection_dim=inner,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=cfg.pos_embed_max_size,
        qk_norm="rms_norm",
    )


def load_source(cfg: ProvingGroundFlowConfig):
    """The source model's VAE (fp32), text encoder and tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    source = Path(cfg.source_model)
    vae = AutoencoderKL.from_pretrained(source / "vae").float().eval()
    text = CLIPTextModel.from_pretrained(source / "text_encoder").float().eval()
    return vae, text, CLIPTokenizer.from_pretrained(source / "tokenizer")


def logit_normal_t(n: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std²) (Esser et al. 2024, eq. 19)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow's noisy input x_t = (1 − t)·x0 + t·ε and its velocity target ε − x0."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, noise - x0


def training_captions(
    caption_index: torch.Tensor,
    idx: torch.Tensor,
    noise: float,
    dropout: float,
    empty_index: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The caption (an index into the unique captions) each drawn scene ``idx`` trains with: with probability
    ``noise`` the caption of another random scene, then with probability ``dropout`` the empty caption."""
    cap = caption_index[idx].clone()
    if noise > 0:
        mismatched = torch.rand(len(idx), generator=generator) < noise
        others = caption_index[torch.randint(0, len(caption_index), (len(idx),), generator=generator)]
        cap[mismatched] = others[mismatched]
    cap[torch.rand(len(idx), generator=generator) < dropout] = empty_index
    return cap


def train_transformer(cfg, latents_mean, latents_std, latent_shift, scaling, captions, model, log, snapshot=None):
    """Rectified-flow training of ``model.backbone`` on the encoded scenes; returns the EMA transformer.
    ``snapshot(step, ema)`` is called after each of ``cfg.snapshot_steps``."""
    transformer = model.backbone.train()
    unique = sorted(set(captions)) + [""]
    conditions = model.family.encode_prompts(model, unique, height=64, width=64)
    hidden = torch.cat([c.hidden_states for c in conditions])
    clip_tokens = hidden.shape[1] - T5_TOKENS
    if hidden[:, clip_tokens:].abs().max() != 0:
        raise ValueError("expected the pipeline's zero T5 tokens after the CLIP tokens")
    hidden = hidden[:, : clip_tokens + 1]  # one token stands for the 256 identical ones
    pooled = torch.cat([c.added["pooled_projections"] for c in conditions])
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty_index = len(unique) - 1
    compressed_attention(transformer, clip_tokens)
    ema = copy.deepcopy(transformer).eval()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    losses = []
    bar = tqdm(range(cfg.steps), desc="transformer", mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, cfg.steps, min(cfg.warmup, cfg.steps))
        idx = torch.randint(0, len(captions), (cfg.batch,), generator=g)
        posterior = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        x0 = (posterior - latent_shift) * scaling
        noise = torch.randn(x0.shape, generator=g)
        t = logit_normal_t(cfg.batch, cfg.logit_mean, cfg.logit_std, g)
        x_t, target = flow_pair(x0, noise, t)
        cap = training_captions(caption_index, idx, cfg.caption_noise, cfg.caption_dropout, empty_index, g)
        pred = transformer(
            hidden_states=x_t,
            timestep=1000 * t,
            encoder_hidden_states=hidden[cap],
            pooled_projections=pooled[cap],
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, transformer, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 200 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if snapshot is not None and step + 1 in cfg.snapshot_steps:
            snapshot(step + 1, ordinary_attention(copy.deepcopy(ema)))
    log["flow_mse_first_200"] = float(np.mean(losses[:200]))
    log["flow_mse_last_200"] = float(np.mean(losses[-200:]))
    return ordinary_attention(ema)


def ordinary_attention(transformer):
    """The transformer with diffusers' own joint attention again (what the saved model runs)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
    return transformer


def train(cfg: ProvingGroundFlowConfig) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler

    t0 = time.perf_counter()
    out, log, pixels, captions = start_build(cfg)

    t1 = time.perf_counter()
    vae, text, tokenizer = load_source(cfg)
    mean, std = encode_latents(vae, pixels)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
    latent_shift, scaling = float(sample.mean()), float(1.0 / sample.std())
    vae.register_to_config(shift_factor=latent_shift, scaling_factor=scaling)
    log["encode_s"] = time.perf_counter() - t1
    log["shift_factor"], log["scaling_factor"] = latent_shift, scaling

    t2 = time.perf_counter()
    components = {
        "transformer": build_transformer(cfg, text.config.hidden_size),
        "vae": vae,
        "text_encoder": with_projection(text),
        "text_encoder_2": with_projection(text),
        "text_encoder_3": None,
        "tokenizer": tokenizer,
        "tokenizer_2": copy.deepcopy(tokenizer),
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
    }
    model = from_components("proving-ground-flow", components)

    def snapshot(step, transformer):
        save_pipeline(cfg, {**components, "transformer": transformer}, Path(f"{out}-step{step}"), {**log, "step": step})

    trained = train_transformer(cfg, mean, std, latent_shift, scaling, captions, model, log, snapshot)
    log["transformer_s"] = time.perf_counter() - t2
    log["total_s"] = time.perf_counter() - t0
    save_pipeline(cfg, {**components, "transformer": trained}, out, log)
    return out


def save_pipeline(cfg: ProvingGroundFlowConfig, components: dict, out: Path, log: dict) -> None:
    """The pipeline folder with its training log and diffsteer.json. Transformer and VAE in fp16 (copies); the
    text encoders (0.3 MB each) stay fp32, as in the UNet model's folder."""
    from diffusers import StableDiffusion3Pipeline

    parts = {**components, "transformer": copy.deepcopy(components["transformer"]).half()}
    parts["vae"] = copy.deepcopy(components["vae"]).half()
    shutil.rmtree(out / "transformer", ignore_errors=True)
    StableDiffusion3Pipeline(**parts).save_pretrained(out, safe_serialization=True)
    log["parameters"] = {
        name: sum(p.numel() for p in parts[name].parameters()) for name in ("vae", "text_encoder", "transformer")
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    defaults = {"policy": cfg.recommended_policy, "steps": cfg.recommended_steps, "native_size": 64, "max_size": 256}
    (out / "diffsteer.json").write_text(json.dumps(defaults, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="proving-ground-flow", help="YAML recipe (path or shipped name).")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Overrides of the recipe.")
    args = parser.parse_args(argv)
    print(train(load_config(ProvingGroundFlowConfig, args.config, args.set)))


if __name__ == "__main__":
    main()
