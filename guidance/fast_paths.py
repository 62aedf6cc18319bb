"""Optional fast paths for the UNet: torch.compile, channels-last memory format, CUDA graphs.

Every fast path is applied to the UNet module in place, so every caller (the sampler's ``Denoiser``, the
service's device worker, a diffusers pipeline built over the same modules) uses it without knowing:

- ``channels_last``: the UNet's weights (and so its convolutions' outputs) in NHWC memory format. Changes
  numerics at rounding level (other convolution kernels): off by default.
- ``compile``: ``torch.compile`` of the UNet's forward (``compile_mode``: ``default``, ``reduce-overhead``,
  ``max-autotune``, ``max-autotune-no-cudagraphs``). Changes numerics at rounding level (fused kernels):
  off by default. The first call of each new shape compiles (tens of seconds; on CPU it needs a C++
  compiler); a LoRA adapter set that changes the module structure recompiles.
- ``cuda_graphs``: each distinct input signature (shapes, dtypes, devices of every tensor argument) is
  captured once into a CUDA graph and replayed; inputs are copied into the graph's static buffers and the
  output is copied out, so callers never share a buffer. The kernels are the ones eager mode runs, so
  results equal eager results. It only engages where replay is exact and safe (:func:`graph_guard`): CUDA
  tensors, no autograd, the module in eval mode, no LoRA/peft adapters loaded (their scaling is Python state a
  graph would freeze) and only the UNet arguments the sampler passes. Everything else runs eagerly. At most
  ``max_graphs`` signatures keep a graph (least recently used dropped): each holds its own memory pool.

Bucketing of batched requests by shape is not here: the service's device worker only ever concatenates UNet
calls whose latent and condition shapes, dtype, device, UNet and LoRA set agree (``diffsteer.service.device``,
``_Work.group``), so every shared forward pass already has one fixed shape, which is what lets compiled
kernels and captured graphs be reused across batches.

Per-request guidance policies never reach into the UNet: they choose which (condition, image) rows the
``Denoiser`` batches, so a policy changes the *shape* of a call (a new graph/compiled specialisation), never
what a captured graph computes.

Settings: ``FastPaths.parse("compile,channels_last")`` from the CLI (``--fast-paths``), the service
(``fast_paths`` / ``DIFFSTEER_FAST_PATHS``) and ``diffsteer.guidance.models.load_model(fast_paths=...)``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffsteer.guidance.errors import InvalidInput

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FLAGS = ("compile", "channels_last", "cuda_graphs")
_ATTR = "_diffsteer_fast_forward"


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths a model's UNet uses (all off: plain eager PyTorch)."""

    compile: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces without generating code (tests)
    max_graphs: int = 8

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise InvalidInput(
                "fast_paths", f"unknown compile mode {self.compile_mode!r}; accepted: {', '.join(COMPILE_MODES)}"
            )
        if self.max_graphs < 1:
            raise InvalidInput("fast_paths", f"max_graphs must be ≥ 1, got {self.max_graphs}")
        if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise InvalidInput(
                "fast_paths",
                f"unknown compile backend {self.compile_backend!r}; accepted: "
                f"{', '.join(torch._dynamo.list_backends())}",
            )
        if self.cuda_graphs and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise InvalidInput(
                "fast_paths",
                f"compile_mode={self.compile_mode} captures CUDA graphs itself; "
                "use it without cuda_graphs, or compile_mode=default with cuda_graphs",
            )

    @property
    def any(self) -> bool:
        return self.compile or self.channels_last or self.cuda_graphs

    @classmethod
    def parse(cls, spec: str | FastPaths | None, field: str = "fast_paths") -> FastPaths:
        """``"compile,channels_last,cuda_graphs,compile_mode=max-autotune,max_graphs=4"``; "" / "none": all off."""
        if isinstance(spec, FastPaths):
            return spec
        values: dict[str, Any] = {}
        for item in (spec or "").replace(" ", "").split(","):
            if item in ("", "none", "off"):
                continue
            key, eq, value = item.partition("=")
            key = key.replace("-", "_")
            if not eq and key in FLAGS:
                values[key] = True
            elif eq and key in ("compile_mode", "compile_backend"):
                values[key] = value
            elif eq and key == "max_graphs" and value.isdigit():
                values[key] = int(value)
            else:
                raise InvalidInput(
                    field,
                    f"unknown item {item!r}; accepted: a comma-separated list of {', '.join(FLAGS)}, "
                    f"compile_mode=<{'|'.join(COMPILE_MODES)}>, compile_backend=NAME, max_graphs=N, or none",
                )
        try:
            return cls(**values)
        except InvalidInput as e:
            raise InvalidInput(field, e.reason) from None

    def spec(self) -> str:
        parts = [f for f in FLAGS if getattr(self, f)]
        if self.compile and self.compile_mode != "default":
            parts.append(f"compile_mode={self.compile_mode}")
        if self.compile and self.compile_backend != "inductor":
            parts.append(f"compile_backend={self.compile_backend}")
        if self.cuda_graphs and self.max_graphs != FastPaths.max_graphs:
            parts.append(f"max_graphs={self.max_graphs}")
        return ",".join(parts) or "none"


def apply_fast_paths(unet: torch.nn.Module, paths: FastPaths | str | None) -> FastPaths:
    """Switch ``unet`` to ``paths`` in place (first removing any fast path applied before); returns them."""
    paths = FastPaths.parse(paths)
    remove_fast_paths(unet)
    if paths.channels_last:
        unet.to(memory_format=torch.channels_last)
    if paths.compile or paths.cuda_graphs:
        setattr(unet, _ATTR, FastForward(unet, paths))
        unet.forward = getattr(unet, _ATTR)  # instance attribute: nn.Module.__call__ now runs it
    return paths


def remove_fast_paths(unet: torch.nn.Module) -> None:
    """Back to eager, contiguous (NCHW) weights; drops compiled code and captured graphs."""
    if _ATTR in unet.__dict__:
        del unet.__dict__[_ATTR]
    if "forward" in unet.__dict__:
        del unet.__dict__["forward"]
    unet.to(memory_format=torch.contiguous_format)


def fast_forward(unet: torch.nn.Module) -> FastForward | None:
    """The fast forward installed on ``unet`` (for its counters), or None."""
    return unet.__dict__.get(_ATTR)


# -- CUDA graphs ---------------------------------------------------------------------------------------------

SAMPLER_KWARGS = frozenset(
    {
        "encoder_hidden_states",
        "added_cond_kwargs",
        "return_dict",
        "timestep_cond",
        "cross_attention_kwargs",
        "attention_mask",
        "encoder_attention_mask",
    }
)
# Arguments diffusers pipelines pass as None; any non-None value other than these three sends the call eager.
GRAPHABLE_KWARGS = frozenset({"encoder_hidden_states", "added_cond_kwargs", "return_dict"})


def has_adapters(unet: torch.nn.Module) -> bool:
    """Whether peft/LoRA adapters are loaded into ``unet`` (diffusers' flag, or any peft layer)."""
    if getattr(unet, "_hf_peft_config_loaded", False) or getattr(unet, "peft_config", None):
        return True
    return False


def graph_guard(unet: torch.nn.Module, sample: Any, kwargs: dict[str, Any], *, require_cuda: bool = True) -> str | None:
    """Why this call must run eagerly instead of through a CUDA graph (None: it may use one)."""
    if not isinstance(sample, torch.Tensor):
        return "sample is not a tensor"
    if require_cuda and sample.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.is_grad_enabled() and (sample.requires_grad or any(p.requires_grad for p in unet.parameters())):
        return "autograd is recording"
    if unet.training:
        return "module in training mode"
    if has_adapters(unet):
        return "LoRA/peft adapters loaded"
    extra = [k for k, v in kwargs.items() if v is not None and k not in GRAPHABLE_KWARGS]
    if extra:
        return f"unsupported arguments {sorted(extra)}"
    if sample.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "already capturing"
    return None


def _flatten(value: Any, out: list[torch.Tensor], signature: list[Any]) -> None:
    """Tensors of a (nested dict/tuple) argument in order, and a hashable description of its structure."""
    if isinstance(value, torch.Tensor):
        out.append(value)
        signature.append(
            (
                "T",
                tuple(value.shape),
                value.dtype,
                str(value.device),
                value.is_contiguous(memory_format=torch.channels_last),
            )
        )
    elif isinstance(value, dict):
        signature.append(("D", tuple(sorted(value))))
        for k in sorted(value):
            _flatten(value[k], out, signature)
    elif isinstance(value, (list, tuple)):
        signature.append(("L", len(value)))
        for v in value:
            _flatten(v, out, signature)
    else:
        signature.append(("V", value))


def _rebuild(value: Any, tensors: collections.abc.Iterator[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, dict):
        return {k: _rebuild(value[k], tensors) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


def call_signature(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list[torch.Tensor]]:
    """The graph cache key of a call (structure, shapes, dtypes, devices, plain values) and its tensors."""
    tensors: list[torch.Tensor] = []
    signature: list[Any] = []
    _flatten((args, {k: v for k, v in kwargs.items() if v is not None}), tensors, signature)
    return tuple(signature), tensors


@dataclass
class _Graph:
    graph: Any
    static_inputs: list[torch.Tensor]
    static_output: Any


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    evictions: int = 0
    last_eager_reason: str | None = None


class FastForward:
    """The UNet forward with the compile and CUDA-graph fast paths (installed by :func:`apply_fast_paths`)."""

    def __init__(self, unet: torch.nn.Module, paths: FastPaths):
        self.paths = paths
        eager = type(unet).forward.__get__(unet)  # the class's forward bound to this module
        self.inner: Callable[..., Any] = _compile(eager, paths) if paths.compile else eager
        self._unet_ref = unet
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = GraphStats()

    def __call__(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.paths.cuda_graphs:
            return self.inner(sample, timestep, *args, **kwargs)
        reason = (
            "positional arguments beyond (sample, timestep)" if args else graph_guard(self._unet_ref, sample, kwargs)
        )
        if reason is None and not isinstance(timestep, torch.Tensor):
            timestep = torch.as_tensor(timestep, device=sample.device)
        if reason is None:
            return self._replay(sample, timestep, kwargs)
        self.stats.eager_calls += 1
        self.stats.last_eager_reason = reason
        return self.inner(sample, timestep, *args, **kwargs)

    def _replay(self, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        key, tensors = call_signature((sample, timestep), kwargs)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(sample, timestep, kwargs, tensors)
                self._graphs[key] = entry
                while len(self._graphs) > self.paths.max_graphs:
                    self._graphs.popitem(last=False)
                    self.stats.evictions += 1
            else:
                self._graphs.move_to_end(key)
            for static, value in zip(entry.static_inputs, tensors):
                static.copy_(value)
            entry.graph.replay()
            self.stats.replays += 1
            return _clone_output(entry.static_output)

    def _capture(
        self, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], tensors: list[torch.Tensor]
    ) -> _Graph:
        """Warm up on a side stream (lazy initialisation, compilation), then capture one call."""
        static_inputs = [t.detach().clone(memory_format=torch.preserve_format) for t in tensors]
        rebuilt = _rebuild(
            ((sample, timestep), {k: v for k, v in kwargs.items() if v is not None}), iter(static_inputs)
        )
        (s, t), kw = rebuilt
        side = torch.cuda.Stream(device=sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.inner(s, t, **kw)
        torch.cuda.current_stream(sample.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.inner(s, t, **kw)
        self.stats.captures += 1
        log.info("captured a CUDA graph for UNet inputs %s", tuple(sample.shape))
        return _Graph(graph, static_inputs, static_output)


def _compile(fn: Callable[..., Any], paths: FastPaths) -> Callable[..., Any]:
    if paths.compile_backend == "inductor":
        return torch.compile(fn, mode=paths.compile_mode)
    return torch.compile(fn, backend=paths.compile_backend)  # other backends take no mode


def _clone_output(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone_output(v) for v in value)
    if isinstance(value, list):
        return [_clone_output(v) for v in value]
    if dataclasses.is_dataclass(value) or hasattr(value, "to_tuple"):  # diffusers BaseOutput
        return type(value)(**{k: _clone_output(v) for k, v in value.items()})
    return value
