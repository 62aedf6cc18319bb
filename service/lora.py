"""LoRA adapters in diffusers format, loaded by name from a folder and applied per request.

Isolation: a request's adapters are a sorted tuple of (name, weight). The device worker runs every use of
the modules an adapter changes (the backbone, UNet or transformer, and the text encoders) on its one thread and
never mixes adapter sets in one batch; before each batch or task it calls :meth:`LoraControl.activate` with the
batch's set, which loads missing adapters (peft layers, through diffusers' ``load_lora_weights`` on a pipeline
sharing the model's modules), enables exactly those with their weights, or disables every adapter for a plain
request. So
concurrent requests with and without LoRA share one copy of the weights and never see each other's
adapters. A weight of 0 is dropped at validation, so such a request is a plain one (and batches with them).

Files: ``<lora_dir>/<name>.safetensors`` or ``<lora_dir>/<name>/pytorch_lora_weights.safetensors`` (what
``StableDiffusionPipeline.save_lora_weights`` writes, and the flow families' pipelines: ``FluxPipeline``,
``StableDiffusion3Pipeline``, ``QwenImagePipeline``... whose LoRAs change the transformer). Names are plain file
names; no paths. Each model loads adapters through its own family's pipeline; a LoRA made for another kind of
model (a UNet LoRA on FLUX.1, a transformer LoRA on SDXL: diffusers would load it into nothing, silently) is
refused with 422 naming ``lora.name``, as is one whose layers only partly match the model.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.models import DiffusionModel
from diffsteer.service.device import AdapterSet

log = logging.getLogger("diffsteer.service.lora")

LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


BACKBONE_PREFIXES = ("unet", "transformer")  # diffusers-format LoRA keys start with the component's name


def lora_keys(path: Path) -> list[str] | None:
    """The tensor names of a LoRA file, read from its header (None when it is not a readable safetensors file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # not a safetensors file: diffusers' load reports it
        return None


def describe_target(model: str, title: str, backbone_key: str) -> str:
    return f"{model} ({title}, a {'UNet' if backbone_key == 'unet' else 'transformer'} model)"


def check_backbone(name: str, keys: list[str], backbone_key: str, model: str, field: str = "lora.name") -> None:
    """Refuse a diffusers-format LoRA (keys prefixed by their component) made for the other kind of backbone
    (UNet vs transformer), which diffusers would load into nothing without an error."""
    prefixes = {key.split(".", 1)[0] for key in keys}
    other = next((p for p in BACKBONE_PREFIXES if p in prefixes and p != backbone_key), None)
    if other is None or backbone_key in prefixes:
        return
    made_for = "a UNet model (SD 1.x/2.x, SDXL)" if other == "unet" else "a transformer model (SD3, FLUX.1, ...)"
    raise InvalidInput(field, f"LoRA {name!r} is for {made_for}: its layers are the {other}'s; {model} has none")


class LoraLibrary:
    """The adapters available in ``folder`` (None: LoRA disabled)."""

    def __init__(self, folder: Path | str | None):
        self.folder = Path(folder).expanduser().resolve() if folder is not None else None

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        found = set()
        for entry in self.folder.iterdir():
            if entry.suffix == ".safetensors" and self.inside(entry):
                found.add(entry.stem)
            elif entry.is_dir() and self.inside(entry / WEIGHTS_FILE):
                found.add(entry.name)
        return sorted(n for n in found if LORA_NAME.match(n))

    def inside(self, candidate: Path) -> bool:
        """Whether ``candidate`` is a file whose real path (symlinks followed) stays inside the LoRA folder."""
        resolved = candidate.resolve()
        return resolved.is_file() and self.folder in resolved.parents

    def path(self, name: str, field: str = "lora.name") -> Path:
        if self.folder is None:
            raise InvalidInput(field, "LoRA adapters are not enabled on this server (no lora_dir configured)")
        if not isinstance(name, str) or not LORA_NAME.match(name) or ".." in name:
            raise InvalidInput(field, f"invalid LoRA name {name!r}: letters, digits, '.', '_' and '-' only")
        for candidate in (self.folder / f"{name}.safetensors", self.folder / name / WEIGHTS_FILE):
            if self.inside(candidate):
                return candidate.resolve()
        available = self.names()
        listing = ", ".join(available) if available else "none"
        raise InvalidInput(field, f"unknown LoRA {name!r}; available: {listing}")

    def normalise(self, entries: list[Any], target: tuple[str, str] | None = None) -> AdapterSet:
        """Validate the request's ``lora`` list (objects with name and weight) into a sorted AdapterSet;
        ``target`` (the model's backbone key and description) refuses LoRAs made for the other kind of backbone
        before anything is queued."""
        seen: dict[str, float] = {}
        for i, entry in enumerate(entries):
            name, weight = entry.name, float(entry.weight)
            path = self.path(name, field=f"lora.{i}.name")
            keys = lora_keys(path) if target is not None and weight != 0.0 else None
            if keys is not None:
                check_backbone(name, keys, target[0], target[1], field=f"lora.{i}.name")
            if name in seen:
                raise InvalidInput(f"lora.{i}.name", f"LoRA {name!r} is given twice")
            seen[name] = weight
        return tuple(sorted((n, w) for n, w in seen.items() if w != 0.0))


class LoraControl:
    """Adapter state of one model; every method runs on the device worker thread only."""

    def __init__(self, model: DiffusionModel, library: LoraLibrary, max_loaded: int = 8):
        self.model = model
        self.library = library
        self.max_loaded = max_loaded
        self._pipe = None
        self._loaded: collections.OrderedDict[str, str] = collections.OrderedDict()  # name -> adapter name
        self._ids = itertools.count()
        self._failed: dict[str, tuple[tuple[float, int], str]] = {}  # name -> (file's mtime and size, message)
        self.active: AdapterSet = ()

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self.model.to_pipeline()
        return self._pipe

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def _ensure_loaded(self, name: str, keep: set[str]) -> str:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        path = self.library.path(name)
        stat = path.stat()
        version = (stat.st_mtime, stat.st_size)
        failed = self._failed.get(name)
        if failed is not None and failed[0] == version:  # the same file failed before: not loaded again
            raise InvalidInput("lora.name", failed[1])
        keys = lora_keys(path)  # None: unreadable, left to diffusers' own error
        if keys is not None:
            self._check_target(name, keys)
        adapter = f"lora{next(self._ids)}"
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        except Exception as e:  # diffusers/peft raise many types for bad files
            self._discard(adapter)
            log.warning("LoRA %s failed to load on %s: %s: %s", name, self.model.name, type(e).__name__, e)
            # the client learns which adapter and what kind of failure, not the server's paths or library internals
            message = f"cannot load LoRA {name!r}: not a LoRA in diffusers format that fits {self._describe_model()}"
            self._failed[name] = (version, message)
            raise InvalidInput("lora.name", message) from None
        self._check_loaded(name, adapter, keys or [])
        self._loaded[name] = adapter
        log.info("loaded LoRA %s as %s on %s", name, adapter, self.model.name)
        while len(self._loaded) > self.max_loaded:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            self.pipe.delete_adapters(self._loaded.pop(victim))
            log.info("unloaded LoRA %s", victim)
        return adapter

    def _describe_model(self) -> str:
        return describe_target(self.model.name, self.model.family.title, self.model.family.backbone_key)

    def _check_target(self, name: str, keys: list[str]) -> None:
        check_backbone(name, keys, self.model.family.backbone_key, self._describe_model())

    def _check_loaded(self, name: str, adapter: str, keys: list[str]) -> None:
        """Refuse (and unload) a LoRA that changed none of the model's modules, or only some of the backbone
        layers a diffusers-format file names: it was made for another model."""
        try:
            placed = {c for c, names in self.pipe.get_list_adapters().items() if adapter in names}
        except Exception:  # a pipeline without adapter bookkeeping: nothing to check against
            return
        problem = None
        if not placed:
            problem = "it changes none of the model's modules (no layer name matches)"
        else:
            own = self.model.family.backbone_key
            expected = {k.rsplit(".lora_A.", 1)[0] for k in keys if k.startswith(f"{own}.") and ".lora_A." in k}
            found = sum(
                1
                for module in self.model.backbone.modules()
                if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and adapter in module.lora_A
            )
            if expected and found < len(expected):
                problem = f"only {found} of its {len(expected)} {own} layers match this model's"
        if problem is not None:
            self._discard(adapter)
            raise InvalidInput(
                "lora.name",
                f"LoRA {name!r} does not fit {self._describe_model()}: {problem}; it was made for another model",
            )

    def _discard(self, adapter: str) -> None:
        """Remove whatever a failed load left of ``adapter``."""
        try:
            self.pipe.delete_adapters(adapter)
        except Exception:  # nothing was loaded under that name
            log.debug("nothing to remove of %s", adapter)

    def activate(self, adapters: AdapterSet) -> None:
        if not adapters:
            if self._loaded:
                self.pipe.disable_lora()
            self.active = ()
            return
        keep = {n for n, _ in adapters}
        names = [self._ensure_loaded(n, keep) for n, _ in adapters]
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[w for _, w in adapters])
        self.active = adapters
