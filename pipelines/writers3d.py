"""Point-cloud files: PLY and GLB writers (plain numpy, no extra dependency), a PLY reader, a PNG preview.

* PLY (binary little-endian or ASCII): ``vertex`` elements with float ``x y z`` and optional uchar
  ``red green blue``; what MeshLab, CloudCompare, Open3D, Blender and trimesh read. The generation record is
  summarised in ``comment`` lines.
* GLB (binary glTF 2.0): either a ``POINTS`` primitive (mode 0, the exact cloud) or, for viewers that draw
  points one pixel wide (gradio's ``Model3D``), a small octahedron per point (``style="spheres"``). Colours
  are ``COLOR_0``; the full generation record sits in ``asset.extras.dit_studio``.
* ``save_point_cloud`` writes the chosen formats plus ``<name>.json`` (the record) beside them, each
  atomically (temporary file, then rename), so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GLB_MAGIC = 0x46546C67  # "glTF"
GLB_JSON = 0x4E4F534A  # "JSON"
GLB_BIN = 0x004E4942  # "BIN\0"
FORMATS = ("ply", "glb")


def _check_points(points: Any) -> np.ndarray:
    pts = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise ValueError(f"points must be a non-empty (N, 3) array, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    return pts


def _check_colors(colors: Any, n: int) -> np.ndarray | None:
    if colors is None:
        return None
    c = np.asarray(colors)
    if c.shape != (n, 3):
        raise ValueError(f"colors must be (N, 3) for {n} points, got {c.shape}")
    if c.dtype.kind == "f":
        c = np.clip(np.round(c * 255), 0, 255)
    return c.astype(np.uint8)


def height_colors(points: np.ndarray, axis: int = 1) -> np.ndarray:
    """A blue-to-orange ramp along ``axis`` (y, up): a depth cue that makes a rotated cloud easy to read."""
    v = points[:, axis]
    t = (v - v.min()) / max(float(v.max() - v.min()), 1e-9)
    low, high = np.array([0.16, 0.38, 0.85]), np.array([0.98, 0.55, 0.15])
    return (low[None] * (1 - t[:, None]) + high[None] * t[:, None]).astype(np.float32)


def _atomic_write(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- PLY


def ply_bytes(points: Any, colors: Any = None, comments: Sequence[str] = (), binary: bool = True) -> bytes:
    """A PLY file's bytes: float32 x y z (+ uchar red green blue) per vertex."""
    pts = _check_points(points)
    col = _check_colors(colors, len(pts))
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0"]
    for c in comments:
        header.append("comment " + " ".join(str(c).split()))  # one line each, no newlines
    header += [f"element vertex {len(pts)}", "property float x", "property float y", "property float z"]
    if col is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    head = ("\n".join(header) + "\n").encode("ascii", errors="replace")
    if binary:
        fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
        if col is not None:
            fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        rec = np.empty(len(pts), dtype=fields)
        rec["x"], rec["y"], rec["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
        if col is not None:
            rec["red"], rec["green"], rec["blue"] = col[:, 0], col[:, 1], col[:, 2]
        return head + rec.tobytes()
    rows = [
        " ".join([*(f"{v:.7g}" for v in p), *((str(int(x)) for x in col[i]) if col is not None else ())])
        for i, p in enumerate(pts)
    ]
    return head + ("\n".join(rows) + "\n").encode("ascii")


def write_ply(path: str | Path, points: Any, colors: Any = None, comments: Sequence[str] = (), binary: bool = True):
    """Write a PLY point cloud (atomically); returns the path."""
    return _atomic_write(Path(path), ply_bytes(points, colors, comments, binary))


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def read_ply(path: str | Path, max_vertices: int = 50_000_000) -> np.ndarray:
    """The (N, 3) float32 ``x y z`` of a PLY file's vertices (ASCII or binary; faces and other elements ignored).

    For user data (point-cloud folders for training) as much as for our own files; refuses anything it cannot
    read with a message that says why, rather than returning garbage.
    """
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path} is not a PLY file (no 'ply' magic or 'end_header')")
    body_start = data.index(b"\n", end) + 1
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt = next((ln.split()[1] for ln in lines if ln.startswith("format ")), None)
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: unsupported PLY format {fmt!r}")
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for ln in lines:
        parts = ln.split()
        if parts[:1] == ["element"]:
            elements.append((parts[1], int(parts[2]), []))
        elif parts[:1] == ["property"] and elements:
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], "list"))
            elif parts[1] in _PLY_TYPES:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise ValueError(f"{path}: unknown PLY property type {parts[1]!r}")
    if not elements or elements[0][0] != "vertex":
        raise ValueError(f"{path}: the first PLY element is not 'vertex'")
    _, count, props = elements[0]
    names = [n for n, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(t == "list" for _, t in props):
        raise ValueError(f"{path}: vertices need float x, y, z properties (and no list properties)")
    if count > max_vertices:
        raise ValueError(f"{path} has {count} vertices; the limit is {max_vertices}")
    if fmt == "ascii":
        rows = data[body_start:].decode("ascii", errors="replace").split("\n")[:count]
        table = np.array([[float(v) for v in r.split()[: len(names)]] for r in rows], dtype=np.float64)
        if table.shape != (count, len(names)):
            raise ValueError(f"{path}: expected {count} vertex rows of {len(names)} values")
        cols = {n: table[:, i] for i, n in enumerate(names)}
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(n, order + t) for n, t in props])
        need = dtype.itemsize * count
        if len(data) - body_start < need:
            raise ValueError(f"{path} is truncated: {count} vertices need {need} bytes")
        rec = np.frombuffer(data, dtype=dtype, count=count, offset=body_start)
        cols = {n: rec[n] for n in names}
    pts = np.stack([cols["x"], cols["y"], cols["z"]], axis=1).astype(np.float32)
    return pts


# ---------------------------------------------------------------------------------------------- GLB

_OCTA_VERTS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float32)
_OCTA_FACES = np.array(
    [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]], dtype=np.uint32
)


def glb_bytes(
    points: Any,
    colors: Any = None,
    style: str = "points",
    point_radius: float | None = None,
    extras: dict[str, Any] | None = None,
) -> bytes:
    """A binary glTF 2.0 file holding the cloud as ``POINTS`` or as one octahedron per point (``"spheres"``).

    ``point_radius`` defaults to 0.6 % of the bounding-box diagonal. Colours (float RGB in [0, 1] or uint8)
    become a float ``COLOR_0`` (linear, as glTF specifies), multiplied with a white unlit-looking material.
    """
    if style not in ("points", "spheres"):
        raise ValueError(f"style must be 'points' or 'spheres', got {style!r}")
    pts = _check_points(points)
    col = _check_colors(colors, len(pts))
    col_f = None if col is None else (col.astype(np.float32) / 255.0) ** 2.2  # sRGB -> linear (approximately)
    if style == "spheres":
        diag = float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0))) or 1.0
        r = point_radius if point_radius is not None else 0.006 * diag
        positions = (pts[:, None, :] + r * _OCTA_VERTS[None]).reshape(-1, 3)
        indices = (_OCTA_FACES[None] + 6 * np.arange(len(pts), dtype=np.uint32)[:, None, None]).reshape(-1)
        vcol = None if col_f is None else np.repeat(col_f, 6, axis=0)
        mode = 4  # TRIANGLES
    else:
        positions, indices, vcol, mode = pts, None, col_f, 0  # POINTS
    chunks: list[bytes] = []
    views, accessors = [], []

    def add(array: np.ndarray, target: int, component: int, kind: str, minmax: bool = False) -> int:
        offset = sum(len(c) for c in chunks)
        raw = np.ascontiguousarray(array).tobytes()
        chunks.append(raw + b"\0" * ((-len(raw)) % 4))
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(raw), "target": target})
        acc: dict[str, Any] = {
            "bufferView": len(views) - 1,
            "componentType": component,
            "count": int(array.shape[0]),
            "type": kind,
        }
        if minmax:
            acc["min"] = [float(v) for v in array.min(axis=0)]
            acc["max"] = [float(v) for v in array.max(axis=0)]
        accessors.append(acc)
        return len(accessors) - 1

    attributes = {"POSITION": add(positions.astype(np.float32), 34962, 5126, "VEC3", minmax=True)}
    if vcol is not None:
        attributes["COLOR_0"] = add(vcol.astype(np.float32), 34962, 5126, "VEC3")
    primitive: dict[str, Any] = {"attributes": attributes, "mode": mode, "material": 0}
    if indices is not None:
        primitive["indices"] = add(indices.astype(np.uint32), 34963, 5125, "SCALAR")
    binary = b"".join(chunks)
    gltf: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "DiT Studio"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "point_cloud"}],
        "meshes": [{"primitives": [primitive], "name": "point_cloud"}],
        "materials": [
            {
                "pbrMetallicRoughness": {
                    "baseColorFactor": [1, 1, 1, 1],
                    "metallicFactor": 0.0,
                    "roughnessFactor": 1.0,
                },
                "doubleSided": True,
            }
        ],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    if extras:
        gltf["asset"]["extras"] = extras
    text = json.dumps(gltf, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * ((-len(text)) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return b"".join(
        [
            struct.pack("<III", GLB_MAGIC, 2, total),
            struct.pack("<II", len(text), GLB_JSON),
            text,
            struct.pack("<II", len(binary), GLB_BIN),
            binary,
        ]
    )


def write_glb(path: str | Path, points: Any, colors: Any = None, style: str = "points", **kwargs: Any) -> Path:
    """Write a GLB point cloud (atomically); returns the path. See ``glb_bytes``."""
    return _atomic_write(Path(path), glb_bytes(points, colors, style, **kwargs))


def read_glb_json(path: str | Path) -> tuple[dict, bytes]:
    """The JSON and BIN chunks of a GLB file (checked against its header), for tests and tools."""
    data = Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC or version != 2 or total != len(data):
        raise ValueError(f"{path} is not a GLB 2.0 file (magic/version/length mismatch)")
    jlen, jtype = struct.unpack_from("<II", data, 12)
    if jtype != GLB_JSON:
        raise ValueError(f"{path}: the first GLB chunk is not JSON")
    gltf = json.loads(data[20 : 20 + jlen])
    binary = b""
    if 20 + jlen < len(data):
        blen, btype = struct.unpack_from("<II", data, 20 + jlen)
        if btype != GLB_BIN:
            raise ValueError(f"{path}: the second GLB chunk is not BIN")
        binary = data[28 + jlen : 28 + jlen + blen]
    return gltf, binary


# ---------------------------------------------------------------------------------------------- preview


def render_png(
    points: Any,
    size: int = 256,
    azimuth: float = 35.0,
    elevation: float = 20.0,
    colors: Any = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Any:
    """A PIL image of the cloud seen from (azimuth, elevation) degrees, y up, nearer points drawn darker/larger.

    An orthographic splat renderer (no GPU, no extra package) for validation grids, docs and UI previews.
    """
    from PIL import Image

    pts = _check_points(points).astype(np.float64)
    pts = pts - (pts.max(axis=0) + pts.min(axis=0)) / 2
    scale = float(np.abs(pts).max()) or 1.0
    a, e = np.radians(azimuth), np.radians(elevation)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    view = pts @ (rx @ ry).T / scale
    col = height_colors(pts) if colors is None else np.asarray(colors, dtype=np.float32)
    if col.dtype != np.float32 or col.max() > 1.0:
        col = col.astype(np.float32) / 255.0
    depth = (view[:, 2] - view[:, 2].min()) / max(float(np.ptp(view[:, 2])), 1e-9)  # 1 = nearest
    shade = 0.55 + 0.45 * depth
    order = np.argsort(view[:, 2])  # far to near, so near points are painted last
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(background, dtype=np.float32) / 255.0
    half = size / 2
    px = np.clip((view[:, 0] * 0.9 * half + half).astype(int), 0, size - 1)
    py = np.clip((-view[:, 1] * 0.9 * half + half).astype(int), 0, size - 1)
    radius = max(1, size // 200)
    for i in order:
        x, y = px[i], py[i]
        img[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = col[i] * shade[i]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- all together


def record_comments(record: Any) -> list[str]:
    """Short PLY comment lines naming what made the cloud (the full record goes in the JSON beside it)."""
    if record is None:
        return ["generated by DiT Studio"]
    return [
        "generated by DiT Studio",
        f"model {record.model} hash {record.model_hash or '-'}",
        f"class {record.class_name or record.class_label} seed {record.seed} steps {record.steps} "
        f"guidance {record.guidance_scale} scheduler {record.scheduler}",
    ]


def save_point_cloud(
    points: Any,
    path_stem: str | Path,
    record: Any = None,
    formats: Sequence[str] = FORMATS,
    glb_style: str = "spheres",
    colors: Any = "height",
) -> dict[str, Path]:
    """Write ``<stem>.ply`` / ``<stem>.glb`` and the record as ``<stem>.json``; returns {format: path}.

    ``colors="height"`` colours by height (as the UI shows it); ``None`` writes no colours.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown point-cloud format(s) {unknown}; choose from {', '.join(FORMATS)}")
    pts = _check_points(points)
    col = height_colors(pts) if isinstance(colors, str) and colors == "height" else colors
    stem = Path(path_stem)
    out: dict[str, Path] = {}
    if "ply" in formats:
        out["ply"] = write_ply(stem.parent / f"{stem.name}.ply", pts, col, record_comments(record))
    if "glb" in formats:
        extras = {"dit_studio": record.to_dict()} if record is not None else None
        out["glb"] = write_glb(stem.parent / f"{stem.name}.glb", pts, col, glb_style, extras=extras)
    if record is not None:
        out["json"] = _atomic_write(stem.parent / f"{stem.name}.json", record.to_json(indent=2).encode("utf-8"))
    return out
