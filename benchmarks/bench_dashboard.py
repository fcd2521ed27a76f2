"""Does watching an analysis in the dashboard slow it down? Page open vs the CLI, same analysis.

    python benchmarks/bench_dashboard.py [--rounds 2] [--sample cnn] [--samples 256]

Starts the dashboard (the launcher's command, an empty run store in a temp folder), opens it in
headless Chromium (/usr/bin/chromium, Playwright), and per round: runs the bundled sample from the
Model & data page with its form defaults (int8,int4 weights, int8 activations, every target,
cumulative view), timing the click on "Run analysis" until the results show while the page polls
the progress; then the same analysis with `python -m analysis.cli analyze`, timing the whole
process. Rounds alternate page and CLI so that load on a shared machine hits both. Prints each
round and the ratio of the totals (page / CLI). `--root` runs another checkout's dashboard (e.g.
to measure an older version; its pages must have the same Model & data form).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample", default="cnn")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose dashboard is served")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the test helpers drive the page
    from playwright.sync_api import sync_playwright

    from dashboard import launch
    from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, dashboard_server
    from tests.e2e.test_browser import open_app, run_sample_from_the_page, run_sample_with_the_cli

    # the served app (its app.py puts its own checkout first on the path)
    launch.APP = args.root.resolve() / "dashboard" / "serve.py"

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        folder = Path(tmp)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        with dashboard_server(folder, QUANTLENS_DEFAULT_SAMPLE="mlp", QUANTLENS_DEFAULT_SAMPLES="64") as (url, runs):
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(120_000)
            open_app(page, url)  # the first-open sample analysis, not timed
            for index in range(args.rounds):
                page_s = run_sample_from_the_page(page, runs, args.sample, args.samples)
                cli_s = run_sample_with_the_cli(args.sample, args.samples, folder / f"cli{index}")
                rows.append((page_s, cli_s))
                print(f"round {index + 1}: page open {page_s:6.1f} s   CLI {cli_s:6.1f} s   ratio {page_s / cli_s:.2f}",
                      flush=True)
        browser.close()
    page_total, cli_total = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"sample:{args.sample}, {args.samples} samples, {args.rounds} rounds: page open {page_total:.1f} s, "
          f"CLI {cli_total:.1f} s, ratio {page_total / cli_total:.2f}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    raise SystemExit(code)
