"""Copy a finished run's ``pipeline/`` into ``assets/models/<name>/`` with a model card, as the defaults ship.

    python -m training.promote runs/emoji-t2i assets/models/emoji-t2i

The card records the training config, the cost (steps, wall time from ``losses.jsonl``'s run, machine) and the
parameter counts, so anyone can tell what a shipped default is and retrain it with the same command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml


def parameter_count(pipeline_dir: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {}
    for weights in sorted(pipeline_dir.glob("*/*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            total = 0
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
        counts[weights.parent.name] = counts.get(weights.parent.name, 0) + total
    return counts


def model_card(run: Path, target: Path, name: str, note: str) -> str:
    config = yaml.safe_load((run / "pipeline" / "training_config.yaml").read_text())
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    counts = parameter_count(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    params = ", ".join(f"{k}: {v / 1e6:.2f}M" for k, v in counts.items())
    return f"""# {name}

A DiT Studio shipped default ({config["kind"]}), trained by `training/train.py` from
`training/configs/{name}.yaml` on `data/emoji` (`python -m training.data.emoji --out data/emoji --size 32`).

- parameters: {params}; files: {size / 1e6:.1f} MB
- training: {len(losses)} steps, batch {config["optim"]["batch_size"]}, final loss {losses[-1]["loss"]:.4f}
  (mean of the last 50: {sum(x["loss"] for x in losses[-50:]) / min(50, len(losses)):.4f})
- retrain: `accelerate launch -m training.train --config training/configs/{name}.yaml`

{note}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training output_dir holding pipeline/")
    parser.add_argument("target", type=Path, help="assets/models/<name>")
    parser.add_argument("--note", default="", help="text appended to the model card")
    args = parser.parse_args(argv)
    source = args.run / "pipeline"
    if not (source / "model_index.json").is_file():
        print(f"error: {source} holds no finished pipeline (model_index.json)", file=sys.stderr)
        return 2
    tmp = args.target.with_name(args.target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / "README.md").write_text(model_card(args.run, tmp, args.target.name, args.note))
    shutil.rmtree(args.target, ignore_errors=True)
    tmp.rename(args.target)
    print(f"{args.target}: {parameter_count(args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
