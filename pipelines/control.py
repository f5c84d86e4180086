"""Control-image generation: a text-to-image pipeline plus control adapters of three kinds, chosen by the file.

* ``easycontrol`` (``control.easycontrol``): condition tokens + condition-only LoRA, K/V cached;
* ``controlnet`` (``control.controlnet_transformer``): PixArt-δ's ControlNet-Transformer, copied blocks whose outputs
  are added to the base blocks;
* ``relactrl`` (``control.relactrl``): RelaCtrl's relevance-placed control blocks with the shuffle mixer.

    from pipelines import load_pipeline
    pipe = load_pipeline("emoji-t2i-control")                       # a directory with controls/*.safetensors
    out = pipe("red apple", control_image="apple.png", control_adapter="canny", preprocessor="canny", seed=0)
    out.images[0], out.control_images[0]                            # the image and the map it followed

    out = pipe("dog face", controls=[                               # several conditions, each with its strength
        ControlInput("edges.png", "canny", 1.0),
        ControlInput("photo.png", "inpaint", 0.8, preprocessor="inpaint", preprocessor_params={"mask": "m.png"}),
    ])

``ControlTextToImagePipeline`` subclasses :class:`~pipelines.text_to_image.TextToImagePipeline` and leaves its
sampling untouched: the condition enters through the transformer's attention processors, so the shared sampler
loop, CFG, callbacks, interruption, schedulers and records all stay those of the base class. A call without any
control is exactly a text-to-image call (same images for the same seed).

A control image goes through: any image source -> centre crop to the output's aspect ratio (so the map is not
distorted; EasyControl's position interpolation then spreads it over the whole canvas) -> resize to the control size
(EasyControl: the adapter's recorded training size by default; ControlNet-Transformer and RelaCtrl: the
generation's width x height, as their residuals are added token by token) -> the named preprocessor
(``control.preprocessors``; ``None``: the image already is a control map, ``"auto"``: the adapter's recorded
preprocessor) -> VAE latents (or pixels for pixel-space models). Conditions apply to every image of the call;
per-image controls are separate calls.

Adapters are registered by name: the pipeline directory's ``controls/*.safetensors`` are registered when it is
loaded, :meth:`register_control_adapter` adds more; Python callers may also pass a file path. The UI and the batch
CLI only ever pass names; the kind is read from the file's ``adapter_type``, so every caller gets every kind.
Adapters of different kinds compose in one call (EasyControl conditions as extra tokens, the others as residuals).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .base import ImageGenerationOutput, check_size, resolves_device_once
from .errors import InputError, ModelLoadError
from .text_to_image import TextToImagePipeline

CONTROLS_DIR = "controls"
MAX_CONDITIONS = 4
MAX_STRENGTH = 4.0


@dataclass
class ControlInput:
    """One condition of a call: an image (path, PIL, array, bytes), an adapter name (or file) and a strength."""

    image: Any
    adapter: str
    strength: float = 1.0
    preprocessor: str | None = None  # None/"none": the image is the map; "auto": the adapter's recorded one
    preprocessor_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ControlGenerationOutput(ImageGenerationOutput):
    """:class:`ImageGenerationOutput` plus the control maps actually fed to the model (one per condition)."""

    control_images: list[PIL.Image.Image] = field(default_factory=list)


def fit_to_aspect(image: PIL.Image.Image, width: int, height: int) -> tuple[int, int, int, int]:
    """The centred crop box of ``image`` with the aspect ratio ``width:height``."""
    w, h = image.size
    target = width / height
    if w / h > target:
        cw, ch = max(1, min(w, round(h * target))), h
    else:
        cw, ch = w, max(1, min(h, round(w / target)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def make_control_map(
    image: Any,
    size: int | tuple[int, int],
    width: int,
    height: int,
    preprocessor: str | None = None,
    params: dict[str, Any] | None = None,
) -> PIL.Image.Image:
    """Any image -> the control map of a ``width`` x ``height`` generation: centre crop to that aspect, resize to
    ``size`` x ``size`` (the fixed condition size; positions are interpolated later) or to ``size = (w, h)``
    (ControlNet-Transformer / RelaCtrl: the generation's size), then the preprocessor.

    An inpainting ``mask`` image of the same size as ``image`` is cropped with it; masks of other sizes are resized.
    """
    from control.preprocessors import load_control_image, run_preprocessor

    img = load_control_image(image)
    box = fit_to_aspect(img, width, height)
    img_size = img.size
    target = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    img = img.crop(box).resize(target, PIL.Image.Resampling.LANCZOS)
    params = dict(params or {})
    mask = params.get("mask")
    if mask is not None and not isinstance(mask, (str, np.ndarray)):  # arrays: resized by the preprocessor
        m = mask if isinstance(mask, PIL.Image.Image) else load_control_image(mask, "inpainting mask")
        if m.size == img_size:
            m = m.crop(box)
        params["mask"] = m.resize(target, PIL.Image.Resampling.NEAREST)
    return run_preprocessor(preprocessor, img, **params)


def _strength(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise InputError(f"The strength of {what} must be a number, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The strength of {what} must be a number, got {value!r}.") from None
    if not math.isfinite(v) or abs(v) > MAX_STRENGTH:
        raise InputError(
            f"The strength of {what} must be between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}, got {value!r}."
        )
    return v


def _image_digest(image: PIL.Image.Image) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(image).tobytes() + repr(image.size).encode()).hexdigest()[:10]


def adapter_kind(metadata: dict[str, str]) -> str:
    """An adapter file's kind from its metadata: ``easycontrol`` (also files without ``adapter_type``),
    ``controlnet`` or ``relactrl``."""
    kind = metadata.get("adapter_type") or "easycontrol"
    return kind


def control_map_size(kind: str, recorded: int | None, width: int, height: int, default: int) -> int | tuple[int, int]:
    """The size a control map is made at: (width, height) for the residual kinds, else the recorded/default size."""
    from control.controlnet_transformer import RESIDUAL_KINDS

    if kind in RESIDUAL_KINDS:
        return (int(width), int(height))
    return int(recorded or default)


class ControlTextToImagePipeline(TextToImagePipeline):
    """Text-to-image with control images (EasyControl, ControlNet-Transformer, RelaCtrl adapters; see the module
    docstring). Kind ``"control"``."""

    kind = "control"

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        transformer: Any,
        scheduler: Any,
        vae: Any = None,
        max_sequence_length: int = 120,
        use_resolution_binning: bool = False,
        control_size: int | None = None,
        control_cfg: bool = False,
    ):
        super().__init__(
            tokenizer, text_encoder, transformer, scheduler, vae, max_sequence_length, use_resolution_binning
        )
        self.register_to_config(control_size=control_size, control_cfg=bool(control_cfg))
        self._control_files: dict[str, Path] = {}
        self._control_meta: dict[str, dict[str, str]] = {}

    # ---- construction and saving --------------------------------------------------------------------
    @classmethod
    def from_text_pipeline(
        cls, pipe: TextToImagePipeline, control_size: int | None = None, control_cfg: bool = False
    ) -> ControlTextToImagePipeline:
        """Wrap a loaded text-to-image pipeline's components (shared, not copied) as a control pipeline."""
        c = pipe.components
        new = cls(
            tokenizer=c["tokenizer"],
            text_encoder=c["text_encoder"],
            transformer=c["transformer"],
            scheduler=c["scheduler"],
            vae=c.get("vae"),
            max_sequence_length=int(pipe.config.get("max_sequence_length", 120)),
            use_resolution_binning=bool(pipe.config.get("use_resolution_binning", False)),
            control_size=control_size,
            control_cfg=control_cfg,
        )
        for attr in ("model_name", "model_hash"):
            if getattr(pipe, attr, None) is not None:
                setattr(new, attr, getattr(pipe, attr))
        return new

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> ControlTextToImagePipeline:
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        controls = Path(pretrained_model_name_or_path) / CONTROLS_DIR
        if controls.is_dir():
            pipe.register_control_adapters(controls)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save the pipeline without adapter weights in the transformer, and the registered adapters in controls/."""
        from control.controlnet_transformer import BlockControl
        from control.easycontrol import EasyControl

        ec = EasyControl.of(self.transformer)
        bc = BlockControl.of(self.transformer)
        with contextlib.ExitStack() as stack:
            if ec is not None:
                stack.enter_context(ec.detached())
            if bc is not None:
                stack.enter_context(bc.detached())
            super().save_pretrained(save_directory, **kwargs)
        if self._control_files:
            target = Path(save_directory) / CONTROLS_DIR
            target.mkdir(parents=True, exist_ok=True)
            for name, path in self._control_files.items():
                dest = target / f"{name}.safetensors"
                if Path(path).resolve() != dest.resolve():
                    shutil.copy2(path, dest)

    # ---- adapters -----------------------------------------------------------------------------------
    def register_control_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Make an adapter file available under ``name`` (default: the file stem), after checking it fits."""
        from control.controlnet_transformer import RESIDUAL_KINDS, file_adapter_type
        from control.easycontrol import ControlAdapterError, check_adapter_file
        from pipelines.lora import LoraLoadError, read_lora

        if file_adapter_type(path) in RESIDUAL_KINDS:
            return self._register_residual_adapter(path, name)
        try:
            lora = read_lora(path)
        except LoraLoadError as e:
            raise ControlAdapterError(str(e)) from None
        check_adapter_file(lora, self.transformer)
        name = name or lora.path.stem
        if not name or "." in name:
            raise ControlAdapterError(f"Control adapter name {name!r} must be non-empty and without dots.")
        self._control_files[name] = lora.path
        self._control_meta[name] = dict(lora.metadata)
        return name

    def _register_residual_adapter(self, path: str | Path, name: str | None) -> str:
        from control.controlnet_transformer import base_blocks, inner_dim, read_residual_adapter
        from control.easycontrol import ControlAdapterError

        file = read_residual_adapter(path)
        meta = file.metadata
        trained = f" It was trained on {meta['base_model']}." if meta.get("base_model") else ""
        dim, layers = inner_dim(self.transformer), len(base_blocks(self.transformer))
        if meta.get("base_inner_dim", str(dim)) != str(dim) or meta.get("base_num_layers", str(layers)) != str(layers):
            raise ControlAdapterError(
                f"Control adapter {file.path} is a {file.kind} adapter for a model of width "
                f"{meta.get('base_inner_dim')} with {meta.get('base_num_layers', '?')} blocks; this "
                f"{type(self.transformer).__name__} has width {dim} and {layers} blocks.{trained} Use an adapter "
                "trained on this base model."
            )
        name = name or file.path.stem
        if not name or "." in name:
            raise ControlAdapterError(f"Control adapter name {name!r} must be non-empty and without dots.")
        self._control_files[name] = file.path
        self._control_meta[name] = dict(meta)
        return name

    def register_control_adapters(self, directory: str | Path) -> list[str]:
        """Register every ``*.safetensors`` in ``directory``; a bad file is skipped with a warning."""
        from control.easycontrol import ControlAdapterError

        names = []
        for path in sorted(Path(directory).glob("*.safetensors")):
            try:
                names.append(self.register_control_adapter(path))
            except ControlAdapterError as e:
                warnings.warn(f"skipping control adapter {path.name}: {e}", stacklevel=2)
        return names

    def control_adapters(self) -> dict[str, dict[str, Any]]:
        """Registered adapters: name -> kind, preprocessor, control size, rank, alpha, base model, path."""
        out = {}
        for name, meta in self._control_meta.items():
            out[name] = {
                "kind": adapter_kind(meta),
                "preprocessor": meta.get("preprocessor") or None,
                "control_size": int(meta["control_size"]) if str(meta.get("control_size", "")).isdigit() else None,
                "rank": int(meta["rank"]) if str(meta.get("rank", "")).isdigit() else None,
                "alpha": meta.get("alpha"),
                "base_model": meta.get("base_model"),
                "base_model_hash": meta.get("base_model_hash"),
                "path": str(self._control_files[name]),
            }
        return out

    def _resolve_adapter(self, adapter: Any) -> str:
        if not isinstance(adapter, (str, Path)) or not str(adapter).strip():
            raise InputError(f"A control needs an adapter name; got {adapter!r}.")
        key = str(adapter).strip()
        if key in self._control_files:
            return key
        from control.controlnet_transformer import BlockControl
        from control.easycontrol import EasyControl

        live = EasyControl.of(self.transformer)
        if live is not None and key in live.adapters and live.adapters[key].path is None:
            return key  # an adapter created in memory (e.g. the one being trained)
        block = BlockControl.of(self.transformer)
        if block is not None and key in block.info and block.info[key].path is None:
            return key
        path = Path(key).expanduser()
        if path.suffix == ".safetensors" and path.is_file():
            stem = path.stem
            if stem in self._control_files and Path(self._control_files[stem]).resolve() == path.resolve():
                return stem
            name, n = stem, 2
            while name in self._control_files:
                name, n = f"{stem}_{n}", n + 1
            return self.register_control_adapter(path, name)
        known = ", ".join(self._control_files) or "none registered"
        raise InputError(f"Unknown control adapter {key!r}. Available: {known}.")

    def load_control_adapter(self, adapter: str | Path) -> Any:
        """Load a registered adapter (by name or path) into the transformer; returns its ``AdapterInfo`` (or
        ``ResidualAdapterInfo`` for the ControlNet-Transformer / RelaCtrl kinds; both have ``kind``-independent
        ``name``, ``hash``, ``preprocessor``, ``control_size`` and ``position_bias``)."""
        from control.controlnet_transformer import RESIDUAL_KINDS, BlockControl
        from control.easycontrol import EasyControl

        name = self._resolve_adapter(adapter)
        block = BlockControl.of(self.transformer)
        if name not in self._control_files and block is not None and name in block.info:
            return block.info[name]
        if adapter_kind(self._control_meta.get(name, {})) in RESIDUAL_KINDS:
            block = BlockControl.attach(self.transformer)
            path = self._control_files[name]
            info = block.info.get(name)
            if info is None or info.path != str(path):
                info = block.load_adapter(path, name, base_hash=getattr(self, "model_hash", None))
            return info
        ec = EasyControl.attach(self.transformer)
        if name not in self._control_files:
            return ec.adapters[name]
        path = self._control_files[name]
        info = ec.adapters.get(name)
        if info is None or info.path != str(path):
            info = ec.load_adapter(path, name, base_hash=getattr(self, "model_hash", None))
        return info

    def unload_control_adapters(self) -> None:
        """Remove every control adapter from the transformer (registered names stay available)."""
        from control.controlnet_transformer import BlockControl
        from control.easycontrol import EasyControl

        ec = EasyControl.of(self.transformer)
        if ec is not None:
            ec.detach()
        bc = BlockControl.of(self.transformer)
        if bc is not None:
            bc.detach()

    # ---- control images -----------------------------------------------------------------------------
    def control_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def prepare_control_image(
        self,
        image: Any,
        size: int | tuple[int, int],
        width: int,
        height: int,
        preprocessor: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> PIL.Image.Image:
        """:func:`make_control_map` (the map the model sees, also what the UI previews)."""
        return make_control_map(image, size, width, height, preprocessor, params)

    def encode_control(self, control_map: PIL.Image.Image) -> torch.Tensor:
        """A control map -> the model's input space: pixels in [-1, 1] or VAE latents (mean, scaled)."""
        arr = np.asarray(control_map.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self._execution_device)
        vae = getattr(self, "vae", None)
        if vae is None:
            return x.to(self.transformer.dtype)
        z = vae.encode(x.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(self.transformer.dtype)

    def _specs(
        self,
        controls: Sequence[Any] | None,
        control_image: Any,
        control_adapter: Any,
        control_strength: Any,
        preprocessor: str | None,
    ) -> list[ControlInput]:
        specs: list[ControlInput] = []
        if control_image is not None or control_adapter is not None:
            if control_image is None or control_adapter is None:
                raise InputError("Pass both control_image and control_adapter (or use controls=[...]).")
            specs.append(ControlInput(control_image, control_adapter, control_strength, preprocessor))
        for item in controls or []:
            if isinstance(item, ControlInput):
                specs.append(item)
            elif isinstance(item, dict):
                unknown = set(item) - {"image", "adapter", "strength", "preprocessor", "preprocessor_params"}
                if unknown or "image" not in item or "adapter" not in item:
                    raise InputError(
                        "Each control must have 'image' and 'adapter' (and optionally 'strength', 'preprocessor', "
                        f"'preprocessor_params'); got keys {sorted(item)}."
                    )
                specs.append(ControlInput(**item))
            else:
                raise InputError(f"Each control must be a ControlInput or a dict, got {type(item).__name__}.")
        if len(specs) > MAX_CONDITIONS:
            raise InputError(f"{len(specs)} controls were given; at most {MAX_CONDITIONS} are supported per call.")
        for i, spec in enumerate(specs):
            spec.strength = _strength(spec.strength, f"control {i + 1}")
        return specs

    # ---- the call -----------------------------------------------------------------------------------
    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = "",
        *args: Any,
        controls: Sequence[ControlInput | dict] | None = None,
        control_image: Any = None,
        control_adapter: str | Path | None = None,
        control_strength: float = 1.0,
        preprocessor: str | None = None,
        control_size: int | None = None,
        use_kv_cache: bool = True,
        control_cfg: bool | None = None,
        **kwargs: Any,
    ) -> ControlGenerationOutput | tuple:
        """Generate ``prompt`` following the controls; every argument of ``TextToImagePipeline.__call__`` applies.

        A condition with strength 0 is left out, so it gives exactly the images without it (EasyControl itself
        would keep its tokens, merely without the adapter). ``control_size`` overrides the condition resolution in
        pixels (default: the adapter's training size, else
        the pipeline's ``control_size``, else the model's default size) for EasyControl adapters; ControlNet-Transformer
        and RelaCtrl maps always have the generation's size. ``use_kv_cache=False`` recomputes the
        conditions' keys/values at every step (same images, slower; for measurements). ``control_cfg=True`` applies
        the conditions to the conditional half of the classifier-free-guidance batch only (diffusers ControlNet's
        guess mode), so the guidance scale amplifies the control as it does the prompt; ``None``: the pipeline's
        ``control_cfg`` config (False, EasyControl's behaviour, unless the model directory says otherwise).
        """
        from control.controlnet_transformer import RESIDUAL_KINDS, BlockControl, ResidualCondition
        from control.easycontrol import Condition, EasyControl

        if args:
            raise InputError("Pass the text-to-image arguments after the prompts by name (e.g. seed=0).")
        specs = self._specs(controls, control_image, control_adapter, control_strength, preprocessor)
        return_dict = kwargs.pop("return_dict", True)
        if not specs:
            out = super().__call__(prompt, negative_prompt, return_dict=True, **kwargs)
            result = ControlGenerationOutput(out.images, out.seeds, out.records, out.interrupted, [])
            return result if return_dict else (result.images,)
        height = kwargs.get("height") or self.default_size()
        width = kwargs.get("width") or self.default_size()
        check_size(height, width, self.control_multiple())
        conditions, residuals, maps, described = [], [], [], []
        for spec in specs:
            info = self.load_control_adapter(spec.adapter)
            kind = getattr(info, "kind", "easycontrol")
            pre = info.preprocessor if spec.preprocessor == "auto" else spec.preprocessor
            if kind in RESIDUAL_KINDS:
                size: Any = (width, height)  # added token by token: the map has the generation's size
                recorded: Any = int(width) if width == height else [int(width), int(height)]
            else:
                size = control_size or info.control_size or self.config.get("control_size") or self.default_size()
                try:
                    check_size(int(size), int(size), self.control_multiple())
                except (InputError, TypeError, ValueError) as e:
                    raise InputError(f"control_size: {e}") from None
                size = recorded = int(size)
            cmap = self.prepare_control_image(spec.image, size, width, height, pre, spec.preprocessor_params)
            maps.append(cmap)
            if spec.strength != 0.0:  # strength 0 switches the condition off (as LoRA weight 0 does)
                if kind in RESIDUAL_KINDS:
                    residuals.append(ResidualCondition(self.encode_control(cmap), info.name, spec.strength))
                else:
                    latents = self.encode_control(cmap)
                    conditions.append(Condition(latents, info.name, spec.strength, info.position_bias))
            described.append(
                {
                    "adapter": info.name,
                    "adapter_kind": kind,
                    "adapter_hash": info.hash,
                    "strength": spec.strength,
                    "preprocessor": pre or "none",
                    "control_size": recorded,
                    "position_bias": info.position_bias,
                    "control_image_hash": _image_digest(cmap),
                }
            )
        guided = bool(self.config.get("control_cfg", False) if control_cfg is None else control_cfg)
        ec = EasyControl.attach(self.transformer) if conditions else EasyControl.of(self.transformer)
        bc = BlockControl.of(self.transformer)
        if ec is not None:
            ec.set_conditions(conditions, use_cache=use_kv_cache)
            ec.state.conditional_half_only = guided
        if bc is not None:
            bc.set_conditions(residuals, conditional_half_only=guided)
        try:
            out = super().__call__(prompt, negative_prompt, return_dict=True, **kwargs)
        finally:
            if ec is not None:
                ec.clear_conditions()
                ec.state.conditional_half_only = False
            if bc is not None:
                bc.clear_conditions()
        summary = ", ".join(f"{d['adapter']} {d['strength']:g}" for d in described)
        for record in out.records:
            record.extra["Controls"] = summary
            record.extra["_controls"] = [dict(d) for d in described]
            record.extra["_kv_cache"] = bool(use_kv_cache)
            record.extra["control_cfg"] = guided
        result = ControlGenerationOutput(out.images, out.seeds, out.records, out.interrupted, maps)
        return result if return_dict else (result.images,)


def check_control_pipeline(pipe: Any) -> ControlTextToImagePipeline:
    """Any loaded text-to-image pipeline as a control pipeline (the same components), for callers with a plain one."""
    if isinstance(pipe, ControlTextToImagePipeline):
        return pipe
    if isinstance(pipe, TextToImagePipeline):
        return ControlTextToImagePipeline.from_text_pipeline(pipe)
    raise ModelLoadError(f"Control needs a text-to-image model; {type(pipe).__name__} is not one.")


def build_control_directory(
    base: str | Path,
    adapters: Sequence[str | Path],
    out: str | Path,
    control_size: int | None = None,
    control_cfg: bool = False,
) -> Path:
    """Save ``base`` (a text-to-image model) with ``adapters`` as a control pipeline directory (kind "control").

    Each adapter's run config (``config.yaml`` next to it, as ``training.train_control`` writes) is copied as
    ``controls/<name>.training.yaml`` so the directory says how to retrain it.
    """
    from .loading import load_pipeline

    pipe = check_control_pipeline(load_pipeline(base))
    pipe.register_to_config(control_size=control_size, control_cfg=bool(control_cfg))
    for path in adapters:
        pipe.register_control_adapter(path)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for path in adapters:
        run_config = Path(path).parent / "config.yaml"
        if run_config.is_file():
            shutil.copy2(run_config, tmp / CONTROLS_DIR / f"{Path(path).stem}.training.yaml")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.control --base MODEL --adapter A.safetensors [--adapter ...] --out DIR``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=build_control_directory.__doc__)
    parser.add_argument("--base", required=True, help="text-to-image model: catalog name or pipeline directory")
    parser.add_argument("--adapter", action="append", required=True, help="a control adapter file (repeatable)")
    parser.add_argument("--out", required=True, help="output pipeline directory (replaced)")
    parser.add_argument("--control-size", type=int, help="default condition size in pixels")
    parser.add_argument(
        "--control-cfg", action="store_true", help="default to conditions in the conditional CFG half only"
    )
    args = parser.parse_args(argv)
    try:
        path = build_control_directory(args.base, args.adapter, args.out, args.control_size, args.control_cfg)
    except (InputError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved control pipeline to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
