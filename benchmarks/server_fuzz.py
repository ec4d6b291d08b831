"""Hostile requests at volume: the proxy and the adapter service under generated input.

Issue target: 0 answers with a 5xx and 0 tracebacks over at least 2,000 generated requests per
server. Runs ``tests/unit/serve/test_server_fuzz.py`` (which CI runs with 150 examples per test) with
``CAPPLUG_FUZZ_EXAMPLES`` examples per test: generated bodies to two routes and generated paths,
for each of the two servers, plus the proxy's check that nothing is forwarded outside its base.

    python -m benchmarks.server_fuzz [--examples 2000]

Writes benchmarks/results/server_fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per test")
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp(prefix="capplug-fuzz-")) / "report.json"
    env = {
        **os.environ,
        "CAPPLUG_FUZZ_EXAMPLES": str(args.examples),
        "CAPPLUG_FUZZ_REPORT": str(report),
    }
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "tests/unit/serve/test_server_fuzz.py"]
    command += ["--disable-socket", "--allow-unix-socket", "-p", "no:cacheprovider", "--tb=short"]
    run = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    print(run.stdout[-3000:], run.stderr[-2000:], sep="\n")
    found = json.loads(report.read_text()) if report.exists() else {"statuses": {}, "failures": []}
    result = {
        "benchmark": "server_fuzz",
        "examples_per_test": args.examples,
        "seconds": seconds,
        "pytest_exit_status": run.returncode,
        "requests": {server: sum(c.values()) for server, c in found["statuses"].items()},
        "statuses": found["statuses"],
        "server_errors": {
            server: sum(n for status, n in c.items() if int(status) >= 500)
            for server, c in found["statuses"].items()
        },
        "failures": found["failures"][:20],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Generated hostile requests (proxy and adapter service)",
        "",
        f"{args.examples} examples per test; {seconds:.0f} s; pytest exit status {run.returncode}.",
        "",
        "| server | requests | 5xx | tracebacks or errors logged | statuses seen |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for server, counts in result["statuses"].items():
        logged = sum(f.startswith(f"{server}:") for f in found["failures"])
        seen = ", ".join(f"{status}: {n}" for status, n in counts.items())
        lines.append(
            f"| {server} | {result['requests'][server]} | {result['server_errors'][server]} | "
            f"{logged} | {seen} |"
        )
    (RESULTS / "server_fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if run.returncode != 0:
        raise SystemExit(run.returncode)


if __name__ == "__main__":
    main()
