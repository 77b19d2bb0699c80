"""Present a run: the terminal table, the results file and its plot."""

import json
import math
from pathlib import Path

DTYPES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}
LEGEND = (
    "vs = speed-up, baseline time / fastdl time; %peak = rate / measured copy bandwidth (GB/s), "
    "fp32 GEMM rate (GFLOP/s) or, int8 rows, int8 multiply-add peak (GOP/s); err = "
    "max |out - ref| / max |ref| against float64, worst over outputs and gradients (fastdl | "
    "torch eager); target: e≥N, c≥N = minimum speed-up over eager, compile; bw≥N%, gemm≥N% = "
    "minimum %peak; ✓ met, ✗ missed"
)


def _num(v: float | None, digits: int = 3) -> str:
    """v with `digits` significant digits, no exponent (times, rates, speed-ups)."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def peaks_line(peaks: dict) -> str:
    """The measured peaks in words (the int8 one where the machine has it)."""
    line = f"copy {_num(peaks['copy_gbps'])} GB/s, fp32 GEMM {_num(peaks['gemm_gflops'])} GFLOP/s"
    if peaks.get("int8_gops"):
        line += f", int8 multiply-add {_num(peaks['int8_gops'])} GOP/s"
    return line


def _err(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def _rate(r: dict) -> str:
    return "-" if r["rate"] is None else f"{_num(r['rate'])} {r['rate_unit']}"


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _target(row: dict) -> str:
    return " ".join(f"{label}{'✓' if met else '✗'}" for label, met in row["target_checks"])


# (header, width or None to fit the cases, right-aligned, cell)
COLUMNS = (
    ("case", None, False, lambda r: r["label"]),
    ("shape", None, False, lambda r: r["shape"]),
    ("dtype", 5, False, lambda r: DTYPES.get(r["dtype"], r["dtype"])),
    ("backend", 7, False, lambda r: r["backend"]),
    ("fastdl ms", 9, True, lambda r: _num(r["time_ms"]["fastdl"])),
    ("eager ms", 9, True, lambda r: _num(r["time_ms"].get("eager"))),
    ("compile ms", 10, True, lambda r: _num(r["time_ms"].get("compile"))),
    ("vs eager", 8, True, lambda r: _num(r["speedup"].get("eager"), 2)),
    ("vs compile", 10, True, lambda r: _num(r["speedup"].get("compile"), 2)),
    ("rate", 13, True, _rate),
    ("%peak", 5, True, lambda r: _percent(r["peak_fraction"])),
    ("err fastdl", 10, True, lambda r: _err(r["rel_error"]["fastdl"])),
    ("err torch", 9, True, lambda r: _err(r["rel_error"].get("eager"))),
    ("target", 20, False, _target),
)


class Table:
    """Fixed-width rows, so that they can be printed as they come (above a progress bar)."""

    def __init__(self, cases):
        fit = {
            "case": max(len(c.label) for c in cases),
            "shape": max(len(c.shape_str) for c in cases),
        }
        self.widths = [max(len(h), w or fit[h]) for h, w, _, _ in COLUMNS]

    def _line(self, cells) -> str:
        parts = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, _, right, _) in zip(cells, self.widths, COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    def header(self) -> str:
        head = self._line([h for h, _, _, _ in COLUMNS])
        return f"{head}\n{'-' * len(head)}"

    def row(self, r: dict) -> str:
        line = self._line([cell(r) for _, _, _, cell in COLUMNS])
        failed = "; ".join(f"{k}: {v}" for k, v in r["failed"].items())
        return f"{line}\n    failed: {failed}" if failed else line


def summary(rows: list[dict]) -> str:
    judged = [r for r in rows if r["target_met"] is not None]
    missed = [f"{r['label']} {r['shape']} {r['backend']}" for r in judged if not r["target_met"]]
    text = f"targets met: {len(judged) - len(missed)}/{len(judged)}"
    return text + (f" (missed: {', '.join(missed)})" if missed else "")


def write_json(path: Path, header: dict, rows: list[dict], partial: bool) -> list[dict]:
    """Write the run and return the rows written: a partial run (a family or filter chosen)
    replaces only its own rows of an existing file for the same device, keeping the others."""
    if partial and path.exists():
        old = json.loads(path.read_text())
        if old.get("device") == header["device"]:
            mine = {(r["case"], r["backend"]) for r in rows}
            rows = [r for r in old["rows"] if (r["case"], r["backend"]) not in mine] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(header | {"rows": rows}, indent=1, ensure_ascii=False) + "\n")
    return rows


def plot(path: Path, header: dict, rows: list[dict]) -> None:
    """Horizontal bars: speed-up over each baseline per row (log scale), targets as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullLocator

    labels = [
        f"{r['label']} {r['shape']} {DTYPES.get(r['dtype'], r['dtype'])} {r['backend']}"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * len(rows)))
    height = 0.38
    colors = {"eager": "tab:blue", "compile": "tab:orange"}
    for i, (base, color) in enumerate(colors.items()):
        for k, r in enumerate(rows):
            y, x = k + (i - 0.5) * height, r["speedup"].get(base)
            if x:
                ax.barh(y, x, height, color=color)
                ax.text(x, y, f" {x:.2g}", va="center", fontsize=7)
            need = (r["target"] or {}).get(base)
            if need:
                ax.plot([need, need], [y - height / 2, y + height / 2], color="black", lw=2)
    for k, r in enumerate(rows):
        if r["time_ms"]["fastdl"] is None:
            ax.text(1.0, k, " fastdl failed", va="center", fontsize=7, color="red")
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 50]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("speed-up of fastdl (log scale); black ticks: targets")
    peaks = header["peaks"]
    ax.set_title(
        f"fastdl on {header['device_name']} ({header['date'][:10]}): {peaks_line(peaks)}",
        fontsize=9,
    )
    handles = [Patch(color=c, label=f"vs torch {b}") for b, c in colors.items()]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
