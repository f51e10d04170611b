"""`make bench-profile`: where Leaky Tokens' serving process spends its CPU on the metered path.

Starts the same stub and `leaky-tokens up` (embedded default) as `make bench-compare`, drives the
metered call through the gateway with wrk at 32 connections, and meanwhile samples the serving
process with py-spy (from bench/.venv) without stopping it (`record --nonblocking`, every
thread, idle samples left out). Writes, under bench/results/ (not committed):

* profile-<target>.speedscope.json: open it at speedscope.app, or with `py-spy`'s own viewer;
* profile-<target>.txt: the share of CPU samples by library and the top functions.

The same recipe by hand, against any running process:

    bench/.venv/bin/py-spy record --nonblocking -r 250 -d 10 -f speedscope \\
        -o bench/results/profile.speedscope.json -p <pid>      # while wrk -c32 runs
    bench/.venv/bin/py-spy dump --pid <pid>                      # one look at every stack
    python -m bench.profile --summarise bench/results/profile.speedscope.json

    python -m bench.profile [--seconds 10] [--rate 250]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import compare, venv, wrk

_SITE = re.compile(r"/site-packages/([^/]+)")
_OURS = re.compile(r"/leaky_tokens/([^/.]+)")
_STDLIB = re.compile(r"/lib/python3\.\d+/([^/.]+)")


def category(file: str) -> str:
    """The library a frame's file belongs to: a site-packages distribution, a Leaky Tokens
    subpackage, or 'stdlib:<module>'."""
    if match := _OURS.search(file):
        return f"leaky_tokens.{match[1]}"
    if match := _SITE.search(file):
        return match[1].removesuffix(".py")
    if file.startswith("<frozen "):
        return f"stdlib:{file[8:-1].split('.')[0]}"
    if match := _STDLIB.search(file):
        return f"stdlib:{match[1]}"
    return file or "?"


def stacks(speedscope: dict[str, Any]) -> list[tuple[list[dict[str, Any]], float]]:
    """(frames root first, weight) of every sample of every thread."""
    frames = speedscope["shared"]["frames"]
    out = []
    for profile in speedscope["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for sample, weight in zip(profile["samples"], weights, strict=True):
            out.append(([frames[i] for i in sample], float(weight)))
    return out


def summarise(speedscope: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """Shares (percent of all samples) by library and by function.

    `by_library`: each sample goes to the library of its innermost frame, standard-library
    frames passed over to the nearest caller outside it (so sqlite3 under aiosqlite counts as
    aiosqlite, asyncio under uvicorn as uvicorn); `self` and `total` by function as usual."""
    samples = stacks(speedscope)
    total = sum(weight for _, weight in samples) or 1.0  # py-spy weighs samples in seconds
    library: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, weight in samples:
        if not frames:
            continue
        names = [f"{f['name']} ({_short(f.get('file', ''))}:{f.get('line', '')})" for f in frames]
        own[names[-1]] += weight
        for name in set(names):
            inclusive[name] += weight
        cats = [category(f.get("file", "")) for f in frames]
        outside = [c for c in cats if not c.startswith("stdlib:")]
        library[outside[-1] if outside else cats[-1]] += weight

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * w / total, 1)) for name, w in counter.most_common(n)]

    # The frames every request passes through (the CLI, the event loop, the middleware
    # chain) come first by inclusive share; the interesting ones are below that spine.
    spine = max(inclusive.values(), default=0) * 0.6
    return {
        "samples": len(samples),
        "cpu_seconds": round(total, 2),
        "by_library": shares(library, 25),
        "self": shares(own, top),
        "total": shares(Counter({k: v for k, v in inclusive.items() if v < spine}), top * 2),
    }


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def render(summary: dict[str, Any], title: str) -> str:
    lines = [
        title,
        f"{summary['samples']} samples, {summary['cpu_seconds']} s of CPU (idle excluded)",
        "",
        "By library (standard-library frames counted to their caller):",
    ]
    lines += [f"  {share:5.1f} %  {name}" for name, share in summary["by_library"]]
    lines += ["", "Top functions, self:"]
    lines += [f"  {share:5.1f} %  {name}" for name, share in summary["self"]]
    lines += ["", "Top functions, inclusive (below the frames every request passes through):"]
    lines += [f"  {share:5.1f} %  {name}" for name, share in summary["total"]]
    return "\n".join(lines) + "\n"


def record(seconds: int, rate: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        _, stub_port, _ = compare.start_stub(stack, workdir)
        leaky = compare.start_leaky(stack, workdir, "embedded", stub_port)
        account = compare.leaky_account(leaky, 10**12)
        chat = compare.leaky_offers_chat(leaky)
        url, headers, bodies = compare.leaky_request(leaky, account, chat, 25)
        name = "chat-completions" if chat else "consume"
        wrk.run_wrk(url, method="POST", body=bodies["plain"], headers=headers, seconds=3)
        out = compare.RESULTS / f"profile-{name}.speedscope.json"
        compare.RESULTS.mkdir(exist_ok=True)
        load = stack.enter_context(_background_wrk(url, headers, bodies["plain"], seconds + 3))
        time.sleep(1)
        subprocess.run(
            [
                str(venv.bin_path("py-spy")),
                "record",
                "--nonblocking",
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
                "--format",
                "speedscope",
                "--output",
                str(out),
                "--pid",
                str(leaky.pid),
            ],
            check=True,
            capture_output=True,
            timeout=seconds + 60,
        )
        load.wait(seconds + 60)
    return out


@contextmanager
def _background_wrk(
    url: str, headers: dict[str, str], body: Any, seconds: int
) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(wrk.lua("POST", body, headers))
        proc = subprocess.Popen(
            [wrk.executable(), "-t1", "-c32", f"-d{seconds}s", "-s", str(script), url],
            stdout=subprocess.DEVNULL,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--summarise", type=Path, help="only summarise this speedscope file")
    args = parser.parse_args()
    path = args.summarise or record(args.seconds, args.rate)
    summary = summarise(json.loads(path.read_text()))
    text = render(summary, f"py-spy profile: {path.name}")
    if not args.summarise:
        path.with_name(path.name.replace(".speedscope.json", ".txt")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
