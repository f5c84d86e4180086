"""The ``var``, ``dimr`` and ``vdt`` kinds of ``python -m dit.convert``: official checkpoints of the other backbones.

Each kind runs the converter of its module (``var_original``, ``dimr_original``, ``vdt_original``: strict key
checks, files read only through ``safe_load``) and writes, where the inputs make one possible, a whole pipeline
directory that ``pipelines.load_pipeline`` (and the UI's catalog) loads; otherwise only ``OUT_DIR/transformer/``:

* ``var SRC OUT_DIR --vae vae_ch160v4096z32.pth``: a ``VARPipeline`` (transformer + VQ-VAE, both official files).
  Without ``--vae``, the transformer alone (VAR cannot sample without its own VQ-VAE).
* ``dimr SRC OUT_DIR [--vae SD_VAE_DIR]``: with a local diffusers ``AutoencoderKL`` folder (the SD VAE the released
  models were trained on, ``stabilityai/sd-vae-ft-ema``), a ``ClassToImagePipeline`` with the SD scaled-linear
  schedule; without it, the transformer.
* ``vdt SRC OUT_DIR [--vae SD_VAE_DIR]``: likewise a ``VideoPipeline`` with VDT's linear schedule.

This module is separate from ``__main__`` so the kinds of other converters can be added there independently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .common import save_transformer, sha256_of
from .safe_load import expect_safetensors, sniff_format

BACKBONE_KINDS = ["var", "dimr", "vdt"]

# The noise schedules the released models were trained with (DiMR: Stable Diffusion's; VDT: DiT's).
SCHEDULES = {
    "dimr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "vdt": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
}

COMPANIONS = {
    "var": (
        "a VAR pipeline also needs its VQ-VAE: run again with --vae vae_ch160v4096z32.pth (FoundationVision/var) to "
        "write a VARPipeline that load_pipeline and the UI load"
    ),
    "dimr": (
        "a DiMR pipeline also needs the SD VAE (stabilityai/sd-vae-ft-ema, scaling 0.18215): run again with --vae "
        "pointing at a local copy of it for a ClassToImagePipeline (the paper's CFG 0.4 is guidance_scale=1.4)"
    ),
    "vdt": (
        "a VDT pipeline also needs the SD VAE (stabilityai/sd-vae-ft-ema or sd-vae-ft-mse): run again with --vae "
        "pointing at a local copy of it for a VideoPipeline"
    ),
}


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only these kinds take (the shared ones, --config/--num-heads/--non-ema/--dtype, are reused)."""
    parser.add_argument(
        "--vae",
        type=Path,
        help="var: the official VQ-VAE file (vae_ch160v4096z32.pth); dimr/vdt: a local diffusers AutoencoderKL "
        "folder (config.json + .safetensors, e.g. stabilityai/sd-vae-ft-ema). With it a whole pipeline is written",
    )
    parser.add_argument(
        "--id2label", type=Path, help="var/dimr: JSON file {id: 'name, synonym'} with the class names for the UI"
    )


def load_vae_folder(path: Path) -> Any:
    """A diffusers ``AutoencoderKL`` from a local folder (or a pipeline folder's ``vae/``), safetensors only."""
    from diffusers import AutoencoderKL

    if path.is_file():
        raise ValueError(
            f"--vae {path} is a file; for dimr/vdt give the diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors), e.g. a download of stabilityai/sd-vae-ft-ema"
        )
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae {path}: no config.json there; give a diffusers AutoencoderKL folder")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"--vae {path} has no .safetensors weights (pickled .bin VAEs are not loaded)")
    for file in weights:
        expect_safetensors(file)  # a pickle named .safetensors is refused before anything reads it
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    return vae.eval()


def _read_id2label(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--id2label {path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--id2label {path} must hold an object {{id: 'name, synonym'}}")
    return {str(k): str(v) for k, v in data.items()}


def _source(path: Path) -> dict[str, Any]:
    return {"source": path.name, "source_format": sniff_format(path), "source_sha256": sha256_of(path)}


def _scheduler(kind: str) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="epsilon", **SCHEDULES[kind])


def convert_backbone(args: argparse.Namespace) -> tuple[Path, str]:
    """Convert ``args.src`` of ``args.kind``; returns (what was written, a message for the user).

    Raises the converters' errors (``KeyMismatchError``, ``CheckpointFormatError``, ``UnsafeCheckpointError``: all
    ``ValueError``) and ``FileNotFoundError``; ``main`` prints them.
    """
    src: Path = args.src
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a file; {args.kind} converts the official checkpoint file")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    id2label = _read_id2label(args.id2label)
    record: dict[str, Any] = {"kind": args.kind, **_source(src)}
    pipe: Any = None
    if args.kind == "var":
        from .var_original import convert_var_pipeline, convert_var_transformer

        if args.config_name or args.non_ema:
            raise ValueError(
                "var reads its config from the weights and its files hold one set of weights; drop --config / --non-ema"
            )
        if args.vae is not None:
            if not args.vae.is_file():
                raise FileNotFoundError(f"--vae {args.vae} is not a file; var takes the official VQ-VAE .pth")
            pipe = convert_var_pipeline(args.vae, src, args.num_heads, id2label)
            record["vae"] = _source(args.vae)
        else:
            transformer = convert_var_transformer(src, args.num_heads)
    elif args.kind == "dimr":
        from .dimr_original import convert_dimr_original

        transformer = convert_dimr_original(src, args.config_name, args.num_heads, ema=not args.non_ema)
        record["weights"] = "non-ema" if args.non_ema else "ema-preferred"
    elif args.kind == "vdt":
        from .vdt_original import convert_vdt_original

        transformer = convert_vdt_original(src, args.config_name, args.num_heads, ema=not args.non_ema)
        record["weights"] = "non-ema" if args.non_ema else "ema-preferred"
    else:
        raise ValueError(f"{args.kind!r} is not one of {', '.join(BACKBONE_KINDS)}")

    if pipe is None and args.vae is not None:  # dimr / vdt with a VAE folder: a whole pipeline
        vae = load_vae_folder(args.vae)
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ValueError(
                f"--vae {args.vae} has {vae.config.latent_channels} latent channels; the {args.kind} model takes "
                f"{transformer.config.in_channels}. Use the VAE the model was trained with (the SD VAE)."
            )
        record["vae"] = {"source": str(args.vae)}
        if args.kind == "dimr":
            from pipelines.class_to_image import ClassToImagePipeline

            if transformer.config.num_classes is None:
                raise ValueError(
                    "this DiMR checkpoint is text-conditioned; a pipeline needs its text encoder, so convert without "
                    "--vae (transformer only) and assemble a TextToImagePipeline"
                )
            pipe = ClassToImagePipeline(
                transformer=transformer, scheduler=_scheduler("dimr"), vae=vae, id2label=id2label
            )
        else:
            from pipelines.video import VideoPipeline

            pipe = VideoPipeline(transformer=transformer, scheduler=_scheduler("vdt"), vae=vae)

    if pipe is None:
        target = save_transformer(transformer, args.out_dir, record, dtype)
        params = sum(p.numel() for p in transformer.parameters())
        return target, (
            f"Wrote {type(transformer).__name__} ({params / 1e6:.1f}M parameters) to {target}\n"
            f"Only the transformer was written: {COMPANIONS[args.kind]}."
        )
    if dtype is not None:
        pipe.transformer.to(dtype)  # the VAE stays as loaded: decoding in half precision is where artefacts start
    out = Path(args.out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "conversion.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return out, (
        f"Wrote {type(pipe).__name__} ({params / 1e6:.1f}M transformer parameters) to {out}\n"
        f"Load it with pipelines.load_pipeline({str(out)!r}) or put it under assets/models/ for the UI."
    )
