"""The benchmark report: results.json -> report.md and report.html (with plots), and the
console table. Everything here reads the serialised results (plain dicts), so a committed
results file renders the same report as the run that wrote it.

Both documents come from one list of blocks (headings, paragraphs, tables, images); the
HTML embeds its images so that it can be mailed around on its own.
"""
from __future__ import annotations

import base64
import html
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from .peers import ALWAYS


# ---------------------------------------------------------------- reading results

def case_rows(results: dict) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in results["rows"]:
        grouped[row["case"]].append(row)
    return grouped


def baseline(rows: list[dict]) -> dict:
    """What a case's speedups are quoted against: torch.nn where it runs, else the first peer's
    fast path, else the correctness oracle (the reference, or chunked on GPUs). Peers' own
    pure-PyTorch references are checked and timed, but never the baseline."""
    peers = [r for r in rows if r["kind"] == "peer"]
    always = [r for r in peers if r["target"] in ALWAYS]
    if always or peers:
        return (always or peers)[0]
    return next(r for r in rows if r["target"] == rows[0]["oracle"])


def median(row: dict, phase: str) -> float | None:
    timing = row.get(phase)
    return None if timing is None else timing["median_s"]


def speedup(row: dict, over: dict, phase: str) -> float | None:
    ours, theirs = median(row, phase), median(over, phase)
    return None if ours is None or theirs is None else theirs / ours


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _err(row: dict) -> str:
    return f"{row['rel_err']:.1e}" + (" MISMATCH" if row["mismatch"] else "")


def _fraction(row: dict, phase: str = "fwd_bwd") -> str:
    value = row.get("roofline", {}).get(phase, {}).get("fraction")
    return "-" if value is None else f"{100 * value:.0f}%"


# ---------------------------------------------------------------- console

def _breakdown_section(results: dict, key: str, unit: str, title: str, caption: str) -> list[tuple]:
    """A heading, caption and table of the rows' profiled ``key`` entries (bench.timing.kernel_breakdown);
    nothing where no row has them."""
    profiled = [(case, row) for case, rows in case_rows(results).items() for row in rows if row.get(key)]
    if not profiled:
        return []
    return [("h2", title), ("p", caption),
            ("table", ("case", "target", unit[:-1], "calls", "ms", "share"),
             [(case, row["target"], k["name"][:70], str(k["calls"]), _ms(k["seconds"]), f"{k['share']:.0%}")
              for case, row in profiled for k in row[key]])]


def format_table(header, lines) -> str:
    lines = [tuple(header)] + [tuple(line) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def console_table(results: dict) -> str:
    header = ("op", "case", "target", "fwd ms", "fwd+bwd ms", "x base fwd", "x base f+b", "rel err", "roofline",
              "baseline")
    lines = []
    for rows in case_rows(results).values():
        base = baseline(rows)
        for row in rows:
            lines.append((row["op"], row["case"], row["target"], _ms(median(row, "fwd")), _ms(median(row, "fwd_bwd")),
                          _x(speedup(row, base, "fwd")), _x(speedup(row, base, "fwd_bwd")), _err(row), _fraction(row),
                          base["target"]))
    return format_table(header, lines)


# ---------------------------------------------------------------- the document

def headline(results: dict) -> list[tuple[str, ...]]:
    """Per case with a peer: our fastest target against the fastest peer, forward and
    forward+backward each (a phase a side has no time for shows '-': e.g. a peer whose backward
    failed still meets us on the forward)."""
    lines = []
    for case, rows in case_rows(results).items():
        cells, compared = [], False
        for phase in ("fwd", "fwd_bwd"):
            ours = [r for r in rows if r["kind"] == "rnnops" and median(r, phase)]
            peers = [r for r in rows if r["kind"] == "peer" and median(r, phase)]
            if not ours or not peers:
                cells += ["-", "-", "-"]
                continue
            best = min(ours, key=lambda r: median(r, phase))
            rival = min(peers, key=lambda r: median(r, phase))
            cells += [f"{_ms(median(best, phase))} ({best['target']})",
                      f"{_ms(median(rival, phase))} ({rival['target']})", _x(speedup(best, rival, phase))]
            compared = True
        if compared:
            lines.append((case, *cells))
    return lines


def blocks(results: dict, images: dict[str, str]) -> list[tuple]:
    env = results["environment"]
    where = env.get("gpu") or env.get("cpu") or "unknown device"
    out = [("h1", "rnnops benchmark report"),
           ("p", f"{where}, {results['dtype']}, rnnops {env.get('rnnops')} (commit {env.get('commit') or 'unknown'}), "
                 f"torch {env.get('torch')}, triton {env.get('triton') or '-'}, {env.get('date', '')}. "
                 "Times are medians after a warm-up (CUDA events on GPUs around calls run back to back, as "
                 "triton.testing.do_bench times them; wall clock on CPUs); speedups are ratios "
                 "of medians measured side by side in this run; 'roofline' is the floor max(bytes / bandwidth, "
                 "flops / peak, exponentials / special-function rate) over the measured time; 'fwd host ms' "
                 "(GPUs) is the median time until a forward call returned on the host (launches are "
                 "asynchronous: near 'fwd ms', the call is bound by host and launch overhead, not by its "
                 "kernels).")]
    peers = env.get("peers", {})
    out.append(("p", "Peers: " + (", ".join(f"{k} {v}" for k, v in peers.items()) or "none installed") + "."))
    top = headline(results)
    if top:
        out += [("h2", "Headline: fastest rnnops target against the fastest peer"),
                ("table", ("case", "rnnops fwd ms", "peer fwd ms", "fwd speedup", "rnnops f+b ms", "peer f+b ms",
                           "f+b speedup"), top)]
    by_op = defaultdict(list)
    for case, rows in case_rows(results).items():
        by_op[rows[0]["op"]].append((case, rows))
    notes = results.get("notes", {})
    # the host column only where it was measured (GPUs): on a CPU the call's time is the host's
    host_measured = any((row.get("fwd") or {}).get("host_median_s") is not None for row in results["rows"])
    for op, cases in by_op.items():
        out.append(("h2", op))
        lines = []
        for case, rows in cases:
            base = baseline(rows)
            for row in rows:
                roof = row.get("roofline", {}).get("fwd_bwd", {})
                host = [_ms((row.get("fwd") or {}).get("host_median_s"))] if host_measured else []
                lines.append((case, row["target"], _ms(median(row, "fwd")), *host, _ms(median(row, "fwd_bwd")),
                              f"{_x(speedup(row, base, 'fwd_bwd'))} vs {base['target']}", _err(row),
                              *(f"{roof[k]:.3g}" if k in roof else "-" for k in ("tflops", "gbps")), _fraction(row),
                              _mb(row.get("memory_fwd_bwd"))))
        out.append(("table", ("case", "target", "fwd ms", *(["fwd host ms"] if host_measured else []), "fwd+bwd ms",
                              "speedup (f+b)", "rel err", "TFLOP/s (f+b)", "GB/s (f+b)", "roofline", "peak MB (f+b)"),
                    lines))
        op_notes = [f"{case}: {note}" for case, _ in cases for note in notes.get(case, [])]
        if op_notes:
            out.append(("list", op_notes))
    unit = "kernels" if results.get("device", "").startswith("cuda") else "operators"
    out += _breakdown_section(results, "kernels", unit, "Where the time goes",
                              f"The largest {unit} of one profiled forward+backward per target (self time; share of "
                              "the profiled total).")
    out += _breakdown_section(results, "kernels_fwd", unit, "Where the forward's time goes",
                              f"Cases that compare forwards only (a target's backward failed): the largest {unit} of "
                              "one profiled forward per target.")
    hosted = [(case, row) for case, rows in case_rows(results).items() for row in rows if row.get("host")]
    if hosted:
        out += [("h2", "Where a forward call's host time goes"),
                ("p", ("The Python functions taking the most host time in a forward call, callees included (so "
                       "the list reads as the call chain and its heavy branches), per call, by cProfile, which "
                       "slows Python-heavy code: read the shares of the target's host time.")),
                ("table", ("case", "target", "function", "calls", "ms", "share"),
                 [(case, row["target"], h["name"][:70], f"{h['calls']:g}", _ms(h["seconds"]), f"{h['share']:.0%}")
                  for case, row in hosted for h in row["host"][:6]])]
    for name, caption in (("throughput_T", "Throughput against sequence length"),
                          ("throughput_B", "Throughput against batch size"),
                          ("speedup", "Speedup of each rnnops target over each peer"),
                          ("roofline", "Fraction of the roofline floor reached")):
        if name in images:
            out += [("h2", caption), ("img", images[name], caption)]
    return out


def render_markdown(doc: list[tuple]) -> str:
    parts = []
    for block in doc:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            header, lines = block[1], block[2]
            rows = [header, ["---"] * len(header)] + [list(line) for line in lines]
            parts.append("\n".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows))
        elif kind == "img":
            parts.append(f"![{block[2]}]({Path(block[1]).name})")
    return "\n\n".join(parts) + "\n"


def render_html(doc: list[tuple]) -> str:
    body = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(cell)}</th>" for cell in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>"
                           for line in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:80em;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
             "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rnnops benchmark report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ---------------------------------------------------------------- plots

def _variant(case: str, axis: str) -> str:
    return re.sub(rf"\s{axis}\d+", "", case)


def plot(results: dict, out_dir: Path) -> dict[str, str]:
    """Write the PNG plots; returns {name: path}. Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    written = {}
    for axis in ("T", "B"):
        groups = defaultdict(lambda: defaultdict(list))
        for row in results["rows"]:
            if row.get("sweep") != axis or median(row, "fwd_bwd") is None:
                continue
            tokens = row["shape"]["B"] * row["shape"]["T"]
            groups[_variant(row["case"], axis)][row["target"]].append(
                (row["shape"][axis], tokens / median(row, "fwd_bwd")))
        groups = {variant: targets for variant, targets in groups.items()
                  if any(len(points) > 1 for points in targets.values())}
        if not groups:
            continue
        cols = min(3, len(groups))
        rows_n = -(-len(groups) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
        for ax, (variant, targets) in zip(axes.flat, groups.items()):
            for target, points in targets.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=target)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(variant, fontsize=9)
            ax.set_xlabel(axis)
            ax.set_ylabel("tokens / s (fwd+bwd)")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"throughput_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[f"throughput_{axis}"] = str(path)
    bars = []
    for case, rows in case_rows(results).items():
        for ours in (r for r in rows if r["kind"] == "rnnops"):
            for peer in (r for r in rows if r["kind"] == "peer"):
                ratio = speedup(ours, peer, "fwd_bwd")
                if ratio is not None:
                    bars.append((f"{case} | {ours['target']} vs {peer['target']}", ratio))
    if bars:
        written["speedup"] = _bar_chart(plt, out_dir / "speedup.png", bars,
                                        "speedup, forward+backward (> 1: rnnops faster)", speedups=True)
    fractions = [(f"{r['case']} | {r['target']}", 100 * r["roofline"]["fwd_bwd"]["fraction"]) for r in results["rows"]
                 if r.get("roofline", {}).get("fwd_bwd", {}).get("fraction") is not None]
    if fractions:
        written["roofline"] = _bar_chart(plt, out_dir / "roofline.png", fractions,
                                         "% of the roofline floor, forward+backward")
    return written


def _bar_chart(plt, path: Path, bars: list[tuple[str, float]], xlabel: str, speedups: bool = False) -> str:
    """One horizontal bar per (label, value); speedups on a log axis, green >= 1 > red."""
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.2))
    values = [value for _, value in bars]
    ax.barh([label for label, _ in bars], values,
            color=["tab:green" if v >= 1 else "tab:red" for v in values] if speedups else None)
    if speedups:
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write results.json, report.md, report.html and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    doc = blocks(results, plot(results, out_dir))
    (out_dir / "report.md").write_text(render_markdown(doc))
    (out_dir / "report.html").write_text(render_html(doc))
    return sorted(out_dir.iterdir())


def compare(a: dict, b: dict) -> str:
    """Ratios between two runs, per (case, target): time in A over time in B (> 1: B is faster)."""
    index = {(r["case"], r["target"]): r for r in a["rows"]}
    lines, ratios = [], []
    for row in b["rows"]:
        old = index.get((row["case"], row["target"]))
        if old is None:
            continue
        fwd, both = speedup(row, old, "fwd"), speedup(row, old, "fwd_bwd")
        ratios += [r for r in (fwd, both) if r]
        lines.append((row["case"], row["target"], _ms(median(old, "fwd")), _ms(median(row, "fwd")), _x(fwd),
                      _ms(median(old, "fwd_bwd")), _ms(median(row, "fwd_bwd")), _x(both)))
    table = format_table(("case", "target", "A fwd ms", "B fwd ms", "A/B", "A f+b ms", "B f+b ms", "A/B"), lines)
    if ratios:
        table += f"\ngeometric mean A/B over {len(ratios)} timings: {statistics.geometric_mean(ratios):.3f}x"
    return table
