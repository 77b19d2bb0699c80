"""`python -m fastdl info`: versions, the CPU ISA in use and the backends available.
`python -m fastdl train <model>`: trains a model of fastdl.models beside its torch twin."""

import argparse
import os
import platform
import sys
import tempfile


def info() -> str:
    import torch

    import fastdl
    from fastdl import _backend, _ext

    lines = [
        f"fastdl  {fastdl.__version__}",
        f"python  {platform.python_version()}",
        f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    if _ext.HAS_TRITON:
        import triton

        lines.append(f"triton  {triton.__version__}")
    else:
        lines.append("triton  not installed")
    if _ext._C is not None:
        lines.append(f"cpu isa {_ext._C.cpu_isa()} (best on this CPU: {_ext._C.best_cpu_isa()})")
    if torch.cuda.is_available():
        lines.append(f"gpu     {torch.cuda.get_device_name()}")
    lines.append(f"backend {_backend.get_backend()} (CUDA auto choices: {_backend.AUTO})")
    lines.append("backends:")
    lines += [f"  {name:18s} {state}" for name, state in _ext.available_backends().items()]
    return "\n".join(lines)


def train(spec, args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from fastdl.models import train as training

    bar = tqdm(total=args.steps, desc=spec.name, unit="step")

    def progress(run: training.Run) -> None:
        bar.update(1)
        bar.set_postfix(
            {f"{who} loss": f"{v[-1]:.4f}" for who, v in run.losses.items()}
            | {f"{who} ms": f"{1e3 * v[-1]:.1f}" for who, v in run.times.items()}
        )

    try:
        run = training.train(
            spec,
            args.steps,
            torch.device(args.device),
            compare=not args.no_twin,
            progress=progress,
        )
    except ValueError as e:
        bar.close()
        print(f"python -m fastdl train: {e}", file=sys.stderr)
        return 2
    bar.close()
    print(f"{spec.name}: {spec.task}")
    for who, losses in run.losses.items():
        print(
            f"  {who:6s} loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"median step {run.median_ms(who):.2f} ms"
        )
    if "torch" in run.times:
        ratio = run.median_ms("torch") / run.median_ms("fastdl")
        print(f"  speed-up over the torch twin: {ratio:.2f}x")
    training.plot(run, args.plot)
    print(f"  loss curve: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fastdl.models import GROUPS

    parser = argparse.ArgumentParser(prog="python -m fastdl")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CPU ISA, backends")
    t = sub.add_parser("train", help="train a model of fastdl.models beside its torch twin")
    t.add_argument("model", help=f"a model name (python -m fastdl models; groups {GROUPS})")
    t.add_argument("--steps", type=_steps, default=100, help="training steps (default 100)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    t.add_argument("--no-twin", action="store_true", help="train the fastdl model alone")
    t.add_argument("--plot", help="PNG of the loss curve (default train-<model>.png)")
    sub.add_parser("models", help="list the models of fastdl.models")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from fastdl.models import specs

    models = specs()
    if args.command == "models":
        for name, spec in models.items():
            print(f"{name:20s} {spec.group:10s} {spec.task}")
        return 0
    # Every argument is checked before training starts (an unwritable plot would otherwise
    # fail only after the last step), each refusal by the train command's own usage.
    if args.model not in models:
        t.error(f"unknown model {args.model!r}; choose from {', '.join(models)}")
    import torch

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        t.error(f"--device {args.device!r} is not usable here: {e}")
    if device.type not in ("cpu", "cuda"):
        t.error(f"--device must be a cpu or cuda device, got {args.device!r}")
    args.plot = plot = args.plot or f"train-{args.model}.png"
    if not plot.endswith(".png"):
        t.error(f"--plot must name a .png file, got {plot!r}")
    if (reason := _unwritable(plot)) is not None:
        t.error(f"--plot: cannot write {plot!r}: {reason}")
    return train(models[args.model], args)


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written, or None. The folder it resolves to (through links) is
    tried with a temporary file of its own: ``path`` itself is neither created nor removed."""
    if os.path.isdir(path):
        return "it is a folder"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "it is read-only"
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.realpath(path))):
            pass
    except OSError as e:
        return e.strerror
    return None


def _steps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


if __name__ == "__main__":
    sys.exit(main())
