"""Optional dependencies of some subcommands: one clear line naming the extra to install, before any work.

Only checks that a module can be found; it must not import it (importing lm-eval or matplotlib takes seconds).
"""

import importlib.util

EXTRAS = {"lm_eval": "eval", "matplotlib": "eval", "peft": "lora"}


def require(*modules: str, command: str) -> None:
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        extras = sorted({EXTRAS[module] for module in missing})
        raise ValueError(
            f"{command} needs {', '.join(missing)}: pip install 'llama-moe[{','.join(extras)}]' "
            f"(or pip install -e '.[{','.join(extras)}]' in a checkout)."
        )
