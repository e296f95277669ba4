"""Load test of the app: concurrent ``gradio_client`` users against ``shusheng demo``'s app on 127.0.0.1.

    python bench/app_load.py                           # 8 clients, 500 mixed requests, at most 600 s
    python bench/app_load.py --requests 40 --max-seconds 120   # a quick check

The app runs in a child process, as ``shusheng demo`` builds it (:func:`shusheng.apps.gradio_app.build_demo` +
:func:`~shusheng.apps.gradio_app.launch_demo`): ``--n`` SynthDrive scenes indexed with the bundled
``shusheng-mini-clip``, the Caption & VQA tab on the bundled ``shusheng-mini-uniperceiver``, a password (a random
one per run), the default limits (:class:`shusheng.apps.safety.AppLimits`: 2 requests at once, queue of 64). It
listens on 127.0.0.1 only. The clients, each with its own ``gradio_client.Client`` (signed in), send a fixed
random mix of requests (``--mix``: text search, image search with an uploaded SynthDrive test scene, caption,
ask) and time each one.

Reported per kind and overall: requests, errors (an exception, or an answer that is an error message; target 0),
p50 / p99 latency of the concurrent run and its p50 over the same kind's p50 with one client, measured first in
the same run (``--baseline`` requests of each kind); the server's resident memory after warm-up and at the end
(target: flat; growth = end − after warm-up, and the spread over the second half of the run). The first
``--warmup`` requests of the concurrent run count in the totals but not in latency or memory. Bounded: at most
``--requests`` requests and ``--max-seconds`` seconds (requests not sent by then are left out and counted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

KINDS = ("text_search", "image_search", "caption", "ask")
QUERIES = ("a red car", "a rainy street at night", "a bus in the fog", "people crossing the road", "a stop sign",
           "a green traffic light", "a truck on a sunny day")
QUESTIONS = ("Is it raining?", "Is it night?", "Is there a bus?", "What color is the traffic light?",
             "How many cars are there?")


# ---------------------------------------------------------------------------------------------------- the server
def _serve(n: int, cache: str, user: str, password: str) -> None:
    """Child process: build and serve the app on 127.0.0.1, print ``{"url", "pid"}`` once ready, serve until
    stdin closes."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ["SHUSHENG_CACHE_DIR"] = cache
    from shusheng.apps.demo import sample_collection
    from shusheng.apps.gradio_app import build_demo, launch_demo
    from shusheng.retrieval_index import create_embedder, index_folder

    embedder = create_embedder("shusheng-mini-clip")
    folder = sample_collection(n)
    index_path = folder / ".shusheng-index"
    index_folder(folder, index_path, embedder=embedder, progress=False)
    demo = build_demo(index_path, embedder, folder=folder, title="Shusheng load test")
    url = launch_demo(demo, host="127.0.0.1", port=_free_port(), auth=[(user, password)])
    print(json.dumps({"url": url, "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # until the parent closes it
    demo.close()
    demo.search_app.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


# ---------------------------------------------------------------------------------------------------- the clients
def _plan(count: int, mix: dict[str, float], seed: int) -> list[tuple[str, int]]:
    """``count`` requests ``(kind, variant)`` drawn with the ``mix`` weights (fixed by ``seed``)."""
    rng = random.Random(seed)
    kinds, weights = zip(*mix.items())
    return [(rng.choices(kinds, weights)[0], rng.randrange(1000)) for _ in range(count)]


class Clients:
    """One signed-in ``gradio_client.Client`` per thread; :meth:`call` runs one request and times it."""

    def __init__(self, url: str, auth: tuple[str, str], images: list[str]):
        self.url, self.auth, self.images = url, auth, images
        self._local = threading.local()

    def _client(self):
        import gradio_client

        if getattr(self._local, "client", None) is None:
            self._local.client = gradio_client.Client(self.url, auth=self.auth, verbose=False, download_files=False,
                                                      analytics_enabled=False)
        return self._local.client

    def call(self, kind: str, variant: int) -> tuple[float, str | None]:
        """``(seconds, error or None)``."""
        from gradio_client import handle_file

        client = self._client()
        image = handle_file(self.images[variant % len(self.images)])
        t0 = time.perf_counter()
        try:
            if kind == "text_search":
                gallery, status = client.predict(QUERIES[variant % len(QUERIES)], None, 5, 0.0, "",
                                                 api_name="/search")
                error = None if "result" in status else f"unexpected status {status!r}"
            elif kind == "image_search":
                gallery, status = client.predict("", image, 5, 0.0, "", api_name="/search")
                error = None if gallery else f"no result: {status!r}"
            elif kind == "caption":
                text, _ = client.predict(image, 1, api_name="/caption")
                error = None if "(score" in text else f"caption: {text!r}"
            else:
                text, _, _ = client.predict(image, QUESTIONS[variant % len(QUESTIONS)], "match", api_name="/ask")
                error = None if "(score" in text else f"answer: {text!r}"
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            error = f"{type(e).__name__}: {e}"
        return time.perf_counter() - t0, error


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=500, help="requests of the concurrent run (default 500)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long (default 600)")
    p.add_argument("--warmup", type=int, default=None, help="first requests left out of latency and memory "
                                                           "(default: 10%% of --requests, at least 8)")
    p.add_argument("--baseline", type=int, default=5, help="one-client requests of each kind first (default 5)")
    p.add_argument("--mix", default="text_search=0.4,image_search=0.2,caption=0.2,ask=0.2")
    p.add_argument("--n", type=int, default=100, help="scenes in the searched collection (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--serve", nargs=4, metavar=("N", "CACHE", "USER", "PASSWORD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(int(args.serve[0]), *args.serve[1:])
        return 0
    reexec_with_bench_env()
    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    if set(mix) - set(KINDS):
        p.error(f"--mix kinds are {', '.join(KINDS)}")
    warmup = args.warmup if args.warmup is not None else max(8, args.requests // 10)

    from shusheng.data import TEST_SEED, sample

    user, password = "bench", secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="shusheng-app-load-") as tmp:
        images = []
        for i in range(16):
            path = Path(tmp) / f"query{i:02d}.png"
            sample(TEST_SEED, i, 128)[0].save(path)
            images.append(os.fspath(path))
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed in finally
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(args.n), os.fspath(Path(tmp) / "cache"),
                                   user, password], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                  text=True)
        try:
            line = server.stdout.readline()
            if not line:
                raise SystemExit(f"the app did not start:\n{(Path(tmp) / 'server.log').read_text()[-4000:]}")
            info = json.loads(line)
            assert info["url"].startswith("http://127.0.0.1:"), info  # loopback only
            clients = Clients(info["url"], (user, password), images)
            print(f"app at {info['url']} (pid {info['pid']}), {_rss_mb(info['pid']):.0f} MB; "
                  f"baseline: {args.baseline} one-client requests of each kind", flush=True)

            baseline: dict[str, list[float]] = {k: [] for k in KINDS}
            base_errors = []
            for kind in KINDS:
                if mix.get(kind, 0) <= 0:
                    continue
                clients.call(kind, 0)  # first call of a kind: model warm-up, not timed
                for i in range(args.baseline):
                    seconds, error = clients.call(kind, i + 1)
                    baseline[kind].append(seconds)
                    if error:
                        base_errors.append(error)

            plan = _plan(args.requests, mix, args.seed)
            results: list[tuple[int, str, float, str | None]] = []
            memory: list[tuple[int, float]] = []
            lock = threading.Lock()
            deadline = time.monotonic() + args.max_seconds
            skipped = 0

            def one(i: int, kind: str, variant: int) -> None:
                nonlocal skipped
                if time.monotonic() > deadline:
                    with lock:
                        skipped += 1
                    return
                seconds, error = clients.call(kind, variant)
                with lock:
                    results.append((i, kind, seconds, error))
                    done = len(results)
                    if done == warmup or done % 10 == 0 or done == len(plan):
                        memory.append((done, _rss_mb(info["pid"])))

            print(f"{args.clients} clients, {len(plan)} requests ({args.mix}), warm-up {warmup}", flush=True)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                for future in [pool.submit(one, i, kind, variant) for i, (kind, variant) in enumerate(plan)]:
                    future.result()
            wall = time.perf_counter() - t0
        finally:
            server.stdin.close()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()

    results.sort()
    timed = [r for r in results if r[0] >= warmup]
    rows = []
    for kind in [*KINDS, "all"]:
        mine = [r for r in results if kind in ("all", r[1])]
        if not mine:
            continue
        lat = [r[2] * 1000 for r in timed if kind in ("all", r[1]) and r[3] is None]
        base = [s * 1000 for k, v in baseline.items() if kind in ("all", k) for s in v]
        p50, p99, p50_one = _percentile(lat, 50), _percentile(lat, 99), statistics.median(base) if base else None
        rows.append({"kind": kind, "requests": len(mine), "errors": sum(r[3] is not None for r in mine),
                     "p50_ms": round(p50) if lat else None, "p99_ms": round(p99) if lat else None,
                     "p50_1client_ms": round(p50_one) if p50_one else None,
                     "ratio": round(p50 / p50_one, 2) if lat and p50_one else None})
    after_warmup = next((mb for done, mb in memory if done >= warmup), memory[0][1] if memory else float("nan"))
    second_half = [mb for done, mb in memory if done >= len(results) / 2] or [after_warmup]
    meta = {**machine_info(), "clients": args.clients, "requests_planned": len(plan), "requests_sent": len(results),
            "not_sent_time_limit": skipped, "wall_s": round(wall, 1),
            "throughput_rps": round(len(results) / wall, 2) if wall else None, "mix": mix, "warmup": warmup,
            "scenes": args.n, "baseline_errors": base_errors,
            "server_rss_mb": {"after_warmup": round(after_warmup, 1), "end": round(memory[-1][1], 1) if memory
                              else None, "growth": round(memory[-1][1] - after_warmup, 1) if memory else None,
                              "second_half_spread": round(max(second_half) - min(second_half), 1),
                              "samples": [(d, round(mb, 1)) for d, mb in memory]},
            "errors": [{"request": i, "kind": k, "error": e[:300]} for i, k, _, e in results if e][:20]}
    md = write_results("app_load", rows, [("kind", "kind"), ("requests", "requests"), ("errors", "errors"),
                                          ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                                          ("p50_1client_ms", "p50 ms, 1 client"), ("ratio", "p50 / 1 client")],
                       args.out, meta)
    print(md)
    rss = meta["server_rss_mb"]
    print(f"\n{len(results)} requests in {wall:.1f} s ({meta['throughput_rps']} /s), {skipped} not sent (time limit); "
          f"server RSS {rss['after_warmup']} MB after warm-up -> {rss['end']} MB at the end (growth "
          f"{rss['growth']} MB; spread over the second half {rss['second_half_spread']} MB)")
    for e in meta["errors"][:5]:
        print(f"error: request {e['request']} ({e['kind']}): {e['error']}")
    return 0 if not any(r["errors"] for r in rows) and not base_errors else 1


if __name__ == "__main__":
    sys.exit(main())
