"""``python -m dit.convert {dit,dit-diffusers,pixart,pixart-controlnet,relactrl} SRC OUT_DIR``: official checkpoints
-> our diffusers models (control kinds: ``OUT_DIR/controls/<name>.safetensors``, plus the base transformer when the
file carries one).

Writes only ``OUT_DIR/transformer/`` (config.json + safetensors + conversion.json). The VAE, text encoder,
tokenizer and scheduler are ordinary diffusers downloads; the printed message names the hub ids to combine.

The backbone kinds ``var``, ``dimr`` and ``vdt`` (``cli_backbones.py``) write a whole pipeline directory when given
the VAE (``--vae``: VAR's official VQ-VAE file; the SD VAE folder for DiMR and VDT), else ``OUT_DIR/transformer/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .cli_backbones import BACKBONE_KINDS, add_backbone_arguments, convert_backbone
from .common import save_transformer, sha256_of
from .dit_original import convert_diffusers_dit, convert_dit_original
from .pixart_original import convert_pixart_original
from .safe_load import CheckpointFormatError, UnsafeCheckpointError, sniff_format

COMPANIONS = {
    "dit": (
        "a DiT pipeline also needs the VAE 'stabilityai/sd-vae-ft-ema' (or 'stabilityai/sd-vae-ft-mse'), "
        "scaling 0.18215, and a DDPM linear-beta scheduler (e.g. the 'scheduler' of 'facebook/DiT-XL-2-256')"
    ),
    "alpha": (
        "a PixArt-alpha pipeline also needs the T5 'text_encoder' + 'tokenizer' and the 'vae' of "
        "'PixArt-alpha/PixArt-XL-2-512x512' (or PixArt-XL-2-1024-MS), and a DPM-Solver scheduler"
    ),
    "sigma": (
        "a PixArt-Sigma pipeline also needs the T5 'text_encoder' + 'tokenizer' and the SDXL 'vae' of "
        "'PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers', and a DPM-Solver scheduler"
    ),
}

#: Control checkpoints: official PixArt-δ ControlNet .pth or the diffusers research-project layout; official RelaCtrl.
CONTROL_KINDS = ["pixart-controlnet", "relactrl"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit.convert",
        description=(
            "Convert an official DiT / diffusers-DiT / PixArt-alpha/sigma checkpoint into a DiT Studio "
            "diffusers-format transformer. Files are recognised by their bytes (safetensors, torch zip, legacy "
            "torch); pickles are loaded only with torch.load(weights_only=True)."
        ),
        epilog=(
            "Only OUT_DIR/transformer/ is written: the VAE and text encoder are separate diffusers downloads. "
            "DiT: combine with the VAE stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse). PixArt-alpha: text encoder, "
            "tokenizer and VAE from PixArt-alpha/PixArt-XL-2-512x512. PixArt-sigma: from "
            "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers. var/dimr/vdt: with --vae a whole pipeline is written "
            "(python -m dit.convert var var_d16.pth OUT --vae vae_ch160v4096z32.pth)."
        ),
    )
    parser.add_argument(
        "kind", choices=["dit", "dit-diffusers", "pixart", *CONTROL_KINDS, *BACKBONE_KINDS], help="source layout"
    )
    parser.add_argument("src", type=Path, help="checkpoint file (.pt/.pth/.bin/.safetensors) or diffusers folder")
    parser.add_argument("out_dir", type=Path, help="output folder; the model goes to OUT_DIR/transformer/")
    parser.add_argument(
        "--config", dest="config_name", help="config name to check against: DiT-XL/2 (dit), DiMR-XL/2R, VDT-L/2"
    )
    parser.add_argument("--image-size", type=int, help="training image size in pixels (latent = size / 8)")
    parser.add_argument("--version", choices=["alpha", "sigma"], help="PixArt version (decides pe interpolation)")
    parser.add_argument("--num-heads", type=int, help="attention heads, if not the standard ones for the width")
    parser.add_argument("--interpolation-scale", type=float, help="PixArt position interpolation override")
    parser.add_argument("--non-ema", action="store_true", help="use the raw weights where a file has EMA and raw")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="save in this dtype (default: as is)")
    parser.add_argument("--name", help="control kinds: adapter name, OUT_DIR/controls/NAME.safetensors")
    parser.add_argument("--preprocessor", help="control kinds: the preprocessor the adapter expects (e.g. canny)")
    parser.add_argument("--positions", help="relactrl: comma-separated base blocks the control blocks follow")
    parser.add_argument("--seed", type=int, default=0, help="relactrl: shuffle seed recorded in the adapter")
    add_backbone_arguments(parser)  # var / dimr / vdt: --vae, --id2label (dit/convert/cli_backbones.py)
    return parser


def convert_control(args: argparse.Namespace) -> dict[str, Path]:
    """The control kinds: write the adapter (and the base transformer when the file has ``base_model.*``)."""
    from .pixart_controlnet import convert_pixart_controlnet, write_converted_adapter
    from .relactrl_original import convert_relactrl_original

    ema = not args.non_ema
    version = args.version or "alpha"
    if args.kind == "pixart-controlnet":
        base, tensors, config = convert_pixart_controlnet(
            args.src, args.image_size, version, args.num_heads, ema, args.interpolation_scale
        )
        kind, default_name = "controlnet", "controlnet"
    else:
        positions = [int(p) for p in args.positions.split(",")] if args.positions else None
        base, tensors, config = convert_relactrl_original(
            args.src, args.image_size, positions, args.seed, version, args.num_heads, ema, args.interpolation_scale
        )
        kind, default_name = "relactrl", "relactrl"
    if base is not None and args.dtype:
        base = base.to(_DTYPES[args.dtype])
    src = args.src if args.src.is_file() else None
    return write_converted_adapter(
        kind, base, tensors, config, args.out_dir, args.name or default_name, src, args.preprocessor
    )


def convert(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """Run the chosen converter; return the model, a provenance record and the companion message."""
    ema = not args.non_ema
    src: Path = args.src
    record: dict[str, Any] = {"kind": args.kind, "source": src.name, "weights": "ema-preferred" if ema else "non-ema"}
    if src.is_file():
        record["source_format"] = sniff_format(src)
        record["source_sha256"] = sha256_of(src)
    if args.kind == "dit":
        model = convert_dit_original(src, args.config_name, args.image_size, args.num_heads, ema=ema)
        companions = COMPANIONS["dit"]
    elif args.kind == "dit-diffusers":
        model = convert_diffusers_dit(src, None, args.image_size, args.num_heads, ema=ema)
        companions = COMPANIONS["dit"]
    else:
        model = convert_pixart_original(
            src, args.image_size, args.version, args.num_heads, args.interpolation_scale, ema=ema
        )
        both = f"{COMPANIONS['alpha']}; for PixArt-Sigma, {COMPANIONS['sigma']}"
        companions = COMPANIONS[args.version] if args.version else both
        record["version"] = args.version
    return model, record, companions


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind in BACKBONE_KINDS or args.vae is not None or args.id2label is not None:
        try:
            if args.kind not in BACKBONE_KINDS:
                raise ValueError(
                    f"--vae and --id2label apply to the kinds {', '.join(BACKBONE_KINDS)}, not {args.kind}"
                )
            _, message = convert_backbone(args)
        except (CheckpointFormatError, UnsafeCheckpointError, FileNotFoundError, NotImplementedError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(message)
        return 0
    if args.kind in CONTROL_KINDS:
        try:
            written = convert_control(args)
        except (CheckpointFormatError, UnsafeCheckpointError, FileNotFoundError, NotImplementedError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for what, path in written.items():
            print(f"Wrote the {what} to {path}")
        print(f"Use it: python -m pipelines.control --base MODEL --adapter {written['adapter']} --out DIR")
        return 0
    try:
        model, record, companions = convert(args)
    except (CheckpointFormatError, UnsafeCheckpointError, FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = save_transformer(model, args.out_dir, record, _DTYPES.get(args.dtype) if args.dtype else None)
    params = sum(p.numel() for p in model.parameters())
    print(f"Wrote {type(model).__name__} ({params / 1e6:.1f}M parameters) to {target}")
    print(f"Only the transformer was written: {companions}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
