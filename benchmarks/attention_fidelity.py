"""What a training-free attention swap costs in fidelity: PSNR/SSIM against full attention, same seeds.

    OMP_NUM_THREADS=1 python benchmarks/attention_fidelity.py                    # shipped emoji-t2i, 32 and 64 px
    python benchmarks/attention_fidelity.py --model /path/to/PixArt-XL-2-512x512 --sizes 512 --steps 20
    python benchmarks/attention_fidelity.py --model emoji-dit --labels 0 1 2 3  # a class-conditional model

A model of ours in PixArt layout (``TextDiTModel``: the same parameter names) is loaded into diffusers' own
``PixArtTransformer2DModel`` first, so the swap runs on a *stock* diffusers transformer (the processors see
diffusers' ``BasicTransformerBlock``, and the grid comes from the pipeline's ``token_grid`` context). A stock
diffusers PixArt/DiT directory is used as it is; other models of ours run as they are.

For every variant and option set, each prompt x seed image is generated with the variant and compared with the
full-attention image of the same prompt and seed: PSNR (dB, on [0, 1] pixels) and SSIM (Wang et al. 2004,
11x11 Gaussian window, sigma 1.5, per channel, averaged). Time is the whole pipeline call relative to full
attention (single-thread CPU time; small models at small sizes are dominated by everything but attention).

Because a whole sampling run can land on a different mode after a small change, the table also gives the
one-step error: the relative L2 error of the transformer's prediction against full attention's, on the
full-attention images noised to t = 900, 700, 500, 300, 100 (fixed noise), which isolates the attention
approximation from the sampler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["grinning face", "red apple", "dog face", "rocket"]


def sweep(grid_side: int) -> list[str]:
    """Variant labels to compare, scaled to the token grid (windows and cells must fit it)."""
    out = []
    for w in (2, 4, 8):
        if w < grid_side:
            out += [f"window[window_size={w}]", f"shifted-window[window_size={w}]"]
    for w in (2, 4, 8):
        if w < grid_side:
            out += [f"proxy[window_size={w},local=false]", f"proxy[window_size={w},local=true]"]
    cells = [s for s in (2, 4) if s <= grid_side // 2]
    for s in cells:
        for ratio in (0.1, 0.25, 0.4, 0.5):
            out.append(f"agentsd[ratio={ratio},agent_ratio=0.95,sx={s},sy={s}]")
    for ratio in (0.1, 0.4):  # agent_ratio 0: agents never fewer than half the tokens -> ToMe alone, for contrast
        out.append(f"agentsd[ratio={ratio},agent_ratio=0,sx={cells[0]},sy={cells[0]}]")
    return out


def to_stock(pipe):  # noqa: ANN001 - a DiT Studio pipeline
    """Our PixArt-layout TextDiTModel -> diffusers' PixArtTransformer2DModel with the same weights (strict)."""
    from diffusers import PixArtTransformer2DModel

    from dit import TextDiTModel

    model = pipe.transformer
    if type(model) is not TextDiTModel:
        return pipe, type(model).__name__
    c = model.config
    stock = PixArtTransformer2DModel(
        num_attention_heads=c.num_attention_heads,
        attention_head_dim=c.attention_head_dim,
        in_channels=c.in_channels,
        out_channels=model.out_channels,
        num_layers=c.num_layers,
        cross_attention_dim=c.num_attention_heads * c.attention_head_dim,
        attention_bias=True,
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=c.norm_eps,
        interpolation_scale=c.interpolation_scale,
        use_additional_conditions=model.use_additional_conditions,
        caption_channels=c.caption_channels,
    )
    stock.load_state_dict(model.state_dict(), strict=True)
    pipe.transformer = stock.eval()  # DiffusionPipeline.__setattr__ updates the registered component
    return pipe, "PixArtTransformer2DModel (diffusers, weights of " + type(model).__name__ + ")"


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return np.outer(g, g)


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    k = kernel.shape[0]
    h, w = img.shape[0] - k + 1, img.shape[1] - k + 1
    out = np.zeros((h, w))
    for dy in range(k):
        for dx in range(k):
            out += kernel[dy, dx] * img[dy : dy + h, dx : dx + w]
    return out


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two HxWxC images in [0, 1] (Wang et al. 2004; K1 0.01, K2 0.03, Gaussian 11x11 sigma 1.5)."""
    kernel = _gaussian(min(11, a.shape[0], a.shape[1]) | 1)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _filter(x, kernel), _filter(y, kernel)
        sxx = _filter(x * x, kernel) - mx**2
        syy = _filter(y * y, kernel) - my**2
        sxy = _filter(x * y, kernel) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        values.append(s.mean())
    return float(np.mean(values))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def prediction_inputs(pipe, conditions: list, images: list, size: int) -> list[tuple]:  # noqa: ANN001
    """(x_t, t, condition kwargs) triples: the full-attention images noised to five timesteps (fixed noise)."""
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # q(x_t | x_0) of the model's training schedule
    gen = torch.Generator().manual_seed(1234)
    items = []
    per_cond = len(images) // len(conditions)
    for i, img in enumerate(images):
        x0 = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() * 2 - 1
        if getattr(pipe, "vae", None) is not None:
            x0 = pipe.vae.encode(x0.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
        cond = conditions[i // per_cond]
        if isinstance(cond, str):
            embeds, mask, _, _ = pipe.encode_prompt([cond], None, 1, pipe.config.max_sequence_length)
            kwargs = dict(
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )
        else:
            kwargs = dict(class_labels=torch.tensor([cond]))
        for t in (900, 700, 500, 300, 100):
            noise = torch.randn(x0.shape, generator=gen)
            xt = sched.add_noise(x0, noise, torch.tensor([t]))
            items.append((xt, torch.tensor([t]), kwargs))
    return items


def prediction_error(pipe, items: list[tuple], reference: list) -> tuple[float, list]:  # noqa: ANN001
    """Mean relative L2 error of the transformer's output against ``reference`` (None: compute the reference)."""
    import torch

    from dit.attention import token_grid

    outs, errs = [], []
    for j, (xt, t, kwargs) in enumerate(items):
        grid = (xt.shape[-2] // pipe.patch_size, xt.shape[-1] // pipe.patch_size)
        with token_grid(grid, timestep=t):
            out = pipe.transformer(xt, timestep=t, return_dict=False, **kwargs)[0][:, : xt.shape[1]]
        outs.append(out)
        if reference is not None:
            errs.append(float(torch.linalg.vector_norm(out - reference[j]) / torch.linalg.vector_norm(reference[j])))
    return (statistics.mean(errs) if errs else 0.0), outs


def generate(pipe, conditions: list, seeds: list[int], size: int, steps: int, guidance: float) -> tuple:  # noqa: ANN001
    images, start = [], time.process_time()
    for cond in conditions:
        for seed in seeds:
            kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="np")
            kwargs.update(height=size, width=size)
            if isinstance(cond, str):
                out = pipe(cond, use_resolution_binning=False, **kwargs)
            else:
                out = pipe(class_labels=[cond], **kwargs)
            images.append(out.images[0])
    return images, time.process_time() - start, out.records[0].attention


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="emoji-t2i", help="catalog name or pipeline directory")
    parser.add_argument("--sizes", type=int, nargs="*", help="image sides in pixels (default: 1x and 2x trained)")
    parser.add_argument("--prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--labels", nargs="*", type=int, help="class labels (class-to-image models)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--variants", nargs="*", help="labels to test (default: a sweep that fits the grid)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dit.attention import set_attention
    from pipelines import load_pipeline

    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe, what = to_stock(pipe)
    factor = pipe.vae_scale_factor * pipe.patch_size
    default = pipe.default_size()
    sizes = args.sizes or [default, 2 * default]
    conditions = args.labels if pipe.kind == "class-to-image" else args.prompts
    if pipe.kind == "class-to-image" and not conditions:
        conditions = list(range(min(4, pipe.num_classes)))
    print(f"model {args.model}: {what}; {len(conditions)} conditions x {len(args.seeds)} seeds, {args.steps} steps")
    results = []
    for size in sizes:
        side = size // factor
        set_attention(pipe, "sdpa")
        base, base_time, _ = generate(pipe, conditions, args.seeds, size, args.steps, args.guidance)
        items = prediction_inputs(pipe, conditions, base, size)
        _, reference = prediction_error(pipe, items, None)
        print(f"\n{size}x{size} px = {side}x{side} tokens ({side * side}); full attention {base_time:.1f} CPU s")
        print(f"{'variant':<52} {'PSNR dB':>8} {'SSIM':>6} {'pred err':>9} {'time':>6}")
        for label in args.variants or sweep(side):
            set_attention(pipe, label)
            imgs, seconds, recorded = generate(pipe, conditions, args.seeds, size, args.steps, args.guidance)
            p = statistics.mean(psnr(a, b) for a, b in zip(imgs, base))
            s = statistics.mean(ssim(a, b) for a, b in zip(imgs, base))
            err, _ = prediction_error(pipe, items, reference)
            ratio = seconds / base_time
            row = dict(size=size, tokens=side * side, variant=recorded, psnr=p, ssim=s, pred_err=err, time=ratio)
            results.append(row)
            print(f"{label:<52} {p:>8.2f} {s:>6.3f} {err:>9.3f} {ratio:>5.2f}x")
        set_attention(pipe, "sdpa")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
