"""python -m bench: time fastdl beside torch eager and torch.compile on this machine.

Measures the machine's copy bandwidth and fp32 GEMM rate, prints one table row per case and
fastdl backend as the cases run, then writes bench/results/<machine>.json and a PNG plot beside
it.
"""

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from bench import cases, machine, report, runner, timing

RESULTS = Path(__file__).parent / "results"


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--family", choices=cases.families(), help="one op family (default: all)")
    p.add_argument("--filter", help="only the cases whose name contains this (any case)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="auto: cuda when torch sees one (default: cpu)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few repetitions: a smoke test, not figures to keep"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results file (default: bench/results/<machine>.json, or "
        "bench/results/quick/<machine>.json with --quick); the plot goes beside it",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="time torch eager only, not torch.compile (whose compilation, a few seconds per "
        "case, dominates a run on a GPU)",
    )
    p.add_argument("--list", action="store_true", help="print the selected cases' names and exit")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    selected = cases.select(args.family, args.filter)
    if not selected:
        raise SystemExit(f"no case matches --family {args.family} --filter {args.filter}")
    if args.list:
        print("\n".join(c.name for c in selected))
        return
    device = _device(args.device)
    plan = timing.QUICK if args.quick else timing.FULL
    header = machine.describe(device)
    header["steady_allocator"] = timing.steady_allocator()
    out = args.out or RESULTS / ("quick" if args.quick else "") / f"{header['machine']}.json"
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    malloc = ", malloc held steady" if header["steady_allocator"] else ""
    print(
        f"{header['device_name']} ({header['machine']}), {header['threads']} threads{malloc}; "
        f"{versions}"
    )
    header["peaks"] = peaks = machine.peaks(device, plan)
    print(f"measured peaks: {report.peaks_line(peaks)}\n")
    table = report.Table(selected)
    print(table.header())
    rows = []
    # disable=None: a bar on a terminal only, so logs and CI output keep just the table.
    with tqdm(selected, unit="case", leave=False, disable=None) as bar:
        for case in bar:
            bar.set_description(case.name)
            for row in runner.measure(case, device, plan, peaks, not args.no_compile):
                rows.append(row)
                bar.write(table.row(row))
    print(f"\n{report.summary(rows)}\n{report.LEGEND}")
    header["quick"] = args.quick
    header["compile_baseline"] = not args.no_compile
    written = report.write_json(out, header, rows, partial=bool(args.family or args.filter))
    report.plot(out.with_suffix(".png"), header, written)
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
