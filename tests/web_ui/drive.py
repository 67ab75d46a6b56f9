"""Drives the strata job page in a headless Chromium (tests/web_ui.rs).

Loads the page, waits until the job graph is drawn, checks each vertex box
(name and parallelism, in graph order), takes a first observation of the
live numbers (rows into each vertex, the job's current rows/s, the chart's
point count), then waits -- on state, never a fixed sleep -- until the page
shows newer numbers, and prints one JSON line with both observations. With
--screenshot it saves the page as the second observation saw it.

Playwright drives the system's Chromium through --browser
(executable_path): it never downloads a browser.
"""

import argparse
import json
import sys

from playwright.sync_api import sync_playwright

# What the page shows now; a function of the DOM only.
OBSERVE = """() => {
  const boxes = [...document.querySelectorAll('#job-graph g.vertex')];
  const rate = document.querySelector('#rate-in');
  const chart = document.querySelector('#throughput-chart');
  return {
    boxes: boxes.map(g => ({
      name: g.querySelector('.v-name').textContent,
      parallelism: g.querySelector('.v-par').textContent,
      tier: g.querySelector('.v-tier').textContent,
      rate: g.querySelector('.v-rate').textContent,
    })),
    rows_in: boxes.map(g => Number(g.dataset.rowsIn)),
    rate: rate ? Number(rate.textContent.replace(/,/g, '')) : null,
    chart_points: chart ? Number(chart.dataset.points) : 0,
    edges: document.querySelectorAll('#job-graph path.edge').length,
    edge_labels: [...document.querySelectorAll('#job-graph text.edge-label')].map(t => t.textContent),
  };
}"""

# True once the page shows numbers newer than `first` in every respect the
# test checks: more rows into some vertex, more chart points, a rate > 0.
NEWER = """(first) => {
  const boxes = [...document.querySelectorAll('#job-graph g.vertex')];
  const rows = boxes.map(g => Number(g.dataset.rowsIn));
  const chart = document.querySelector('#throughput-chart');
  const rate = document.querySelector('#rate-in');
  return rows.some((r, i) => r > first.rows_in[i])
    && chart && Number(chart.dataset.points) > first.chart_points
    && rate && Number(rate.textContent.replace(/,/g, '')) > 0;
}"""


def clip(text, chars=32):
    """The page's clip(): long names end in an ellipsis."""
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--browser", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--vertices", required=True, help='JSON [["name", parallelism], ...]')
    parser.add_argument("--timeout-s", type=float, default=60)
    parser.add_argument("--screenshot")
    args = parser.parse_args()
    expected = json.loads(args.vertices)
    timeout_ms = args.timeout_s * 1000

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(
            executable_path=args.browser,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.url)
        print(f"loaded {args.url}", file=sys.stderr)
        page.wait_for_function(
            "n => document.querySelectorAll('#job-graph g.vertex').length === n",
            arg=len(expected),
            timeout=timeout_ms,
        )
        page.wait_for_function(
            "() => document.querySelector('#rate-in') !== null"
            " && Number(document.querySelector('#throughput-chart').dataset.points) > 0",
            timeout=timeout_ms,
        )
        first = page.evaluate(OBSERVE)
        for i, (name, parallelism) in enumerate(expected):
            box = first["boxes"][i]
            assert box["name"] == clip(name), f"box {i}: {box} is not {name!r}"
            assert box["parallelism"] == f"p={parallelism}", f"box {i}: {box}"
            assert box["rate"].endswith("rows/s"), f"box {i}: {box}"
        assert first["edges"] == len(expected) - 1, first
        print(f"first observation: {json.dumps(first)}", file=sys.stderr)
        page.wait_for_function(NEWER, arg=first, timeout=timeout_ms, polling=100)
        second = page.evaluate(OBSERVE)
        print(f"second observation: {json.dumps(second)}", file=sys.stderr)
        if args.screenshot:
            page.screenshot(path=args.screenshot, full_page=True)
            print(f"screenshot: {args.screenshot}", file=sys.stderr)
        assert not errors, f"script errors on the page: {errors}"
        browser.close()
    print(json.dumps({"boxes": second["boxes"], "first": first, "second": second}))


if __name__ == "__main__":
    main()
