"""Control-map preprocessors: a user's image in, a control map out, under one name shared by UI, batch and training.

    from control.preprocessors import run_preprocessor, list_preprocessors
    edges = run_preprocessor("canny", "photo.jpg")                  # PIL RGB, white edges on black
    masked = run_preprocessor("inpaint", image, mask="mask.png")   # the image with the region to repaint in black

Every name here means the same thing wherever it is used: the training script records the preprocessor of an adapter
in the adapter file, the UI pre-selects it, and the batch CLI applies it per row. That is why they live in one table
(:data:`PREPROCESSORS`) instead of being re-implemented by each caller.

The built-in preprocessors need no downloaded weights, so they work on any machine: ``canny`` (OpenCV's algorithm:
3x3 Sobel, L1 magnitude, per-pixel strongest colour channel, non-maximum suppression, hysteresis), ``softedge``
(multi-scale smoothed gradient magnitude, a weight-free stand-in for HED/PiDiNet soft edges), ``scribble`` (coarse,
thickened edges of a blurred image), ``sketch`` (dark lines on white), ``grayscale`` (for colourisation),
``inpaint`` (the image with the region to repaint filled black, as EasyControl's inpainting condition is),
``blur`` (a low-frequency "tile" map), ``palette`` (a coarse colour layout) and ``none`` (the image already is a
map). ``depth`` and ``pose`` need model weights; they are listed only as unavailable, with the fix, unless the
weights are on this machine (``DIT_STUDIO_DEPTH_MODEL`` / ``DIT_STUDIO_POSE_MODEL``, see :func:`unavailable_reason`).

Inputs of any kind are accepted and normalised the same way: a path, bytes, a PIL image of any mode (RGBA and LA
are composited on white, CMYK/P/16-bit converted, EXIF orientation applied) or a numpy array; an unreadable or
truncated file is an :class:`~pipelines.errors.InputError` naming the file, never a crash. Preprocessors return an
RGB image of the input's size (a control map is fed to the model as an RGB image).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.errors import InputError

__all__ = [
    "PREPROCESSORS",
    "PreprocessorInfo",
    "PreprocessorUnavailable",
    "available_preprocessors",
    "inpaint_mask",
    "list_preprocessors",
    "load_control_image",
    "run_preprocessor",
    "unavailable_reason",
]

MAX_PIXELS = 64 * 1024 * 1024  # as training.data.images: refuse decompression bombs before decoding
DEPTH_ENV = "DIT_STUDIO_DEPTH_MODEL"
POSE_ENV = "DIT_STUDIO_POSE_MODEL"
IMAGE_LIKE = "a path, bytes, a PIL image or an HxW / HxWxC uint8 numpy array"


class PreprocessorUnavailable(InputError):
    """A preprocessor needs model weights this machine does not have; the message says how to provide them."""


@dataclass(frozen=True)
class PreprocessorInfo:
    name: str
    title: str
    description: str
    fn: Callable[..., Image.Image] = field(repr=False, compare=False)
    needs_weights: bool = False
    params: tuple[str, ...] = ()  # keyword parameters the function accepts besides the image


# ---------------------------------------------------------------------------------------------- input images


def load_control_image(source: Any, what: str = "control image") -> Image.Image:
    """Any supported image source -> an upright RGB PIL image, or :class:`InputError` saying what is wrong."""
    from training.data.images import BadImageError, load_image, to_rgb

    if isinstance(source, Image.Image):
        w, h = source.size
        if w < 1 or h < 1:
            raise InputError(f"The {what} is empty ({w}x{h} pixels).")
        if w * h > MAX_PIXELS:
            raise InputError(f"The {what} is {w}x{h}; images above {MAX_PIXELS} pixels are refused.")
        try:
            upright = ImageOps.exif_transpose(source) or source
            return to_rgb(upright).copy()
        except (OSError, ValueError) as e:
            raise InputError(f"The {what} ({source.mode} image) cannot be converted to RGB: {e}") from None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"The {what} {path} does not exist.")
        try:
            return load_image(path, MAX_PIXELS)
        except BadImageError as e:
            raise InputError(f"The {what} {path.name} cannot be used: {e.reason}.") from None
    if isinstance(source, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(bytes(source))) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise InputError(f"The {what} is {im.size[0]}x{im.size[1]}; the limit is {MAX_PIXELS} pixels.")
                im.load()
                return load_control_image(im.copy(), what)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"The {what} is not a readable image ({type(e).__name__}: {e}).") from None
    if isinstance(source, np.ndarray):
        return load_control_image(_array_to_pil(source, what), what)
    raise InputError(f"The {what} must be {IMAGE_LIKE}; got {type(source).__name__}.")


def _array_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"The {what} array has shape {arr.shape}; expected HxW, HxWx1, HxWx3 or HxWx4.")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise InputError(f"The {what} array must be uint8 (0..255) or float (0..1), got {arr.dtype}.")
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


# ---------------------------------------------------------------------------------------------- helpers


def _tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float (1, 3, H, W) in 0..255."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(1, C, H, W) or (H, W) float in 0..255 -> RGB PIL."""
    if x.ndim == 2:
        x = x[None, None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    arr = x[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, C, H, W), reflect padding (as OpenCV's default border)."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma)
    r = k.numel() // 2
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel derivatives per channel of (1, C, H, W) with OpenCV's default border (reflect-101)."""
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
    xp = F.pad(x, (1, 1, 1, 1), mode=mode)
    gx = F.conv2d(xp, _SOBEL_X.view(1, 1, 3, 3).repeat(c, 1, 1, 1), groups=c)
    gy = F.conv2d(xp, _SOBEL_X.t().contiguous().view(1, 1, 3, 3).repeat(c, 1, 1, 1), groups=c)
    return gx, gy


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius) > 0


def _check_range(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}.")
    return v


# ---------------------------------------------------------------------------------------------- edges


def canny_edges(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV ``Canny(img, low, high)`` (aperture 3, L1 gradient) on (1, C, H, W) 0..255 -> bool (H, W).

    As OpenCV does for colour input, each pixel uses the channel with the largest gradient magnitude; there is no
    pre-blur (ControlNet's annotator calls cv2.Canny on the raw image too, with thresholds 100/200).
    """
    gx, gy = _sobel(x)
    mag = gx.abs() + gy.abs()
    best = mag.argmax(dim=1, keepdim=True)
    gx, gy, mag = (t.gather(1, best)[0, 0] for t in (gx, gy, mag))
    h, w = mag.shape
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees (OpenCV's tan rule).
    padded = F.pad(mag[None, None], (1, 1, 1, 1))[0, 0]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = gx.abs(), gy.abs()
    tan22 = math.tan(math.radians(22.5))
    horizontal = ay <= ax * tan22  # gradient along x: compare left/right
    vertical = ay > ax / tan22  # gradient along y: compare up/down
    diag_same = (gx * gy) > 0  # both derivatives of one sign: the 45 degree diagonal (image y points down)
    keep = torch.zeros_like(mag, dtype=torch.bool)
    keep |= horizontal & (mag > shifted(0, -1)) & (mag >= shifted(0, 1))
    keep |= vertical & (mag > shifted(-1, 0)) & (mag >= shifted(1, 0))
    diag = ~horizontal & ~vertical
    keep |= diag & diag_same & (mag > shifted(-1, -1)) & (mag >= shifted(1, 1))
    keep |= diag & ~diag_same & (mag > shifted(-1, 1)) & (mag >= shifted(1, -1))
    weak = keep & (mag > low)
    edges = keep & (mag > high)
    # Hysteresis: grow strong edges through 8-connected weak ones until nothing changes.
    for _ in range(h * w):
        grown = _dilate(edges[None, None], 1)[0, 0] & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200) -> Image.Image:
    """White 1-pixel edges on black (OpenCV Canny; thresholds on the L1 Sobel magnitude, as cv2 and ControlNet)."""
    low = _check_range("low_threshold", low_threshold, 0, 2040)
    high = _check_range("high_threshold", high_threshold, 0, 2040)
    if low > high:
        raise InputError(f"low_threshold ({low:g}) must not exceed high_threshold ({high:g}).")
    edges = canny_edges(_tensor(image), low, high)
    return _to_pil(edges.float() * 255)


def _soft_edge_map(image: Image.Image) -> torch.Tensor:
    """Soft edge strength in 0..1, (H, W): smoothed gradient magnitude at two scales, robustly normalised."""
    gray = _tensor(image.convert("L").convert("RGB"))[:, :1]
    side = max(image.size)
    total = torch.zeros(gray.shape[-2:])
    for sigma in (0.5 * max(1.0, side / 256), 1.5 * max(1.0, side / 256)):
        gx, gy = _sobel(_blur(gray, sigma))
        total += torch.sqrt(gx**2 + gy**2)[0, 0]
    scale = torch.quantile(total.flatten(), 0.99).clamp_min(1e-6) if total.numel() > 1 else total.max().clamp_min(1)
    return (total / scale).clamp(0, 1) ** 0.8


def softedge(image: Image.Image) -> Image.Image:
    """Soft white edges on black: a weight-free stand-in for HED/PiDiNet soft-edge maps."""
    return _to_pil(_soft_edge_map(image) * 255)


def scribble(image: Image.Image, threshold: float = 0.35) -> Image.Image:
    """Coarse hand-drawn-like lines: soft edges thresholded and thickened (white on black)."""
    t = _check_range("threshold", threshold, 0.0, 1.0)
    soft = _soft_edge_map(image)
    radius = round(max(image.size) / 128)  # 0 at emoji size; 1 px per 128 px of the long side above
    lines = _dilate((soft > t)[None, None], radius)[0, 0]
    return _to_pil(lines.float() * 255)


def sketch(image: Image.Image) -> Image.Image:
    """Dark pencil-like lines on white (inverted soft edges), the look of a line-art or sketch condition."""
    return _to_pil((1 - _soft_edge_map(image)) * 255)


# ---------------------------------------------------------------------------------------------- colour maps


def grayscale(image: Image.Image) -> Image.Image:
    """Luma (ITU-R 601-2, PIL's ``L``) replicated to RGB: the condition of a colourisation adapter."""
    return image.convert("L").convert("RGB")


def blur(image: Image.Image, sigma: float | None = None) -> Image.Image:
    """A strongly blurred copy (sigma = 1/16 of the long side by default): a "tile"/low-frequency condition."""
    s = max(image.size) / 16 if sigma is None else _check_range("sigma", sigma, 0.0, 1000.0)
    return _to_pil(_blur(_tensor(image), s))


def palette(image: Image.Image, cells: int = 8) -> Image.Image:
    """The image's colour layout: averaged over a cells x cells grid and shown as flat blocks."""
    n = int(_check_range("cells", cells, 1, 256))
    w, h = image.size
    small = image.resize((min(n, w), min(n, h)), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


def identity(image: Image.Image) -> Image.Image:
    """The image is already a control map (e.g. exported from another tool): used as is."""
    return image


# ---------------------------------------------------------------------------------------------- inpainting


def inpaint_mask(size: tuple[int, int], mask: Any = None, seed: int | None = None) -> np.ndarray:
    """Bool (H, W) array, True where the image is to be repainted.

    ``mask`` may be an image (white or opaque = repaint; resized to ``size`` with nearest neighbour), a bool/0-1
    array, ``"center"`` (a centred box of half the width and height, the default) or ``"random"`` (one or two random
    boxes covering roughly a quarter to a half of the image, from ``seed``: what training draws per example).
    """
    w, h = size
    if mask is None or (isinstance(mask, str) and mask == "center"):
        out = np.zeros((h, w), bool)
        out[h // 4 : h // 4 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = True
        return out
    if isinstance(mask, str) and mask == "random":
        rng = np.random.default_rng(seed)
        out = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 3))):
            bh = max(1, int(h * rng.uniform(0.3, 0.7)))
            bw = max(1, int(w * rng.uniform(0.3, 0.7)))
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            out[top : top + bh, left : left + bw] = True
        return out
    if isinstance(mask, np.ndarray) and mask.ndim == 2 and (mask.dtype == bool or mask.max(initial=0) <= 1):
        arr = mask.astype(bool)
        if arr.shape != (h, w):
            arr = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
        return arr
    if isinstance(mask, str) and not Path(mask).exists():
        raise InputError(f"mask must be an image, 'center' or 'random'; {mask!r} is none of these.")
    if isinstance(mask, Image.Image) and mask.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(mask.getchannel("A")) > 127  # a drawn layer: opaque strokes are the mask
        rgb = np.asarray(mask.convert("L")) > 127
        arr = alpha & rgb if rgb[alpha].any() else alpha
        img = Image.fromarray(arr.astype(np.uint8) * 255)
    else:
        img = load_control_image(mask, "inpainting mask").convert("L")
        arr = np.asarray(img) > 127
    if arr.shape != (h, w):
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    return arr


def inpaint(image: Image.Image, mask: Any = None, seed: int | None = None) -> Image.Image:
    """The image with the region to repaint filled black: EasyControl's inpainting condition (``test_imgs``)."""
    region = inpaint_mask(image.size, mask, seed)
    if not region.any():
        raise InputError("The inpainting mask is empty: paint (white) the region to regenerate.")
    arr = np.asarray(image).copy()
    arr[region] = 0
    return Image.fromarray(arr, mode="RGB")


# ---------------------------------------------------------------------------------------------- weights-based


def _weights_dir(env: str, default_name: str) -> Path | None:
    value = os.environ.get(env)
    candidates = [Path(value).expanduser()] if value else []
    candidates.append(Path.home() / ".cache" / "dit-studio" / "preprocessors" / default_name)
    for path in candidates:
        if path.is_dir() and any(path.iterdir()):
            return path
    return None


def _depth_reason() -> str | None:
    if _weights_dir(DEPTH_ENV, "depth") is None:
        return (
            "depth needs a depth-estimation model on this machine (e.g. Intel/dpt-hybrid-midas or "
            "depth-anything/Depth-Anything-V2-Small-hf in transformers format). Download it where there is network "
            f"access, copy the folder here and set {DEPTH_ENV}=/path/to/folder (or put it in "
            "~/.cache/dit-studio/preprocessors/depth)."
        )
    return None


def _pose_reason() -> str | None:
    try:
        import controlnet_aux  # noqa: F401
    except ImportError:
        return (
            "pose needs the controlnet_aux package and the OpenPose annotator weights (lllyasviel/Annotators). "
            f"pip install controlnet-aux, copy the weights folder here and set {POSE_ENV}=/path/to/folder."
        )
    if _weights_dir(POSE_ENV, "pose") is None:
        return f"pose needs the OpenPose annotator weights (lllyasviel/Annotators): set {POSE_ENV}=/path/to/folder."
    return None


_DEPTH_PIPE: dict[str, Any] = {}


def depth(image: Image.Image) -> Image.Image:
    """Relative depth (near = white) from a local transformers depth-estimation model."""
    reason = _depth_reason()
    if reason:
        raise PreprocessorUnavailable(reason)
    from transformers import pipeline

    path = str(_weights_dir(DEPTH_ENV, "depth"))
    if path not in _DEPTH_PIPE:
        _DEPTH_PIPE[path] = pipeline("depth-estimation", model=path, device="cpu")
    out = _DEPTH_PIPE[path](image)["predicted_depth"]
    d = out.reshape(1, 1, *out.shape[-2:]).float()
    d = F.interpolate(d, size=(image.height, image.width), mode="bicubic", align_corners=False)[0, 0]
    d = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-6)
    return _to_pil(d * 255)


def pose(image: Image.Image) -> Image.Image:
    """OpenPose skeleton on black from controlnet_aux with local annotator weights."""
    reason = _pose_reason()
    if reason:
        raise PreprocessorUnavailable(reason)
    from controlnet_aux import OpenposeDetector  # type: ignore[import-not-found]

    detector = OpenposeDetector.from_pretrained(str(_weights_dir(POSE_ENV, "pose")))
    return load_control_image(detector(image), "pose map").resize(image.size)


# ---------------------------------------------------------------------------------------------- the table

PREPROCESSORS: dict[str, PreprocessorInfo] = {
    p.name: p
    for p in [
        PreprocessorInfo("none", "None (already a control map)", "Use the image as the control map.", identity),
        PreprocessorInfo(
            "canny",
            "Canny edges",
            "Thin white edges on black (OpenCV Canny).",
            canny,
            params=("low_threshold", "high_threshold"),
        ),
        PreprocessorInfo("softedge", "Soft edges", "Soft white edges on black (HED-like, no weights).", softedge),
        PreprocessorInfo(
            "scribble", "Scribble", "Coarse thick lines, like a quick drawing.", scribble, params=("threshold",)
        ),
        PreprocessorInfo("sketch", "Sketch / line art", "Dark pencil-like lines on white.", sketch),
        PreprocessorInfo("grayscale", "Grayscale", "The image in grey, for colourisation.", grayscale),
        PreprocessorInfo(
            "inpaint",
            "Inpainting mask",
            "The image with the region to repaint in black.",
            inpaint,
            params=("mask", "seed"),
        ),
        PreprocessorInfo(
            "blur", "Blur (tile)", "A strongly blurred copy: keeps layout and colours.", blur, params=("sigma",)
        ),
        PreprocessorInfo(
            "palette", "Colour palette", "Flat colour blocks of the image's layout.", palette, params=("cells",)
        ),
        PreprocessorInfo("depth", "Depth", "Relative depth, near = white (needs local weights).", depth, True),
        PreprocessorInfo("pose", "Pose (OpenPose)", "Human pose skeleton (needs local weights).", pose, True),
    ]
}
_REASONS: dict[str, Callable[[], str | None]] = {"depth": _depth_reason, "pose": _pose_reason}


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run here; otherwise why not and how to fix it."""
    if name not in PREPROCESSORS:
        return f"unknown preprocessor {name!r}; available: {', '.join(available_preprocessors())}"
    check = _REASONS.get(name)
    return check() if check else None


def list_preprocessors() -> list[PreprocessorInfo]:
    """Every preprocessor, available or not (the UI shows unavailable ones with their reason)."""
    return list(PREPROCESSORS.values())


def available_preprocessors() -> list[str]:
    return [name for name in PREPROCESSORS if unavailable_reason(name) is None]


def run_preprocessor(name: str | None, image: Any, **params: Any) -> Image.Image:
    """Apply preprocessor ``name`` (None or ``"none"``: identity) to any image source; returns an RGB image of the
    same size. Unknown names, unknown parameters, unavailable weights and unreadable images raise InputError."""
    key = "none" if name in (None, "") else str(name).strip().lower()
    info = PREPROCESSORS.get(key)
    if info is None:
        raise InputError(f"Unknown preprocessor {name!r}. Choose one of: {', '.join(available_preprocessors())}.")
    reason = unavailable_reason(key)
    if reason:
        raise PreprocessorUnavailable(f"The {key} preprocessor is not available here: {reason}")
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        allowed = ", ".join(info.params) or "none"
        raise InputError(f"Preprocessor {key} does not take {', '.join(unknown)} (its parameters: {allowed}).")
    img = load_control_image(image)
    out = info.fn(img, **params)
    return out if out.mode == "RGB" else out.convert("RGB")
