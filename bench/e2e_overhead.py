"""Wall time of one real CLI task through the bundle next to a direct call.

Usage: ``.venv/bin/python bench/e2e_overhead.py [--runs N]`` (default 5).

It starts the local Messages API stand-in and a bundle with 2 workers in a
temporary KSI_HOME, then alternates two measurements N times:

- direct: the pinned ``claude --model sonnet --print --output-format json``
  with the prompt on stdin, in a fresh folder, with the environment the
  worker gives it;
- bundle: ``ksi submit --wait PROMPT``, from process start to exit.

It prints the median, minimum and maximum of each and their difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bundle import BIN, Bundle, project_claude_bin  # noqa: E402

PROMPT = "Say hello from the benchmark."


def start_stub(folder: Path) -> tuple[subprocess.Popen, str]:
    port_file = folder / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "stubapi", "--port", "0", "--port-file", str(port_file)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline:
            raise RuntimeError("the stand-in API did not start")
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text().strip()}"


def direct_run(claude: str, base_url: str, folder: Path) -> float:
    home = Path(tempfile.mkdtemp(dir=folder))
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "stub-key",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [claude, "--model", "sonnet", "--print", "--output-format", "json"],
        input=PROMPT.encode(),
        capture_output=True,
        cwd=home,
        env=env,
        check=True,
    )
    elapsed = time.perf_counter() - started
    assert b'"is_error":false' in done.stdout, done.stdout[:300]
    return elapsed


def bundle_run(bundle: Bundle) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [BIN / "ksi", "submit", "--wait", PROMPT],
        env=bundle.env,
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - started
    assert done.stdout.strip().endswith(PROMPT), done.stdout
    return elapsed


def describe(name: str, values: list[float]) -> str:
    return (
        f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
        f"{max(values):.3f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs of each (default 5).")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ksi-bench-"))
    stub, base_url = start_stub(folder)
    claude = project_claude_bin()
    bundle = Bundle({"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "stub-key"})
    direct, through = [], []
    try:
        bundle.start()
        bundle_run(bundle)  # warm-up: first CLI start of each worker
        for _ in range(args.runs):
            direct.append(direct_run(claude, base_url, folder))
            through.append(bundle_run(bundle))
    finally:
        left = bundle.stop()
        bundle.cleanup()
        stub.terminate()
        stub.wait(timeout=10)
    print(
        f"runs: {args.runs}, cores: {os.cpu_count()}, python {sys.version.split()[0]}"
    )
    print("| path | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    print(describe("claude run directly", direct))
    print(describe("ksi submit --wait through the bundle", through))
    overhead = statistics.median(through) - statistics.median(direct)
    print(f"\nmedian overhead: {overhead * 1000:.0f} ms")
    if left:
        print(f"processes left after shutdown: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
