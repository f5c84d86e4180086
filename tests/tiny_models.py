"""Tiny random models in real checkpoint layouts, for tests that must run on a 2-core CPU in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "face",
    "smiling",
    "grinning",
    "heart",
    "star",
    "sun",
    "moon",
    "tree",
    "car",
    "with",
    "and",
    "the",
]


def tiny_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.model_max_length = max_length
    return fast


def tiny_t5(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(cfg).eval()


def tiny_vae(seed: int = 0, factor_blocks: int = 2) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * factor_blocks,
        up_block_types=("UpDecoderBlock2D",) * factor_blocks,
        block_out_channels=(8,) * factor_blocks,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random-init models start with zeroed output layers; perturb every weight so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_pixart(sample_size: int = 16, seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=16,
    )
    return perturb(model, seed=seed).eval()


def tiny_diffusers_dit(sample_size: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=sample_size,
        num_embeds_ada_norm=1000,
    )
    return perturb(model, seed=seed).eval()


def save_stock_pixart(path: Path, sigma: bool = False, sample_size: int = 16, vae_blocks: int = 2) -> Path:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5(),
        vae=tiny_vae(factor_blocks=vae_blocks),
        transformer=tiny_pixart(sample_size),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_stock_dit(path: Path, sample_size: int = 8) -> Path:
    from diffusers import DiTPipeline

    pipe = DiTPipeline(
        transformer=tiny_diffusers_dit(sample_size),
        vae=tiny_vae(),
        scheduler=DDIMScheduler(),
    )
    pipe.save_pretrained(path)
    # The hub's facebook/DiT-XL-2-256 keeps ImageNet names in model_index.json; save_pretrained does not.
    index = Path(path) / "model_index.json"
    data = json.loads(index.read_text())
    data["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark, white shark"}
    index.write_text(json.dumps(data, indent=2))
    return Path(path)


def tiny_text_pipeline(sample_size: int = 8, seed: int = 0):
    """Our TextToImagePipeline, pixel space (no VAE), as the shipped defaults are."""
    from dit import TextDiTModel
    from pipelines import TextToImagePipeline

    torch.manual_seed(seed)
    transformer = TextDiTModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        caption_channels=16,
    )
    perturb(transformer, seed=seed)
    return TextToImagePipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5(seed),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
        max_sequence_length=16,
    )


def tiny_class_pipeline(sample_size: int = 8, seed: int = 0, num_classes: int = 4):
    from dit import DiTModel
    from pipelines import ClassToImagePipeline

    torch.manual_seed(seed)
    transformer = DiTModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=3,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_classes=num_classes,
        learn_sigma=False,
    )
    perturb(transformer, seed=seed)
    names = {str(i): n for i, n in enumerate(["smileys", "animals", "food", "travel"][:num_classes])}
    return ClassToImagePipeline(transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler(), id2label=names)
