"""`python -m fastdl info`: versions, the CPU ISA in use and the backends available."""

import argparse
import platform
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdl")
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
