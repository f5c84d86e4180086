"""Fire N concurrent generation requests at a running DiT Studio app and report what happened to each.

    python benchmarks/ui_concurrency.py --url http://127.0.0.1:7860/ [--n 10] [--model NAME] [--steps 20]

or start an app in this process first (``--launch``, with the app's own flags after ``--``)::

    python benchmarks/ui_concurrency.py --launch -- --model path/to/pipeline --max-queue 4

Each request comes from its own ``gradio_client.Client`` (its own session, like separate browser tabs). A request is
"answered" when it returned images, "queued" when it waited in the server's queue before it ran, "rejected" when
the server refused it (queue full), "error" otherwise. Afterwards the server must still answer a cheap request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Outcome:
    index: int
    state: str = "pending"  # answered | rejected | error
    queued: bool = False
    max_rank: int | None = None
    seconds: float = 0.0
    detail: str = ""
    statuses: list[str] = field(default_factory=list)


def one_request(url: str, index: int, model: str, kind: str, steps: int, start: threading.Event) -> Outcome:
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError, Status

    outcome = Outcome(index)
    client = Client(url, verbose=False)
    start.wait()
    t0 = time.perf_counter()
    if kind == "text-to-image":
        job = client.submit(
            model=model, prompt=f"a red cat {index}", steps=steps, seed=index, api_name="/text_to_image"
        )
    else:
        job = client.submit(model=model, steps=steps, seed=index, api_name="/class_to_image")
    while not job.done():
        status = job.status()
        if status.code.value not in outcome.statuses:
            outcome.statuses.append(status.code.value)
        if status.code == Status.IN_QUEUE and status.rank is not None and status.rank > 0:
            outcome.queued = True
            outcome.max_rank = max(outcome.max_rank or 0, status.rank)
        time.sleep(0.02)
    try:
        result = job.result()
        outcome.state = "answered" if result and result[0] else "error"
        outcome.detail = result[3] if result else "no result"
    except QueueError as e:
        outcome.state, outcome.detail = "rejected", str(e)
    except AppError as e:
        full = "queue" in str(e).lower() and "full" in str(e).lower()
        outcome.state, outcome.detail = ("rejected" if full else "error"), str(e)
    except Exception as e:  # noqa: BLE001 (report whatever went wrong)
        full = "queue is full" in str(e).lower()
        outcome.state, outcome.detail = ("rejected" if full else "error"), f"{type(e).__name__}: {e}"
    outcome.seconds = time.perf_counter() - t0
    if Status.QUEUE_FULL.value in outcome.statuses:
        outcome.state = "rejected"
    return outcome


def run(url: str, n: int, model: str | None, steps: int) -> int:
    from gradio_client import Client

    models = Client(url, verbose=False).predict(api_name="/models")
    kind = "text-to-image" if models.get("text-to-image") else "class-to-image"
    if model is None:
        model = models[kind][0]["name"]
    else:
        kind = next(k for k, entries in models.items() if any(e["name"] == model for e in entries))
    print(f"{n} concurrent {kind} requests to {url} (model {model}, {steps} steps)")
    start = threading.Event()
    outcomes: list[Outcome] = [Outcome(i) for i in range(n)]

    def worker(i: int) -> None:
        try:
            outcomes[i] = one_request(url, i, model, kind, steps, start)
        except Exception as e:  # noqa: BLE001
            outcomes[i].state, outcomes[i].detail = "error", f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let every client connect, then fire together
    t0 = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    for o in outcomes:
        rank = f" (queue position up to {o.max_rank})" if o.queued else ""
        print(f"  #{o.index:02d} {o.state:9s} {o.seconds:6.2f} s{rank}  {o.detail[:80]}")
    answered = [o for o in outcomes if o.state == "answered"]
    summary = {s: sum(o.state == s for o in outcomes) for s in ("answered", "rejected", "error")}
    summary["queued"] = sum(o.queued for o in outcomes)
    print(
        f"answered {summary['answered']}, queued {summary['queued']}, rejected {summary['rejected']}, "
        f"errors {summary['error']} in {wall:.1f} s"
    )
    if answered:
        lat = sorted(o.seconds for o in answered)
        print(f"latency of answered: min {lat[0]:.2f} s, median {statistics.median(lat):.2f} s, max {lat[-1]:.2f} s")
    t1 = time.perf_counter()
    try:
        Client(url, verbose=False).predict(api_name="/models")
        print(f"server still answers: yes ({time.perf_counter() - t1:.2f} s)")
        alive = True
    except Exception as e:  # noqa: BLE001
        print(f"server still answers: NO ({type(e).__name__}: {e})")
        alive = False
    return 0 if alive and summary["error"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, app_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--n", type=int, default=10, help="concurrent requests (default 10)")
    p.add_argument("--model", default=None, help="default: the first text-to-image model the server lists")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--launch", action="store_true", help="start the app in this process with the flags after --")
    args = p.parse_args(argv)
    demo = None
    if args.launch:
        import app

        app_ns = app.parse_args(app_args)
        service = app.make_service(app_ns)
        demo = app.build_demo(service)
        _, url, _ = app.launch(demo, service, app_ns, prevent_thread_lock=True, quiet=True)
        args.url = url
        print(f"app started at {url} (concurrency {app_ns.concurrency}, max queue {app_ns.max_queue})")
    try:
        return run(args.url, args.n, args.model, args.steps)
    finally:
        if demo is not None:
            demo.close()


if __name__ == "__main__":
    sys.exit(main())
