"""The learning curve of a training run: validation bits per sub-pixel against steps and CPU-hours.

    python benchmarks/learning_curve.py training/fast.log.jsonl --out docs/benchmarks

Reads the JSON-lines log that ``wsi-idf train`` writes (one record per evaluation; ``cpu_s``
restarts with each process, so CPU time is summed over restarts) and writes a markdown table
and an SVG plot, with the JPEG XL e9 level of the same validation patches as a reference line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_curve(log: Path) -> list[dict]:
    """Validation records with cumulative CPU hours over restarts (each marked by a ``start`` record)."""
    rows, offset, last_cpu = [], 0.0, 0.0
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "start":  # a new process: its CPU clock starts again
            offset, last_cpu = offset + last_cpu, 0.0
        if "val_bpsp" not in record:
            continue
        last_cpu = record["cpu_s"]
        rows.append({**record, "cpu_h": (offset + record["cpu_s"]) / 3600})
    return rows


def svg(rows: list[dict], reference: float | None, title: str) -> str:
    width, height, left, right, top, bottom = 640, 380, 60, 20, 30, 50
    xs, ys = [r["step"] for r in rows], [r["val_bpsp"] for r in rows]
    y_lo = min(ys + [reference or ys[-1]]) - 0.05
    y_hi = min(max(ys), y_lo + 1.0)
    px = lambda v: left + v / max(xs) * (width - left - right)  # noqa: E731
    py = lambda v: top + (y_hi - min(v, y_hi)) / (y_hi - y_lo) * (height - top - bottom)  # noqa: E731
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
             f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="1.5"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">training steps '
             f'(batch 32); {rows[-1]["cpu_h"]:.2f} CPU-hours in all</text>',
             f'<text x="{left - 6}" y="{py(y_hi) + 4}" text-anchor="end">{y_hi:.2f}</text>',
             f'<text x="{left - 6}" y="{py(y_lo) + 4}" text-anchor="end">{y_lo:.2f}</text>',
             f'<text x="{width - right}" y="{height - bottom + 15}" text-anchor="end">{max(xs)}</text>']
    if reference:
        parts += [f'<line x1="{left}" y1="{py(reference):.1f}" x2="{width - right}" y2="{py(reference):.1f}" '
                  'stroke="#2c3e50" stroke-dasharray="4 3"/>',
                  f'<text x="{width - right - 4}" y="{py(reference) - 4:.1f}" text-anchor="end" fill="#2c3e50">'
                  f'JPEG XL e9 {reference:.3f}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("--reference", type=float, default=None, help="JPEG XL e9 on the same val patches")
    parser.add_argument("--every", type=int, default=4, help="table row every N records")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    rows = read_curve(args.log)
    if not rows:
        print(f"learning_curve: no validation records in {args.log}", file=sys.stderr)
        return 1
    name = args.log.name.split(".")[0]
    lines = ["| step | CPU-hours | learning rate | quantized | val bits/sub-pixel (EMA) | best so far |",
             "|---|---|---|---|---|---|"]
    shown = rows[args.every - 1::args.every] if len(rows) > args.every else rows
    if shown[-1] is not rows[-1]:
        shown.append(rows[-1])
    lines += [f"| {r['step']} | {r['cpu_h']:.2f} | {r['lr']:.2e} | {'yes' if r.get('quantized') else 'no'} | "
              f"{r['val_bpsp']:.4f} | {r.get('best_val_bpsp', r['val_bpsp']):.4f} |" for r in shown]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"learning_curve_{name}.md").write_text(table + "\n")
    (args.out / f"learning_curve_{name}.svg").write_text(svg(rows, args.reference, f"{name}: validation bits per "
                                                                                   "sub-pixel during training"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
