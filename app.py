"""DiT Studio web UI: ``python app.py`` (or ``dit-studio``) serves every generator in the model catalog.

One tab per generator kind found in the catalog (tabs come from ``pipelines.ui_tabs``' registry), plus
"PNG info" (read parameters back from a generated PNG into the form) and "History" (this session's images).
Every action is an API endpoint usable with ``gradio_client``:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    paths, preview, seed, status, info = client.predict(
        model="tiny-t2i", prompt="a red cat", api_name="/text_to_image")

Safe by default: binds 127.0.0.1, models only from the catalog and ``--model`` paths (a request names a
model, never a path), the PNG upload of "PNG info" is the only upload (``max_file_size`` 20 MB), only the
output folder is served, a bounded queue with a concurrency limit, and bad input gets a message, not a crash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.catalog import ASSETS_MODELS, Catalog
from pipelines.errors import InputError, ModelLoadError
from pipelines.service import DEFAULT_MAX_PIXELS, MAX_UPLOAD_BYTES, GenerationService
from pipelines.ui_tabs import TabContext, discover, get_tab, history_items, session_of

log = logging.getLogger("dit-studio")

CSS = """
.pixelated img { image-rendering: pixelated; }
footer { visibility: hidden; }
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dit-studio", description="DiT Studio web UI: serves every generator in the model catalog."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASS",
        help="require a login (repeatable). Strongly advised with --share or a non-local --host.",
    )
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="extra catalog root: every sub-folder with a model_index.json is a model (repeatable); "
        "LoRA files are listed from DIR/loras/",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="an extra diffusers pipeline directory to serve (repeatable)",
    )
    p.add_argument("--no-default-models", action="store_true", help=f"do not serve the shipped {ASSETS_MODELS}")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs are saved (default ./outputs)")
    p.add_argument("--concurrency", type=int, default=1, help="generations running at once (default 1)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting at most; more are refused")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument("--cache-size", type=int, default=2, help="pipelines kept loaded at once (LRU)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest width*height served")
    args = p.parse_args(argv)
    for item in args.auth:
        if ":" not in item or not item.split(":", 1)[0] or not item.split(":", 1)[1]:
            p.error(f"--auth expects USER:PASS, got {item!r}")
    if args.concurrency < 1 or args.max_queue < 1:
        p.error("--concurrency and --max-queue must be at least 1")
    return args


def resolve_device(device: str | None, dtype: str) -> tuple[str, Any]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return device, torch.bfloat16
        return device, torch.float32
    return device, getattr(torch, dtype)


def make_service(args: argparse.Namespace) -> GenerationService:
    roots = ([] if args.no_default_models else [ASSETS_MODELS]) + list(args.models_dir)
    catalog = Catalog(roots=roots, extra_paths=list(args.model))
    device, dtype = resolve_device(args.device, args.dtype)
    return GenerationService(
        catalog,
        args.output_dir,
        device=device,
        torch_dtype=dtype,
        cache_size=args.cache_size,
        lora_dirs=[Path(r) / "loras" for r in roots],
        max_pixels=args.max_pixels,
    )


def build_demo(service: GenerationService) -> gr.Blocks:
    """The Blocks app: a tab per generator kind, PNG info, history, and API-only endpoints."""
    discover()

    def tab_order(kind: str) -> tuple:
        spec = get_tab(kind)
        return (spec.order if spec else 1000, kind)

    kinds = sorted(service.kinds(), key=tab_order)
    with gr.Blocks(title="DiT Studio", analytics_enabled=False) as demo:
        try:
            shown = service.output_dir.relative_to(Path.cwd())
        except ValueError:
            shown = Path(service.output_dir.name)
        gr.Markdown(
            "# DiT Studio\nDiffusion-transformer generators on diffusers. "
            f"Device `{service.device}` · PNGs keep their parameters and are saved in `{shown}/`."
        )
        history_gallery = gr.Gallery(
            label="This session's images (newest first)",
            columns=6,
            format="png",
            interactive=False,
            elem_classes=["pixelated"],
            render=False,
        )

        def refresh_history(request: gr.Request) -> list[tuple[str, str]]:
            """This session's generated images, newest first, as (path, caption)."""
            return history_items(service, request)

        handles: dict[str, Any] = {}
        titles: dict[str, str] = {}
        with gr.Tabs() as tabs:
            for kind in kinds:
                spec = get_tab(kind)
                titles[kind] = spec.title if spec else kind
                with gr.Tab(titles[kind], id=kind):
                    if spec is None:
                        gr.Markdown(
                            f"Models of kind **{kind}** are in the catalog "
                            f"({', '.join(service.model_names(kind))}), but no UI tab is registered for them yet."
                        )
                        continue
                    ctx = TabContext(
                        service=service,
                        kind=kind,
                        title=spec.title,
                        models=service.model_names(kind),
                        history_outputs=[history_gallery],
                        refresh_history=refresh_history,
                    )
                    handles[kind] = spec.builder(ctx)
            if not kinds:
                with gr.Tab("Models", id="no-models"):
                    gr.Markdown(
                        "No models found. Put diffusers pipeline folders in `assets/models/`, or start with "
                        "`python app.py --model PATH` (a folder holding `model_index.json`) or `--models-dir DIR`."
                    )
            with gr.Tab("PNG info", id="png-info"), gr.Row(equal_height=False):
                with gr.Column():
                    upload = gr.File(
                        label="A PNG generated by DiT Studio (A1111-style images work too)",
                        file_types=[".png", ".jpg", ".jpeg", ".webp"],
                        type="filepath",
                        elem_id="png-upload",
                    )
                    read = gr.Button("Read parameters into the form", variant="primary")
                    png_status = gr.Markdown()
                with gr.Column():
                    infotext = gr.Textbox(label="parameters (A1111 text)", lines=5, interactive=False)
                    record_json = gr.JSON(label="Generation record")
            with gr.Tab("History", id="history"):
                refresh = gr.Button("Refresh", size="sm")
                history_gallery.render()

        fill_outputs: list[Any] = []
        for handle in handles.values():
            fill_outputs += handle.fill_components

        def read_parameters(png: str | None, request: gr.Request) -> tuple:
            """Read the generation record from a PNG; returns (record, A1111 text, status, tab, *form fields)."""
            if not png:
                raise gr.Error("Upload a PNG first.", print_exception=False)
            try:
                record = service.read_parameters(png)
            except InputError as e:
                raise gr.Error(str(e), print_exception=False) from None
            values: list[Any] = []
            for kind, handle in handles.items():
                if kind == record.pipeline and handle.fill is not None:
                    values += handle.fill(record)
                else:
                    values += [gr.skip()] * len(handle.fill_components)
            if record.pipeline in handles:
                note = f"Filled the **{titles[record.pipeline]}** form."
                if record.model not in service.model_names(record.pipeline):
                    note += f" Model `{record.model}` is not served here; pick another model."
                tab = gr.Tabs(selected=record.pipeline)
            else:
                note = f"This image came from a `{record.pipeline}` generator, which this server does not serve."
                tab = gr.skip()
            return (record.to_dict(), record.to_a1111(), note, tab, *values)

        read.click(
            read_parameters,
            upload,
            [record_json, infotext, png_status, tabs, *fill_outputs],
            api_name="read_parameters",
            concurrency_limit=4,
        )
        refresh.click(refresh_history, None, history_gallery, api_name="history", concurrency_limit=None)

        def cancel(request: gr.Request) -> str:
            """Stop this session's running generations after their current step."""
            n = service.cancel(session_of(request))
            return f"Cancelled {n} running generation(s)." if n else "Nothing was running."

        def models() -> dict:
            """The models this server serves, by kind, with their size rules and classes."""
            out: dict[str, list[dict]] = {}
            for name in service.model_names():
                spec = service.spec(name)
                entry = {"name": name, "default_size": spec.default_size, "multiple": spec.multiple}
                entry["max_side"] = spec.max_side
                if spec.kind == "class-to-image":
                    entry["classes"] = spec.class_choices()
                out.setdefault(spec.kind, []).append(entry)
            return out

        gr.api(cancel, api_name="cancel", concurrency_limit=None)
        gr.api(models, api_name="models", concurrency_limit=None)
    return demo


def launch(demo: gr.Blocks, service: GenerationService, args: argparse.Namespace, **overrides: Any) -> Any:
    """Queue and serve ``demo`` with the safe defaults (see the module docstring)."""
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    service.output_dir.mkdir(parents=True, exist_ok=True)
    auth = [tuple(item.split(":", 1)) for item in args.auth] or None
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and not auth:
        log.warning("Serving beyond this machine without --auth: anyone who can reach it can generate.")
    # Model folders are never served, even if one sits under the working directory.
    blocked = sorted({str(entry.path) for entry in service.catalog.entries.values()})
    kwargs: dict[str, Any] = dict(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        share=args.share,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[str(service.output_dir)],
        blocked_paths=blocked,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        theme=gr.themes.Soft(),
        css=CSS,
    )
    kwargs.update(overrides)
    return demo.launch(**kwargs)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        service = make_service(args)
    except ModelLoadError as e:
        sys.exit(f"dit-studio: {e}")
    if not service.model_names():
        log.warning("No models found: pass --model PATH or --models-dir DIR (or ship models in %s).", ASSETS_MODELS)
    demo = build_demo(service)
    launch(demo, service, args)


if __name__ == "__main__":
    main()
