"""UNet fast paths (guidance/fast_paths.py): each gives the eager results within a stated tolerance, engages
only where it is safe, and is reachable from the load path, the CLI and the service settings."""

from __future__ import annotations

import threading

import pytest
import torch

from diffsteer.guidance import fast_paths as fp
from diffsteer.guidance.denoiser import Condition, call_unet
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.fast_paths import (
    FastPaths,
    apply_fast_paths,
    call_signature,
    fast_forward,
    graph_guard,
    remove_fast_paths,
)
from diffsteer.guidance.tiny import tiny_unet
from diffsteer.service.device import DeviceExecutor, DeviceWorker

# fp32 on CPU: channels-last convolutions and traced graphs reassociate sums; 1e-5 is ~100 ulp of outputs ~1.
ATOL = 1e-5


@pytest.fixture
def unet():
    return tiny_unet(cross_dim=32, seed=0)


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(700.0), torch.randn(batch, 7, 32, generator=g))


def run(unet, x, t, c, **kw):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c, return_dict=False, **kw)[0]


def test_parse_round_trip_and_errors():
    paths = FastPaths.parse("compile, channels-last,cuda_graphs,max_graphs=3")
    assert (paths.compile, paths.channels_last, paths.cuda_graphs, paths.max_graphs) == (True, True, True, 3)
    assert FastPaths.parse(paths.spec()) == paths
    assert FastPaths.parse(None) == FastPaths.parse("none") == FastPaths() and not FastPaths().any
    with pytest.raises(InvalidInput, match="fast_paths: unknown item 'fastest'.*channels_last"):
        FastPaths.parse("fastest")
    with pytest.raises(InvalidInput, match="captures CUDA graphs itself"):
        FastPaths.parse("compile,cuda_graphs,compile_mode=reduce-overhead")
    with pytest.raises(InvalidInput, match="unknown compile mode"):
        FastPaths.parse("compile,compile_mode=fastest")


def test_service_settings_and_cli_reach_the_load_path(tmp_path):
    from diffsteer.service.cli import build_parser
    from diffsteer.service.engine import Engine
    from diffsteer.service.settings import load_settings

    settings = load_settings(fast_paths="channels-last")
    assert settings.fast_paths == "channels_last"
    assert Engine(settings).models._load_kwargs["fast_paths"] == "channels_last"
    with pytest.raises(InvalidInput, match="^fast_paths: unknown item"):
        load_settings(fast_paths="turbo")
    args = build_parser().parse_args(["generate", "x", "--fast-paths", "channels_last"])
    assert args.fast_paths == "channels_last"


def test_load_model_applies_fast_paths():
    from diffsteer.guidance.models import load_model

    model = load_model("builtin:tiny", device="cpu", fast_paths="channels_last")
    assert model.extra["fast_paths"].channels_last
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert "fast_paths" not in load_model("builtin:tiny", device="cpu").extra


def test_channels_last_equals_eager_and_removal_restores_it(unet):
    x, t, c = inputs()
    ref = run(unet, x, t, c)
    apply_fast_paths(unet, "channels_last")
    torch.testing.assert_close(run(unet, x, t, c), ref, atol=ATOL, rtol=0)
    remove_fast_paths(unet)
    assert torch.equal(run(unet, x, t, c), ref)


def test_channels_last_generation_equals_plain_generation():
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.sampler import generate

    request = {"prompt": "a red circle", "steps": 4, "seed": 3, "num_images": 2, "policy": "cfg:scale=4"}
    plain = generate(load_model("builtin:tiny", device="cpu"), request).pixels
    fast = generate(load_model("builtin:tiny", device="cpu", fast_paths="channels_last"), request).pixels
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)  # pixels in [0, 1], after 4 steps and the VAE


@pytest.mark.slow
def test_compiled_unet_equals_eager(unet):
    """The compile path traced by dynamo + AOTAutograd (the ``aot_eager`` backend: inductor's code generation
    needs minutes of C++ compilation on CPU, which the GPU suite and benchmarks/cpu_default_model.py measure)."""
    x, t, c = inputs()
    x2, t2, c2 = inputs(seed=1)  # same shapes, other values: no stale specialisation
    ref, ref2 = run(unet, x, t, c), run(unet, x2, t2, c2)
    apply_fast_paths(unet, "compile,compile_backend=aot_eager")
    assert fast_forward(unet).paths.compile
    torch.testing.assert_close(run(unet, x, t, c), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(unet, x2, t2, c2), ref2, atol=ATOL, rtol=0)
    remove_fast_paths(unet)
    assert fast_forward(unet) is None and "forward" not in unet.__dict__


def test_cuda_graph_path_runs_eagerly_off_cuda_and_says_why(unet):
    x, t, c = inputs()
    ref = run(unet, x, t, c)
    apply_fast_paths(unet, "cuda_graphs")
    assert torch.equal(run(unet, x, t, c), ref)  # the eager kernels themselves: bit-identical
    stats = fast_forward(unet).stats
    assert (stats.captures, stats.replays, stats.eager_calls) == (0, 0, 1)
    assert stats.last_eager_reason == "not a CUDA tensor"


def test_graph_guard_conditions(unet):
    x, _, c = inputs()
    kwargs = {"encoder_hidden_states": c, "return_dict": False}
    assert graph_guard(unet, x, kwargs) == "not a CUDA tensor"
    unet.requires_grad_(False)
    assert graph_guard(unet, x, kwargs, require_cuda=False) is None
    assert (
        graph_guard(unet, x, {**kwargs, "cross_attention_kwargs": {"scale": 0.5}}, require_cuda=False)
        == "unsupported arguments ['cross_attention_kwargs']"
    )
    assert (
        graph_guard(unet, x, {**kwargs, "cross_attention_kwargs": None, "timestep_cond": None}, require_cuda=False)
        is None
    )
    unet.requires_grad_(True)
    with torch.enable_grad():
        assert graph_guard(unet, x, kwargs, require_cuda=False) == "autograd is recording"
    with torch.no_grad():
        assert graph_guard(unet, x, kwargs, require_cuda=False) is None
    unet.requires_grad_(False)
    unet.train()
    assert graph_guard(unet, x, kwargs, require_cuda=False) == "module in training mode"
    unet.eval()
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with torch.no_grad():
        assert graph_guard(unet, x, kwargs, require_cuda=False) == "LoRA/peft adapters loaded"


def test_call_signature_keys_on_shapes_not_values():
    x, t, c = inputs()
    key, tensors = call_signature((x, t), {"encoder_hidden_states": c, "added_cond_kwargs": None, "return_dict": False})
    assert len(tensors) == 3
    same, _ = call_signature((x + 1, t * 0), {"encoder_hidden_states": -c, "return_dict": False})
    assert same == key
    other, _ = call_signature((x[:1], t), {"encoder_hidden_states": c[:1], "return_dict": False})
    sdxl, tensors = call_signature(
        (x, t),
        {
            "encoder_hidden_states": c,
            "return_dict": False,
            "added_cond_kwargs": {"text_embeds": c[:, 0], "time_ids": c[:, 0, :6]},
        },
    )
    assert len({key, other, sdxl}) == 3 and len(tensors) == 5


class _ReplayOnCPU:
    """Stands in for torch.cuda.CUDAGraph: replay recomputes from the static inputs into the static output."""

    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self):
        s, t, c = self.inputs
        self.output[0].copy_(self.fn(s, t, encoder_hidden_states=c, return_dict=False)[0])


def test_graph_cache_copies_inputs_in_clones_outputs_and_evicts(unet, monkeypatch):
    """The static-buffer logic of the CUDA-graph path, with replay simulated on CPU."""
    apply_fast_paths(unet, "cuda_graphs,max_graphs=2")
    forward = fast_forward(unet)

    def capture(sample, timestep, kwargs, tensors):
        static = [t.detach().clone() for t in tensors]
        output = forward.inner(static[0], static[1], encoder_hidden_states=static[2], return_dict=False)
        forward.stats.captures += 1
        return fp._Graph(_ReplayOnCPU(forward.inner, static, output), static, output)

    monkeypatch.setattr(forward, "_capture", capture)
    monkeypatch.setattr(
        fp, "graph_guard", lambda unet, sample, kwargs: graph_guard(unet, sample, kwargs, require_cuda=False)
    )
    outs, refs = [], []
    for seed, batch in [(0, 2), (1, 2), (2, 1), (3, 3), (4, 2)]:
        x, t, c = inputs(batch, seed)
        outs.append(run(unet, x, t, c))
        refs.append(type(unet).forward(unet, x, t, encoder_hidden_states=c, return_dict=False)[0])
    for got, want in zip(outs, refs):
        assert torch.equal(got, want)
    assert outs[0].data_ptr() != outs[1].data_ptr()  # each caller gets its own copy of the static output
    # batches 2, 2, 1, 3, 2 with room for two graphs: captures for 2, 1, 3 (evicts 2) and 2 again (evicts 1)
    assert (forward.stats.captures, forward.stats.replays, forward.stats.evictions) == (4, 5, 2)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA graphs need a CUDA device (the CPU tests above cover the guards and the buffer logic)",
)
def test_cuda_graph_replay_equals_eager_on_cuda():
    unet = tiny_unet(cross_dim=32, seed=0).cuda()
    x, t, c = (v.cuda() for v in inputs())
    ref = run(unet, x, t, c)
    apply_fast_paths(unet, "cuda_graphs")
    first = run(unet, x, t, c)
    x2, t2, c2 = (v.cuda() for v in inputs(seed=1))
    second = run(unet, x2, t2, c2)
    remove_fast_paths(unet)
    torch.testing.assert_close(first, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(second, run(unet, x2, t2, c2), atol=1e-6, rtol=0)


class _RowwiseUNet(torch.nn.Module):
    """out = x · t + condition mean per row, and the row counts of every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.batches: list[tuple[int, ...]] = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        self.batches.append(tuple(encoder_hidden_states.shape))
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x * t + encoder_hidden_states.mean(dim=(1, 2)).view(-1, *([1] * (x.ndim - 1))),)


def test_worker_buckets_by_condition_shape_and_dtype():
    """Bucketing by shape is the device worker's grouping: calls only share a forward pass when latent and
    condition shapes and the dtype agree, so each batch has one fixed shape (what compiled kernels and
    captured graphs are keyed on)."""
    unet = _RowwiseUNet()
    worker = DeviceWorker(batching=True, max_rows=16, window_s=0.5)
    calls = [
        ((4, 2, 2), 7, torch.float32),
        ((4, 2, 2), 7, torch.float32),
        ((4, 2, 2), 9, torch.float32),
        ((4, 2, 2), 7, torch.float64),
    ]
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def call(i, shape, tokens, dtype):
        x = torch.full((1, *shape), float(i + 1), dtype=dtype)
        cond = Condition(torch.full((1, tokens, 3), float(i), dtype=dtype))
        with worker.session(unet, (), shape):
            barrier.wait()
            results[i] = DeviceExecutor(worker, None).backbone_fn(call_unet, unet, x, torch.tensor(10.0), cond)

    threads = [threading.Thread(target=call, args=(i, *spec)) for i, spec in enumerate(calls)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
    finally:
        worker.close()
    for i, (shape, _, dtype) in enumerate(calls):
        assert torch.equal(results[i], torch.full((1, *shape), float(i + 1) * 10 + i, dtype=dtype))
    assert sorted(unet.batches) == [(1, 7, 3), (1, 9, 3), (2, 7, 3)]  # float64 and 9 tokens apart; the two alike shared
