"""Run a Python script with the llama_moe package made unimportable (as on a machine without it).

Usage: python without_llama_moe.py SCRIPT.py [args...]. Any `import llama_moe...` raises ImportError, so the
script can only reach our model through a checkpoint's remote code; so does `import triton` (the remote code's one
optional package), as on a machine without it.
"""

import importlib.abc
import runpy
import sys


class _RefuseLlamaMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("llama_moe", "triton"):
            raise ImportError(f"{name} is deliberately not importable in this process")
        return None


sys.meta_path.insert(0, _RefuseLlamaMoe())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
