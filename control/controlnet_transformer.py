"""PixArt-δ's ControlNet-Transformer (Chen et al. 2024) on PixArt-style DiTs, and the block-residual control both it
and RelaCtrl (``control.relactrl``) are built on.

    from control.controlnet_transformer import BlockControl, ControlNetTransformer, ResidualCondition
    bc = BlockControl.attach(transformer)                     # TextDiTModel or diffusers PixArtTransformer2DModel
    bc.add_adapter("canny", ControlNetTransformer.from_transformer(transformer, num_blocks=3))
    with bc.conditioned([ResidualCondition(latents, "canny", strength=1.0)]):
        eps = transformer(x, text, t).sample                  # control residuals are added inside the base model

**The method** (official ``PixArt-alpha/diffusion/model/nets/pixart_controlnet.py``, ``ControlPixArtHalf``): the
first N base blocks are copied (trainable, initialised from the base weights); the control image, encoded like the
noise input, is embedded by the *frozen base* patch embedding plus the same sin-cos positions
(``c = x_embedder(cond) + pos_embed``). Base block 0 runs as usual; then for i = 1..N

    c = copy_0(x + before_proj(c))      if i == 1            (x: the output of base block 0)
    c = copy_{i-1}(c)                   otherwise            (the copies get the base's t0, text and mask)
    x = base_block_i(x + after_proj_{i-1}(c))

and base blocks N+1.. run unchanged. ``before_proj`` (block 0 only) and every ``after_proj`` are Linear(D, D) with
zero weights and bias, so an untrained adapter leaves the base output exactly unchanged. The diffusers research
project (``examples/research_projects/pixart/controlnet_pixart_alpha.py``) computes the same thing.

**How it is applied here**: not by wrapping the model but by forward pre-hooks on the base blocks
(:class:`BlockControl`), so the shared sampler loop, CFG, attention processors and our ``TextDiTModel`` stay
untouched, and the same code runs on diffusers' ``PixArtTransformer2DModel``. The hook of base block ``b`` binds the
block's own call (hidden states, t0, text, masks), asks every active adapter for its residual from that block's
input, and hands the block ``x + strength * residual``. A copied block is called with exactly the arguments the
base block received, so it is the official ``copied_block(c, y, t0, mask)``. Several adapters compose: each sees
the same base hidden states and their residuals add up (as diffusers' multi-ControlNet); ``strength`` scales an
adapter's residuals (diffusers' ``controlnet_conditioning_scale``; the official code has no such knob: 1.0).
``conditional_half_only`` applies the control to the conditional half of a CFG batch only (see ``pipelines.control``).

Adapter files (``<pipeline>/controls/<name>.safetensors``) use the diffusers research-project key layout:
``controlnet_blocks.{i}.transformer_block.*`` (our ``DiTBlock`` has the parameter names of diffusers'
``BasicTransformerBlock``), ``controlnet_blocks.0.before_proj.*``, ``controlnet_blocks.{i}.after_proj.*``; metadata
``adapter_type=controlnet``, ``adapter_config`` (JSON), the preprocessor and the base model. Official
``PixArt-XL-2-{512,1024}-ControlNet.pth`` files convert with ``dit.convert.pixart_controlnet``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipelines.errors import InputError

from .easycontrol import ControlAdapterError, ControlBaseModelWarning

ADAPTER_TYPE = "controlnet"
MODULE_NAME = "block_control_adapters"  # where the adapters live on the transformer (so optimizers and DDP see them)
_ATTR = "_dit_studio_block_control"
_EASYCONTROL_ATTR = "_dit_studio_easycontrol"
_SIGNATURES: dict[type, inspect.Signature] = {}


# ---------------------------------------------------------------------------------------------- a block's call


def _signature(block: nn.Module) -> inspect.Signature:
    cls = type(block)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(block.forward)
    return _SIGNATURES[cls]


def _t0_name(block: nn.Module) -> str:
    """The argument that carries adaLN-single's t0 (B, 6D): ``cond`` for our DiTBlock, ``timestep`` for diffusers'."""
    from dit.blocks import DiTBlock

    if isinstance(block, DiTBlock):
        if block.modulation != "ada_single":
            raise TypeError("block control needs adaLN-single blocks (PixArt-style); this DiTBlock is adaLN-Zero")
        return "cond"
    if getattr(block, "norm_type", None) == "ada_norm_single":
        return "timestep"
    raise TypeError(
        "block control supports DiTBlock (adaLN-single) and PixArt (ada_norm_single) blocks, not "
        f"{type(block).__name__}"
    )


@dataclass
class BlockCall:
    """One base block's call, bound to its signature: what a control block needs of it (t0, text, masks)."""

    block: nn.Module
    arguments: dict[str, Any]
    hidden: str = "hidden_states"

    @classmethod
    def bind(cls, block: nn.Module, args: tuple, kwargs: dict) -> BlockCall:
        bound = _signature(block).bind(*args, **kwargs)
        return cls(block, dict(bound.arguments), next(iter(_signature(block).parameters)))

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.arguments[self.hidden]

    @property
    def t0(self) -> torch.Tensor:
        return self.arguments[_t0_name(self.block)]

    def run(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``module`` (a copy of this block) on ``hidden_states`` with every other argument of this call."""
        bound = _signature(module).bind_partial()
        bound.arguments.update(self.arguments)
        bound.arguments[self.hidden] = hidden_states
        return module(*bound.args, **bound.kwargs)

    def sliced(self, start: int) -> BlockCall:
        """The call restricted to batch rows ``start:`` (tensors with the batch dimension are sliced)."""
        batch = self.hidden_states.shape[0]
        args = {
            k: (v[start:] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v)
            for k, v in self.arguments.items()
        }
        return BlockCall(self.block, args, self.hidden)

    def to_args(self) -> tuple[tuple, dict]:
        bound = _signature(self.block).bind_partial()
        bound.arguments.update(self.arguments)
        return bound.args, bound.kwargs


# ---------------------------------------------------------------------------------------------- adapters


class ResidualControlAdapter(nn.Module):
    """A control branch whose outputs are added to the inputs of base blocks (ControlNet-Transformer, RelaCtrl).

    Subclasses implement :meth:`step`: given base block ``b``'s call (its input hidden states ``x`` and arguments)
    and the per-forward ``state`` (which starts as ``{"c": embedded condition}``), return the residual to add to
    ``x`` before block ``b`` runs, or None. ``skip`` holds control-block indices to leave out (the relevance score).
    """

    adapter_type: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.skip: set[int] = set()

    def step(self, block_index: int, call: BlockCall, state: dict[str, Any]) -> torch.Tensor | None:
        raise NotImplementedError

    def adapter_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, transformer: nn.Module, config: dict[str, Any]) -> ResidualControlAdapter:
        raise NotImplementedError

    @property
    def num_control_blocks(self) -> int:
        raise NotImplementedError

    def injection_blocks(self) -> list[int]:
        """Base blocks whose input receives a residual (for documentation and tests)."""
        raise NotImplementedError


def _zero_linear(dim: int) -> nn.Linear:
    lin = nn.Linear(dim, dim)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def base_blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or not hasattr(transformer, "pos_embed") or not hasattr(transformer, "adaln_single"):
        raise TypeError(
            "block control needs a PixArt-style transformer (pos_embed, adaln_single, transformer_blocks); "
            f"got {type(transformer).__name__}"
        )
    return list(blocks)


def inner_dim(transformer: nn.Module) -> int:
    return int(base_blocks(transformer)[0].attn1.to_q.in_features)


class ControlNetBlock(nn.Module):
    """``controlnet_blocks.{i}``: a trainable copy of base block i, ``before_proj`` (i = 0 only), ``after_proj``."""

    def __init__(self, block: nn.Module, index: int, dim: int):
        super().__init__()
        self.index = index
        if index == 0:
            self.before_proj = _zero_linear(dim)
        self.transformer_block = block
        self.after_proj = _zero_linear(dim)


def copy_block(transformer: nn.Module, index: int) -> nn.Module:
    """A trainable deep copy of base block ``index`` with plain attention processors (never EasyControl's)."""
    ec = getattr(transformer, _EASYCONTROL_ATTR, None)
    with ec.detached() if ec is not None else contextlib.nullcontext():
        block = copy.deepcopy(base_blocks(transformer)[index])
    # deepcopy also copies forward hooks: a copy of a base block that BlockControl already hooks would re-enter the
    # control loop from inside the control branch (nested residuals; a batch-size error for several images)
    for module in block.modules():
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks_with_kwargs.clear()
        module._forward_hooks.clear()
        module._forward_hooks_with_kwargs.clear()
    block.requires_grad_(True)
    return block


class ControlNetTransformer(ResidualControlAdapter):
    """PixArt-δ's ControlNet-Transformer: N copied blocks feeding base blocks 1..N (see the module docstring)."""

    adapter_type: ClassVar[str] = ADAPTER_TYPE

    def __init__(self, blocks: Sequence[nn.Module], dim: int, num_base_layers: int):
        super().__init__()
        if not 1 <= len(blocks) <= num_base_layers - 1:
            raise ValueError(
                f"a ControlNet-Transformer copies 1..{num_base_layers - 1} of the {num_base_layers} base blocks "
                f"(it feeds base blocks 1..N), got {len(blocks)}"
            )
        self.dim = int(dim)
        self.num_base_layers = int(num_base_layers)
        self.controlnet_blocks = nn.ModuleList([ControlNetBlock(b, i, dim) for i, b in enumerate(blocks)])

    @classmethod
    def from_transformer(cls, transformer: nn.Module, num_blocks: int | None = None) -> ControlNetTransformer:
        """Copies of the first ``num_blocks`` base blocks (default: half, rounded down, as PixArt-δ's 13 of 28)."""
        n_base = len(base_blocks(transformer))
        n = n_base // 2 if num_blocks is None else int(num_blocks)
        if not 1 <= n <= n_base - 1:
            raise ValueError(f"num_blocks must be between 1 and {n_base - 1} for this {n_base}-block model, got {n}")
        return cls([copy_block(transformer, i) for i in range(n)], inner_dim(transformer), n_base)

    @classmethod
    def from_config(cls, transformer: nn.Module, config: dict[str, Any]) -> ControlNetTransformer:
        n = int(config["num_blocks"])
        n_base = len(base_blocks(transformer))
        if n > n_base - 1:
            raise ControlAdapterError(
                f"this ControlNet-Transformer has {n} control blocks, but the model has only {n_base} blocks "
                f"(at most {n_base - 1} can be fed)"
            )
        return cls([copy_block(transformer, i) for i in range(n)], inner_dim(transformer), n_base)

    def adapter_config(self) -> dict[str, Any]:
        return {"num_blocks": len(self.controlnet_blocks), "inner_dim": self.dim}

    @property
    def num_control_blocks(self) -> int:
        return len(self.controlnet_blocks)

    def injection_blocks(self) -> list[int]:
        return [i + 1 for i in range(len(self.controlnet_blocks)) if i not in self.skip]

    def step(self, block_index: int, call: BlockCall, state: dict[str, Any]) -> torch.Tensor | None:
        i = block_index - 1
        if not 0 <= i < len(self.controlnet_blocks):
            return None
        blk = self.controlnet_blocks[i]
        x = call.hidden_states
        c = x + blk.before_proj(state["c"]) if i == 0 else state["c"]
        if i in self.skip:  # relevance score: the block is left out, c passes through, nothing is added here
            state["c"] = c
            return None
        c = call.run(blk.transformer_block, c)
        state["c"] = c
        return blk.after_proj(c)


# ---------------------------------------------------------------------------------------------- the controller


@dataclass
class ResidualCondition:
    """One condition: its encoded image (B or 1, C, H, W) at the generation's size, an adapter and a strength."""

    latents: torch.Tensor
    adapter: str
    strength: float = 1.0


@dataclass
class _Run:
    """The conditions of one transformer forward: embedded once, then carried block to block."""

    items: list[tuple[ResidualCondition, ResidualControlAdapter, dict[str, Any]]]
    tokens: int
    half_only: bool


@dataclass
class ResidualAdapterInfo:
    """A loaded block-residual adapter: its kind, name, file and recorded metadata (the pipeline reads these)."""

    name: str
    kind: str
    path: str | None = None
    hash: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def preprocessor(self) -> str | None:
        return self.metadata.get("preprocessor") or None

    @property
    def control_size(self) -> int | None:
        return None  # the control map always has the generation's size (it is added token by token)

    @property
    def position_bias(self) -> float:
        return 0.0


class BlockControl:
    """Block-residual control on one transformer: its adapters, the hooks on its blocks and the active conditions.

    Use :meth:`attach` (idempotent). The adapters are a submodule of the transformer (``block_control_adapters``) so
    optimizers, ``.to()`` and DDP see them; :meth:`detached` removes them for saving the base model.
    """

    def __init__(self, transformer: nn.Module):
        self.blocks = base_blocks(transformer)
        for block in self.blocks:
            _t0_name(block)  # refuse unsupported blocks now, not mid-generation
        self.transformer = transformer
        self.adapters = nn.ModuleDict()
        self.info: dict[str, ResidualAdapterInfo] = {}
        self.conditions: list[ResidualCondition] = []
        self.conditional_half_only = False
        self._run: _Run | None = None
        transformer.add_module(MODULE_NAME, self.adapters)
        self._hooks = [transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)]
        self._hooks.append(transformer.register_forward_hook(self._after_forward, always_call=True))
        for index, block in enumerate(self.blocks):
            if index:
                hook = block.register_forward_pre_hook(self._make_block_hook(index), with_kwargs=True)
                self._hooks.append(hook)
        setattr(transformer, _ATTR, self)

    @classmethod
    def attach(cls, transformer: nn.Module) -> BlockControl:
        existing = getattr(transformer, _ATTR, None)
        return existing if isinstance(existing, BlockControl) else cls(transformer)

    @staticmethod
    def of(transformer: nn.Module) -> BlockControl | None:
        existing = getattr(transformer, _ATTR, None)
        return existing if isinstance(existing, BlockControl) else None

    def detach(self) -> None:
        """Remove hooks and adapters; the transformer is the plain model again."""
        self.clear_conditions()
        for hook in self._hooks:
            hook.remove()
        self.transformer._modules.pop(MODULE_NAME, None)
        if getattr(self.transformer, _ATTR, None) is self:
            delattr(self.transformer, _ATTR)
        self.info.clear()

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Temporarily without the adapters in the module tree (to save the base model's weights alone)."""
        module = self.transformer._modules.pop(MODULE_NAME, None)
        try:
            yield
        finally:
            if module is not None:
                self.transformer._modules[MODULE_NAME] = module

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, adapter: ResidualControlAdapter, metadata: dict[str, str] | None = None
    ) -> ResidualAdapterInfo:
        if not name or "." in name:
            raise ValueError(f"adapter name must be non-empty and without dots, got {name!r}")
        if adapter.num_control_blocks and getattr(adapter, "num_base_layers", len(self.blocks)) != len(self.blocks):
            raise ValueError(f"adapter {name!r} was built for another number of base blocks")
        self.adapters[name] = adapter
        info = ResidualAdapterInfo(name, adapter.adapter_type, metadata=dict(metadata or {}))
        self.info[name] = info
        return info

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self.info.pop(name, None)

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.adapters[name].parameters())

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors in the file layout, fp32 on CPU."""
        tensors = self.adapters[name].state_dict()
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    def file_metadata(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        adapter = self.adapters[name]
        cfg = self.transformer.config
        meta = {
            "format": "pt",
            "adapter_type": adapter.adapter_type,
            "adapter_config": json.dumps(adapter.adapter_config(), sort_keys=True),
            "base_model_class": type(self.transformer).__name__,
            "base_num_layers": str(len(self.blocks)),
            "base_inner_dim": str(inner_dim(self.transformer)),
            "base_in_channels": str(cfg.in_channels),
            "base_patch_size": str(cfg.patch_size),
            "control_size": "",  # the generation's size
        }
        meta.update({k: v for k, v in self.info[name].metadata.items() if k not in meta})
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        return meta

    def save_adapter(self, name: str, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        from training.lora import save_lora_file

        return save_lora_file(self.state_dict(name), path, self.file_metadata(name, metadata))

    def load_adapter(
        self, path: str | Path, name: str | None = None, base_hash: str | None = None, hash_value: str | None = None
    ) -> ResidualAdapterInfo:
        """Load a ``controlnet``/``relactrl`` adapter file, checked (bytes, kind, layout, shapes) before use."""
        import warnings

        file = read_residual_adapter(path, hash_value)
        adapter = build_residual_adapter(file, self.transformer)
        name = name or file.path.stem
        if base_hash and file.base_model_hash and file.base_model_hash != base_hash:
            warnings.warn(
                f"Control adapter {file.path.name} was trained on {file.metadata.get('base_model') or 'another model'}"
                f" ({file.base_model_hash}); this model's hash is {base_hash}. The shapes fit, so it is applied, but "
                "it may not control as intended.",
                ControlBaseModelWarning,
                stacklevel=2,
            )
        param = next(self.transformer.parameters())
        adapter.to(device=param.device, dtype=param.dtype).eval()
        self.remove_adapter(name)
        info = self.add_adapter(name, adapter, file.metadata)
        info.path, info.hash = str(file.path), file.hash
        return info

    # ---- conditions ---------------------------------------------------------------------------------
    def set_conditions(self, conditions: Sequence[ResidualCondition], conditional_half_only: bool = False) -> None:
        for c in conditions:
            if c.adapter not in self.adapters:
                raise InputError(
                    f"Control adapter {c.adapter!r} is not loaded. Loaded: {', '.join(self.adapters) or 'none'}."
                )
            if not torch.is_tensor(c.latents) or c.latents.ndim != 4:
                raise InputError("A condition must be a (batch, channels, height, width) tensor.")
            if not math.isfinite(float(c.strength)):
                raise InputError(f"Control strength must be a finite number, got {c.strength!r}.")
        self.conditions = list(conditions)
        self.conditional_half_only = bool(conditional_half_only)

    def clear_conditions(self) -> None:
        self.conditions = []
        self.conditional_half_only = False
        self._run = None

    @contextlib.contextmanager
    def conditioned(
        self, conditions: Sequence[ResidualCondition], conditional_half_only: bool = False
    ) -> Iterator[BlockControl]:
        self.set_conditions(conditions, conditional_half_only)
        try:
            yield self
        finally:
            self.clear_conditions()

    # ---- hooks --------------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._run = None
        if not self.conditions:
            return None
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
            raise RuntimeError(
                "ControlNet-Transformer/RelaCtrl control runs in block hooks, which gradient checkpointing would "
                "re-run out of order; train these adapters without optim.gradient_checkpointing."
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        items = []
        for cond in self.conditions:
            latents = cond.latents
            if tuple(latents.shape[1:]) != tuple(hidden.shape[1:]):
                raise InputError(
                    f"The control map of adapter {cond.adapter!r} is {tuple(latents.shape[-2:])} in the model's input "
                    f"space, but the image is {tuple(hidden.shape[-2:])}: ControlNet-Transformer and RelaCtrl add the "
                    "condition token by token, so the map must have the generation's size."
                )
            adapter = self.adapters[cond.adapter]
            # The official forward_c: the frozen base patch embedding plus the image grid's sin-cos positions.
            c = module.pos_embed(latents.to(module.pos_embed.proj.weight.dtype))
            items.append((cond, adapter, {"c": c}))
        p = int(module.config.patch_size)
        tokens = (hidden.shape[-2] // p) * (hidden.shape[-1] // p)
        self._run = _Run(items, tokens, self.conditional_half_only)
        return None

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._run = None

    def _make_block_hook(self, index: int) -> Any:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return self._before_block(index, block, args, kwargs)

        return hook

    def _before_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self._run
        if run is None:
            return None
        ec = getattr(self.transformer, _EASYCONTROL_ATTR, None)
        if ec is not None and ec.state.mode == "condition":
            return None  # EasyControl is running the blocks on its condition tokens
        call = BlockCall.bind(block, args, kwargs)
        x = call.hidden_states
        if x.ndim != 3 or x.shape[1] != run.tokens:
            return None
        batch = x.shape[0]
        start = batch // 2 if run.half_only and batch % 2 == 0 else 0
        branch = call.sliced(start) if start else call
        rows = batch - start
        total = None
        for cond, adapter, state in run.items:
            state_c = state["c"]
            if state_c.shape[0] != rows:
                if rows % state_c.shape[0]:
                    raise InputError(f"{state_c.shape[0]} control images cannot be matched to a batch of {rows}.")
                state["c"] = state_c.repeat(rows // state_c.shape[0], 1, 1)
            dtype = next(adapter.parameters()).dtype
            local = branch
            if dtype != x.dtype:
                cast = {
                    k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in branch.arguments.items()
                }
                local = BlockCall(branch.block, cast, branch.hidden)
                state["c"] = state["c"].to(dtype)
            r = adapter.step(index, local, state)
            if r is None:
                continue
            r = r.to(x.dtype) * float(cond.strength)
            total = r if total is None else total + r
        if total is None:
            return None
        if start:
            total = torch.cat([torch.zeros_like(x[:start]), total])
        call.arguments[call.hidden] = x + total
        return call.to_args()


# ---------------------------------------------------------------------------------------------- files


@dataclass
class ResidualAdapterFile:
    """A block-residual adapter file read without touching any model: tensors, metadata, kind and config."""

    path: Path
    hash: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    kind: str
    config: dict[str, Any]

    @property
    def base_model_hash(self) -> str | None:
        return self.metadata.get("base_model_hash") or None


def residual_adapter_classes() -> dict[str, type[ResidualControlAdapter]]:
    from .relactrl import RelaCtrl

    return {ControlNetTransformer.adapter_type: ControlNetTransformer, RelaCtrl.adapter_type: RelaCtrl}


RESIDUAL_KINDS = ("controlnet", "relactrl")


def file_adapter_type(path: str | Path) -> str | None:
    """The ``adapter_type`` recorded in a safetensors file's header (None if absent or unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("adapter_type")
    except Exception:
        return None


def read_residual_adapter(path: str | Path, hash_value: str | None = None) -> ResidualAdapterFile:
    """Read and check the header of a ``controlnet``/``relactrl`` adapter file (never unpickles)."""
    from safetensors import safe_open

    from dit.convert.safe_load import expect_safetensors
    from pipelines.lora import _cached_hash

    p = Path(path).expanduser()
    if not p.is_file():
        raise ControlAdapterError(f"Control adapter file {p} does not exist.")
    try:
        expect_safetensors(p)
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:
        raise ControlAdapterError(f"Control adapter {p} is not a readable safetensors file: {e}") from None
    kind = metadata.get("adapter_type")
    if kind not in RESIDUAL_KINDS:
        raise ControlAdapterError(
            f"Control adapter {p} has adapter_type {kind!r}, not one of {', '.join(RESIDUAL_KINDS)}."
        )
    try:
        config = json.loads(metadata.get("adapter_config") or "")
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except ValueError as e:
        raise ControlAdapterError(f"Control adapter {p} has no readable adapter_config metadata ({e}).") from None
    return ResidualAdapterFile(p, hash_value or _cached_hash(p), tensors, metadata, kind, config)


def build_residual_adapter(file: ResidualAdapterFile, transformer: nn.Module) -> ResidualControlAdapter:
    """The adapter of ``file`` built for ``transformer`` with every weight checked in (names and shapes)."""
    from dit.convert.common import KeyMismatchError, load_strict

    meta = file.metadata
    trained = (
        f" It was trained on {meta['base_model']} ({meta.get('base_model_class', '?')})."
        if meta.get("base_model")
        else ""
    )
    where = f"Control adapter {file.path}"
    dim = inner_dim(transformer)
    n_base = len(base_blocks(transformer))
    if meta.get("base_inner_dim") and meta["base_inner_dim"] != str(dim):
        raise ControlAdapterError(
            f"{where} is for a model of width {meta['base_inner_dim']}, this one is {dim}.{trained} "
            "Use an adapter trained on this base model."
        )
    if meta.get("base_num_layers") and meta["base_num_layers"] != str(n_base):
        raise ControlAdapterError(
            f"{where} is for a model with {meta['base_num_layers']} blocks, this one has {n_base}.{trained} "
            "Use an adapter trained on this base model."
        )
    cls = residual_adapter_classes()[file.kind]
    try:
        adapter = cls.from_config(transformer, file.config)
    except (KeyError, TypeError, ValueError) as e:
        raise ControlAdapterError(f"{where}: its adapter_config {file.config} does not fit this model: {e}.") from None
    try:
        load_strict(adapter, {k: v.to(next(adapter.parameters()).dtype) for k, v in file.tensors.items()}, where)
    except KeyMismatchError as e:
        raise ControlAdapterError(f"{e}.{trained} Use an adapter trained on this base model.") from None
    return adapter
