"""The ``diffsteer`` command line: generate images, list policies (and, later, serve and train).

Bad input exits with status 2 and one line naming the option or field and the accepted values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.image_inputs import image_fields_from_options
from diffsteer.guidance.images import encode_image


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` (or a single number for a square) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise InvalidInput("--size", f"expected WxH like 512x512, got {text!r}") from None
    return w, h


def output_paths(output: str, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InvalidInput("--output", f"must end in .png, got {output!r}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffsteer.guidance.models import load_model, model_defaults
    from diffsteer.guidance.request import GenerationParams, Limits
    from diffsteer.guidance.sampler import generate

    width = height = None
    if args.size is not None:
        width, height = parse_size(args.size)
    defaults = model_defaults(args.model)  # the model folder's diffsteer.json, read without loading the model
    max_size = args.max_size if args.max_size is not None else (defaults.max_size or 2048)
    limits = Limits(max_width=max_size, max_height=max_size)
    named = {k: v for k, v in (("policy", args.policy), ("steps", args.steps)) if v is not None}
    params = GenerationParams.parse(
        {
            "prompt": args.prompt,
            "negative_prompt": args.negative,
            **named,
            "scheduler": args.scheduler,
            "seed": args.seed,
            "num_images": args.num_images,
            "width": width,
            "height": height,
            "eta": args.eta,
            "distilled_guidance": args.distilled_guidance,
            **image_fields_from_options(args.init_image, args.mask, strength=args.strength, mask_blur=args.mask_blur),
        },
        limits,
    ).with_model_defaults(defaults, set(named), limits)  # what generate() fills too; here before the model loads
    paths = output_paths(args.output, params.num_images)
    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        config=args.model_config,
        fast_paths=args.fast_paths,
        latent_evaluators=args.latent_evaluators,
    )
    with tqdm(total=params.steps, desc="denoising", unit="step", disable=args.quiet) as bar:

        def progress(event) -> None:
            bar.total = event.total
            bar.set_postfix(nfe=event.nfe)
            bar.update(event.step - bar.n)

        result = generate(model, params, callback=progress, limits=limits)
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(result.images[k], "png", result.metadata(k)))
        if not args.quiet:
            print(f"{path}  seed={result.seeds[k]}  nfe={result.nfe[k]}")
    if result.trace and args.trace:
        print(json.dumps(result.trace))
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from diffsteer.guidance.registry import describe_policies, policy_schemas

    if args.json:
        print(json.dumps(policy_schemas(), indent=2))
        return 0
    for row in describe_policies():
        print(f"{row['name']}: {row['summary']}")
        for p in row["parameters"]:
            print(f"    {p['name']} = {json.dumps(p['default'])}    {p['help']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from diffsteer.service.app import create_app
    from diffsteer.service.settings import load_settings

    settings = load_settings(args.config, host=args.host, port=args.port, model=args.model, lora_dir=args.lora_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray:
        try:
            from diffsteer.service.ray_serve import run
        except ImportError as e:
            print(f"error: --ray needs Ray Serve ({e}); install it with: pip install 'diffsteer[ray]'", file=sys.stderr)
            return 2
        run(settings)
        return 0
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
        **settings.uvicorn_options(),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffsteer.guidance.schedulers import scheduler_names

    parser = argparse.ArgumentParser(prog="diffsteer", description="Steer text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument(
        "--policy",
        default=None,
        help="guidance policy spec, e.g. 'apg:scale=10,eta=0' (see `diffsteer "
        "policies`); default: the model's recommended policy (its diffsteer.json), else cfg",
    )
    gen.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's recommended, else 30)"
    )
    gen.add_argument(
        "--scheduler",
        default="default",
        help=f"one of: {', '.join(scheduler_names())} (flow-matching models, SD3/FLUX/Qwen-Image: "
        f"{', '.join(scheduler_names('flow'))})",
    )
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image (random when absent)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--size", default=None, help="WxH, multiples of 8 (default: the model's native size)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    gen.add_argument(
        "--distilled-guidance",
        type=float,
        default=None,
        help="the guidance scale a guidance-distilled model (FLUX.1-dev) takes as an input (default 3.5); "
        "the policy's guidance is true CFG on top of it. Other models refuse it",
    )
    gen.add_argument(
        "--init-image", default=None, help="img2img: the image to start from (its size unless --size is given)"
    )
    gen.add_argument(
        "--strength", type=float, default=None, help="how much of the init image is noised away (default 0.8)"
    )
    gen.add_argument("--mask", default=None, help="inpainting mask image: white repaints, black keeps the init image")
    gen.add_argument("--mask-blur", type=int, default=None, help="Gaussian blur of the mask in pixels (default 0)")
    gen.add_argument("--model", default=None, help="diffusers folder, .safetensors file, hub id, or builtin:NAME")
    gen.add_argument("--model-config", default=None, help="diffusers config folder for single-file checkpoints")
    gen.add_argument(
        "--latent-evaluators",
        default=None,
        help="latent evaluators for dynamic_cfg's evaluator=latent/auto: a folder, or 'shipped' (the proving ground's)",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    gen.add_argument("--dtype", default=None, help="auto, fp32, fp16, bf16")
    gen.add_argument(
        "--fast-paths",
        default=None,
        help="UNet fast paths, comma-separated: compile, channels_last, cuda_graphs (see BENCHMARKS.md, "
        "section GPU suite and fast paths)",
    )
    gen.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="largest accepted width/height (default: the model's max_size, else 2048)",
    )
    gen.add_argument("-o", "--output", default="diffsteer.png", help="output PNG (several images: NAME-k.png)")
    gen.add_argument("--trace", action="store_true", help="print the policy's trace as JSON")
    gen.add_argument("-q", "--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)

    pol = sub.add_parser("policies", help="list guidance policies with their parameters and defaults")
    pol.add_argument("--json", action="store_true", help="print the JSON schemas")
    pol.set_defaults(func=cmd_policies)
    srv = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)")
    srv.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    srv.add_argument(
        "--model", default=None, help="default model: diffusers folder, .safetensors file, hub id, or builtin:NAME"
    )
    srv.add_argument("--lora-dir", default=None, help="folder of LoRA adapters a request may name (setting lora_dir)")
    srv.add_argument("--config", default=None, help="YAML or JSON settings file (environment DIFFSTEER_* overrides it)")
    srv.add_argument(
        "--ray",
        action="store_true",
        help="serve replicas of the app on Ray Serve (settings' `ray` section: replicas, GPUs, autoscaling)",
    )
    srv.set_defaults(func=cmd_serve)

    from diffsteer.evaluation.cli import add_ab_parser  # `diffsteer ab`: A/B evaluation (evaluation/ab.py)

    add_ab_parser(sub)
    from diffsteer.training.cli import add_train_parser  # `diffsteer train METHOD`: the one dispatch into training/

    add_train_parser(sub)
    from diffsteer.training.pairs import add_data_parser  # `diffsteer data pairs`: preference data for train dpo/smpo

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InvalidInput as e:
        print(f"diffsteer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsteer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
