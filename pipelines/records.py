"""Build one ``GenerationRecord`` per generated image from a pipeline call's settings."""

from __future__ import annotations

from typing import Any

from .metadata import GenerationRecord


def build_records(
    pipe: Any,
    count: int,
    seeds: list[int] | None,
    scheduler: Any,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    prompts: list[str] | None = None,
    negative_prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    class_names: list[str | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[GenerationRecord]:
    name, model_hash = pipe.model_identity()
    dtype = str(pipe.transformer.dtype).removeprefix("torch.")
    device = str(pipe._execution_device)
    adapters = list(getattr(pipe, "active_adapters_record", []) or [])
    records = []
    for i in range(count):
        records.append(
            GenerationRecord(
                pipeline=pipe.kind,
                model=name,
                model_hash=model_hash,
                prompt=prompts[i] if prompts else None,
                negative_prompt=negative_prompts[i] if negative_prompts else None,
                class_label=class_labels[i] if class_labels else None,
                class_name=class_names[i] if class_names else None,
                seed=seeds[i] if seeds is not None else -1,
                steps=steps,
                guidance_scale=guidance_scale,
                scheduler=pipe.scheduler_label(scheduler),
                width=width,
                height=height,
                batch_index=i,
                attention=pipe.attention_label(),
                adapters=adapters,
                dtype=dtype,
                device=device,
                generator_device="cpu" if seeds is not None else "caller",
                extra=dict(extra or {}),
            )
        )
    return records
