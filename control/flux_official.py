"""The official EasyControl release (FLUX.1-dev LoRAs) on diffusers' ``FluxTransformer2DModel`` and ``FluxPipeline``.

    from diffusers import FluxPipeline
    from control.flux_official import FluxEasyControl, generate

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    FluxEasyControl.install(pipe.transformer, [("models/canny.safetensors", 1.0)])   # set_single_lora
    image = generate(pipe, "a futuristic car", spatial_images=[canny_map], height=768, width=1024).images[0]

The files (HF ``Xiaojiu-Z/EasyControl``, ``models/{canny,depth,hedsketch,inpainting,pose,seg,subject,Ghibli}``) hold
``transformer_blocks.{i}.attn.processor.{q,k,v,proj}_loras.{n}.{down,up}.weight`` (19 double blocks) and
``single_transformer_blocks.{i}.attn.processor.{q,k,v}_loras.{n}.{down,up}.weight`` (38 single blocks), ``down``
[r, D] and ``up`` [D, r]. The processors here have exactly that parameter layout, so the file keys *are* their state
dict keys; loading is strict (every key used, every layer present, shapes checked, one rank per file), where the
official loader reads missing keys as ``None``.

Math, as in the official ``layers_cache.py`` / ``transformer_flux.py`` / ``pipeline.py``:

* condition latents: VAE-encoded, ``(z - shift) * scale``, packed 2x2 and embedded by the shared ``x_embedder``;
* condition modulation: ``time_text_embed(t=0, guidance, pooled prompt)`` in every double and single block;
* LoRA (scale network_alpha / r = 1) times the per-condition weight, only on condition tokens: q, k, v in all
  blocks, and in double blocks ``proj`` applied to the *output* of ``to_out[0]`` (``h = to_out0(h); h += w*lora(h)``);
* mask: text and noise tokens see everything; a condition sees only itself; so its K/V (after norm and RoPE) are
  cached once per image and appended for the text and noise queries at every step;
* positions: spatial conditions are resized straight to ``cond_size``^2 and get RoPE ids
  ``(0, r * Hn/Hc, c * Wn/Wc)`` (position interpolation); subject conditions keep their aspect (long side to
  ``cond_size``, zero-padded in [-1, 1] space, i.e. grey) with integer ids offset by 64 on the row axis.

Differences, each deliberate: every condition is VAE-encoded on its own (the official code stacks them into one
tall image, so the VAE's receptive field leaks across the seams); the latent is the VAE posterior mean (the official
samples it with the noise generator); odd subject padding is split so the square is exact (the official pads
``int(pad/2)`` on both sides, one pixel short); the cache is filled by the condition branch alone, keyed by the
prompt's pooled embedding, so ``true_cfg_scale > 1`` (a negative prompt, whose pooled embedding modulates the
conditions differently) also works.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import InputError

from .easycontrol import ControlAdapterError

_ATTR = "_dit_studio_flux_easycontrol"
_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.attn\.processor\.(q|k|v|proj)_loras\.(\d+)\.(down|up)\.weight$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.attn\.processor\.(q|k|v)_loras\.(\d+)\.(down|up)\.weight$")
SUBJECT_ROW_OFFSET = 64


class OfficialLoRA(nn.Module):
    """The official ``LoRALinearLayer`` minus its row mask (this branch only ever sees its own condition)."""

    def __init__(self, dim: int, rank: int, network_alpha: float | None, device: Any = None, dtype: Any = None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, dim, bias=False, device=device, dtype=dtype)
        self.rank, self.network_alpha = rank, network_alpha
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        out = self.up(self.down(x.to(dtype)))
        if self.network_alpha is not None:
            out = out * (self.network_alpha / self.rank)
        return out.to(x.dtype)


@dataclass
class _FluxState:
    mode: str = "noise"
    slot: int = 0
    weight: float = 1.0
    conditions: list[FluxCondition] = field(default_factory=list)
    use_cache: bool = True
    key: tuple | None = None
    passes: int = 0


@dataclass
class FluxCondition:
    """A packed condition (1 or B, L, 4C), its RoPE ids (L, 3) and the LoRA slot that processes it."""

    latents: torch.Tensor
    ids: torch.Tensor
    slot: int


def _rope(x: torch.Tensor, rope: Any) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rope, sequence_dim=1) if rope is not None else x


def _match(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise InputError(f"{t.shape[0]} condition images cannot be matched to a batch of {batch}.")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


class FluxEasyControlProcessor(nn.Module):
    """Processor of one Flux attention (double block when ``double``): official key layout, cached conditions."""

    def __init__(self, state: _FluxState, dim: int, ranks: Sequence[int], double: bool, device: Any, dtype: Any):
        super().__init__()
        self._state = state
        self.double = double
        self.q_loras = nn.ModuleList([OfficialLoRA(dim, r, r, device, dtype) for r in ranks])
        self.k_loras = nn.ModuleList([OfficialLoRA(dim, r, r, device, dtype) for r in ranks])
        self.v_loras = nn.ModuleList([OfficialLoRA(dim, r, r, device, dtype) for r in ranks])
        if double:
            self.proj_loras = nn.ModuleList([OfficialLoRA(dim, r, r, device, dtype) for r in ranks])
        self.weights = [1.0] * len(ranks)
        self.kv: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        if self._state.mode == "condition":
            return self._condition(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return self._noise(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _heads(self, attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, attn.head_dim))

    def _condition(self, attn: nn.Module, x: torch.Tensor, enc: torch.Tensor | None, rope: Any) -> Any:
        n, w = self._state.slot, self._state.weight
        q = attn.to_q(x) + w * self.q_loras[n](x)
        k = attn.to_k(x) + w * self.k_loras[n](x)
        v = attn.to_v(x) + w * self.v_loras[n](x)
        q, k, v = (self._heads(attn, t) for t in (q, k, v))
        q, k = _rope(attn.norm_q(q), rope), _rope(attn.norm_k(k), rope)
        self.kv.setdefault(self._state.key, []).append((k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = o.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if not self.double:
            return o
        o = attn.to_out[0](o)
        o = attn.to_out[1](o + w * self.proj_loras[n](o))
        empty = enc if enc is not None else x[:, :0]
        return o, attn.to_add_out(empty)

    def _noise(self, attn: nn.Module, x: torch.Tensor, enc: torch.Tensor | None, mask: Any, rope: Any) -> Any:
        q, k, v = (self._heads(attn, p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if enc is not None and attn.added_kv_proj_dim is not None:
            eq, ek, ev = (self._heads(attn, p(enc)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        q, k = _rope(q, rope), _rope(k, rope)
        cached = self.kv.get(self._state.key, []) if self._state.conditions else []
        if cached:
            k = torch.cat([k] + [_match(ck, k.shape[0]).to(k.dtype) for ck, _ in cached], dim=1)
            v = torch.cat([v] + [_match(cv, v.shape[0]).to(v.dtype) for _, cv in cached], dim=1)
            if mask is not None:
                mask = F.pad(mask, (0, k.shape[1] - mask.shape[-1]), value=0.0)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        o = o.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if enc is None:
            return o
        enc_o, o = o.split_with_sizes([enc.shape[1], o.shape[1] - enc.shape[1]], dim=1)
        o = attn.to_out[1](attn.to_out[0](o.contiguous()))
        return o, attn.to_add_out(enc_o.contiguous())


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class _Slot:
    path: str
    index: int  # n inside its file
    weight: float
    rank: int


def read_official_file(path: str | Path, transformer: nn.Module) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """Read and check one official EasyControl file: (tensors, rank, the condition indices n it holds)."""
    from pipelines.lora import LoraLoadError, _read_safetensors, resolve_lora_path

    try:
        p = resolve_lora_path(path)
        raw, _ = _read_safetensors(p)
    except LoraLoadError as e:
        raise ControlAdapterError(str(e)) from None
    n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    dim = transformer.inner_dim if hasattr(transformer, "inner_dim") else transformer.x_embedder.out_features
    tensors: dict[str, torch.Tensor] = {}
    found: set[tuple[str, int, str, int, str]] = set()
    bad, ranks = [], set()
    for key, value in raw.items():
        name = key.removeprefix("transformer.")
        m_d, m_s = _DOUBLE.match(name), _SINGLE.match(name)
        m = m_d or m_s
        if m is None:
            bad.append(key)
            continue
        kind = "double" if m_d else "single"
        block, proj, n, part = int(m[1]), m[2], int(m[3]), m[4]
        if block >= (n_double if m_d else n_single):
            raise ControlAdapterError(
                f"EasyControl file {p} has {kind} block {block}; this FluxTransformer2DModel has {n_double} double "
                f"and {n_single} single blocks. Use a file made for this base model (FLUX.1-dev: 19 and 38)."
            )
        want = (value.shape[0], dim) if part == "down" else (dim, value.shape[-1])
        if value.ndim != 2 or tuple(value.shape) != want or (part == "up" and value.shape[0] != dim):
            raise ControlAdapterError(
                f"EasyControl file {p}: {key} has shape {tuple(value.shape)}; this model's width is {dim} "
                f"(FLUX.1-dev: 3072), so expected {f'[r, {dim}]' if part == 'down' else f'[{dim}, r]'}."
            )
        ranks.add(value.shape[0] if part == "down" else value.shape[1])
        found.add((kind, block, proj, n, part))
        tensors[name] = value
    if bad:
        raise ControlAdapterError(
            f"{p} is not an official EasyControl file: {len(bad)} keys do not fit the layout "
            f"transformer_blocks.{{i}}.attn.processor.{{q,k,v,proj}}_loras.{{n}}.{{down,up}}.weight, e.g. {bad[:3]}."
        )
    if not tensors:
        raise ControlAdapterError(f"{p} holds no EasyControl LoRA weights.")
    if len(ranks) != 1:
        raise ControlAdapterError(f"EasyControl file {p} mixes LoRA ranks {sorted(ranks)}; the format has one rank.")
    indices = sorted({f[3] for f in found})
    expected = [
        ("double", i, pr, pa) for i in range(n_double) for pr in ("q", "k", "v", "proj") for pa in ("down", "up")
    ]
    expected += [("single", i, pr, pa) for i in range(n_single) for pr in ("q", "k", "v") for pa in ("down", "up")]
    missing = [
        f"{'' if kind == 'double' else 'single_'}transformer_blocks.{i}.attn.processor.{pr}_loras.{n}.{pa}.weight"
        for n in indices
        for kind, i, pr, pa in expected
        if (kind, i, pr, n, pa) not in found
    ]
    if missing:
        raise ControlAdapterError(
            f"EasyControl file {p} lacks {len(missing)} weights (e.g. {missing[0]}): it was made for a model with "
            "fewer blocks or is incomplete."
        )
    return tensors, ranks.pop(), indices


class FluxEasyControl:
    """Official EasyControl LoRAs installed on a ``FluxTransformer2DModel`` (the official ``set_multi_lora``)."""

    def __init__(self, transformer: nn.Module, slots: list[_Slot], tensors: list[dict[str, torch.Tensor]]):
        self.transformer = transformer
        self.state = _FluxState()
        self.slots = slots
        self._originals: dict[str, Any] = {}
        ref = transformer.x_embedder.weight
        dim = ref.shape[0]
        ranks = [s.rank for s in slots]
        self.processors: dict[str, FluxEasyControlProcessor] = {}
        for prefix, blocks, double in (
            ("transformer_blocks", transformer.transformer_blocks, True),
            ("single_transformer_blocks", transformer.single_transformer_blocks, False),
        ):
            for i, block in enumerate(blocks):
                proc = FluxEasyControlProcessor(self.state, dim, ranks, double, ref.device, ref.dtype)
                proc.weights = [s.weight for s in slots]
                self._originals[f"{prefix}.{i}"] = block.attn.processor
                block.attn.set_processor(proc)
                self.processors[f"{prefix}.{i}"] = proc
        # The slots' weights, renumbered: slot j is condition n of its file (official multi-LoRA order).
        state: dict[str, torch.Tensor] = {}
        for j, (slot, file_tensors) in enumerate(zip(slots, tensors)):
            for key, value in file_tensors.items():
                m = _DOUBLE.match(key) or _SINGLE.match(key)
                if int(m[3]) != slot.index:
                    continue
                block_prefix = key.split(".attn.")[0]
                state[f"{block_prefix}.attn.processor.{m[2]}_loras.{j}.{m[4]}.weight"] = value
        own = {
            f"{name}.attn.processor.{k}": v
            for name, proc in self.processors.items()
            for k, v in proc.state_dict().items()
        }
        missing = sorted(set(own) - set(state))
        if missing:  # cannot happen after read_official_file's checks; kept as an invariant
            raise ControlAdapterError(f"EasyControl weights are incomplete: {missing[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        self._hook = transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        setattr(transformer, _ATTR, self)

    @classmethod
    def install(
        cls, transformer: nn.Module, loras: Sequence[tuple[str | Path, float | Sequence[float]] | str | Path]
    ) -> FluxEasyControl:
        """Load official files, each with a weight (or one weight per condition index n inside the file).

        Replaces any EasyControl already installed on ``transformer``. Slots (condition positions) follow the
        order of the files and, within a file, of its indices n: as ``set_multi_lora`` maps them.
        """
        old = getattr(transformer, _ATTR, None)
        slots, tensors = [], []
        for item in loras:
            path, weights = (item, 1.0) if isinstance(item, (str, Path)) else item
            file_tensors, rank, indices = read_official_file(path, transformer)
            ws = [float(weights)] * len(indices) if isinstance(weights, (int, float)) else [float(x) for x in weights]
            if len(ws) != len(indices):
                raise InputError(f"{Path(path).name} holds {len(indices)} condition LoRAs; give as many weights.")
            for n, w in zip(indices, ws):
                slots.append(_Slot(str(path), n, w, rank))
                tensors.append(file_tensors)
        if not slots:
            raise InputError("Give at least one EasyControl LoRA file.")
        if isinstance(old, FluxEasyControl):
            old.uninstall()
        return cls(transformer, slots, tensors)

    def uninstall(self) -> None:
        """The official ``unset_lora``: default Flux processors back."""
        for name, original in self._originals.items():
            prefix, i = name.rsplit(".", 1)
            getattr(self.transformer, prefix)[int(i)].attn.set_processor(original)
        self._hook.remove()
        if getattr(self.transformer, _ATTR, None) is self:
            delattr(self.transformer, _ATTR)

    def num_parameters(self) -> int:
        return sum(p.numel() for proc in self.processors.values() for p in proc.parameters())

    # ---- conditions ---------------------------------------------------------------------------------
    def set_conditions(self, conditions: Sequence[FluxCondition], use_cache: bool = True) -> None:
        for c in conditions:
            if not 0 <= c.slot < len(self.slots):
                raise InputError(f"condition slot {c.slot} does not exist; {len(self.slots)} LoRAs are installed.")
        self.state.conditions = list(conditions)
        self.state.use_cache = use_cache
        self.clear_cache()

    def clear_cache(self) -> None:
        """The official ``bank_kv.clear()``: call after every image."""
        for proc in self.processors.values():
            proc.kv = {}

    def clear(self) -> None:
        self.state.conditions = []
        self.clear_cache()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        if not state.conditions:
            state.key = None
            return None
        pooled = kwargs.get("pooled_projections")
        guidance = kwargs.get("guidance")
        if pooled is None:
            raise InputError("EasyControl needs the pooled prompt embedding (pooled_projections) in every call.")
        key = (pooled.data_ptr(), tuple(pooled.shape), None if guidance is None else float(guidance.flatten()[0]))
        state.key = key
        if not state.use_cache or key not in next(iter(self.processors.values())).kv:
            for proc in self.processors.values():
                proc.kv.pop(key, None)
            self.compute_condition_cache(pooled, guidance)
        return None

    def compute_condition_cache(self, pooled: torch.Tensor, guidance: torch.Tensor | None) -> None:
        """Each condition through every block with its slot's LoRA and the t = 0 modulation (no text, no noise)."""
        model, state = self.transformer, self.state
        batch = pooled.shape[0]
        t0 = torch.zeros(batch, device=pooled.device, dtype=pooled.dtype)
        if guidance is not None:  # the transformer scales t and guidance by 1000 itself; do the same here
            temb = model.time_text_embed(t0 * 1000, guidance.to(pooled.dtype) * 1000, pooled)
        else:
            temb = model.time_text_embed(t0 * 1000, pooled)
        try:
            for cond in state.conditions:
                state.mode, state.slot, state.weight = "condition", cond.slot, self.slots[cond.slot].weight
                x = model.x_embedder(_match(cond.latents.to(model.x_embedder.weight.dtype), batch))
                rope = model.pos_embed(cond.ids)
                empty = x.new_zeros(batch, 0, x.shape[-1])
                for block in model.transformer_blocks:
                    _, x = block(hidden_states=x, encoder_hidden_states=empty, temb=temb, image_rotary_emb=rope)
                for block in model.single_transformer_blocks:
                    _, x = block(hidden_states=x, encoder_hidden_states=empty, temb=temb, image_rotary_emb=rope)
                state.passes += 1
        finally:
            state.mode = "noise"


# ---------------------------------------------------------------------------------------------- images


def spatial_ids(cond_latent_hw: tuple[int, int], noise_latent_hw: tuple[int, int]) -> torch.Tensor:
    """RoPE ids of a spatial condition: its packed grid spread over the noise grid (``resize_position_encoding``)."""
    (hc, wc), (hn, wn) = cond_latent_hw, noise_latent_hw
    ids = torch.zeros(hc // 2, wc // 2, 3)
    ids[..., 1] = torch.arange(hc // 2)[:, None] * (hn / hc)
    ids[..., 2] = torch.arange(wc // 2)[None, :] * (wn / wc)
    return ids.reshape(-1, 3)


def subject_ids(cond_latent_hw: tuple[int, int]) -> torch.Tensor:
    """RoPE ids of a subject condition: integer grid, rows offset by 64 (``prepare_latent_subject_ids`` + 64)."""
    hc, wc = cond_latent_hw
    ids = torch.zeros(hc // 2, wc // 2, 3)
    ids[..., 1] = torch.arange(hc // 2)[:, None] + SUBJECT_ROW_OFFSET
    ids[..., 2] = torch.arange(wc // 2)[None, :]
    return ids.reshape(-1, 3)


def _pil(image: Any) -> PIL.Image.Image:
    from .preprocessors import load_control_image

    return load_control_image(image)


def condition_pixels(image: Any, cond_size: int, subject: bool) -> torch.Tensor:
    """(1, 3, cond_size, cond_size) in [-1, 1]: spatial = straight resize; subject = aspect kept, grey padding."""
    img = _pil(image)
    if not subject:
        img = img.resize((cond_size, cond_size), PIL.Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None]
    w, h = img.size
    scale = cond_size / max(w, h)
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    arr = np.asarray(img.resize((nw, nh), PIL.Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    ph, pw = cond_size - nh, cond_size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def encode_condition(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels -> packed Flux latents (1, L, 4C): VAE mean, ``(z - shift) * scale``, 2x2 packing."""
    vae = pipe.vae
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    b, c, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


@torch.no_grad()
def generate(
    pipe: Any,
    prompt: str | list[str],
    spatial_images: Sequence[Any] = (),
    subject_images: Sequence[Any] = (),
    cond_size: int = 512,
    height: int = 768,
    width: int = 1024,
    use_cache: bool = True,
    **kwargs: Any,
) -> Any:
    """The official pipeline's call on a stock ``FluxPipeline``: conditions ``[subjects..., spatials...]`` use the
    installed LoRA slots in that order (as the official README requires); other arguments go to ``FluxPipeline``
    (``num_inference_steps``, ``guidance_scale``, ``generator``, ``max_sequence_length``, ``output_type``, ...)."""
    ec = getattr(pipe.transformer, _ATTR, None)
    if not isinstance(ec, FluxEasyControl):
        raise InputError("Install EasyControl LoRAs first: FluxEasyControl.install(pipe.transformer, [(path, 1.0)]).")
    n = len(subject_images) + len(spatial_images)
    if n == 0:
        raise InputError("Give at least one spatial or subject condition image.")
    if n > len(ec.slots):
        raise InputError(f"{n} condition images but only {len(ec.slots)} EasyControl LoRAs are installed.")
    factor = pipe.vae_scale_factor
    if cond_size % (factor * 2) or height % (factor * 2) or width % (factor * 2):
        raise InputError(f"cond_size, height and width must be multiples of {factor * 2} for this model.")
    hn, wn = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    hc = wc = 2 * (cond_size // (factor * 2))
    device = pipe._execution_device
    conditions = []
    for slot, (image, subject) in enumerate(
        [(im, True) for im in subject_images] + [(im, False) for im in spatial_images]
    ):
        latents = encode_condition(pipe, condition_pixels(image, cond_size, subject)).to(device)
        ids = subject_ids((hc, wc)) if subject else spatial_ids((hc, wc), (hn, wn))
        conditions.append(FluxCondition(latents, ids.to(device=device, dtype=latents.dtype), slot))
    ec.set_conditions(conditions, use_cache)
    try:
        return pipe(prompt, height=height, width=width, **kwargs)
    finally:
        ec.clear()
