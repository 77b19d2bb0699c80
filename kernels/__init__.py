"""The Triton kernels, installed as the package ``fastdl.kernels`` (setup.py package_dir).

Run from the repository root (tests, ``python -m bench``), this directory is also importable
as a top-level ``kernels``, the name of another project's package (Hugging Face's kernels,
which transformers >= 5.25 imports). Imported under that name, it loads the installed package
of that name in its own place, so it shadows nothing; with none installed it stays an empty
package without a version, which transformers treats as absent.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
