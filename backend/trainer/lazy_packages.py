"""Package `__init__`s the trainer does not run until something asks for a name in them.

Three of diffusers' model packages import every model file they hold as soon as any one of their
modules is imported: loading the SD UNet runs `diffusers.models.transformers/__init__`, which
imports some 70 transformer files (video, audio, every image family), and the UNets' and VAEs'
packages do the same. diffusers' single-file loader imports its schedulers, and four of those
import `scipy.stats` (only the beta-sigma schedule uses it). None of that is needed to train one
family, and it is about 0.45 s of the trainer's ~3 s of imports on the demo (measured with
`python -X importtime`; see docs/performance.md, start-up).

`defer_package_inits()` puts each package in `sys.modules` as its bare package (its `__path__`,
`__spec__`, no names yet), so importing one of its modules (`diffusers.models.unets.unet_2d_condition`,
which is how diffusers' own lazy top level reaches a class) does not run the package's `__init__`.
The first time anything reads a name the module does not have (`from diffusers.models.transformers
import X`, `scipy.stats.beta`), the real `__init__` runs into that same module object, once, under
a lock, and the name is looked up again: the same objects as a plain import, only later.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

DEFERRED = (
    "diffusers.models.transformers",
    "diffusers.models.unets",
    "diffusers.models.autoencoders",
    "scipy.stats",
)


def _deferred(name: str) -> types.ModuleType | None:
    spec = importlib.util.find_spec(name)  # imports the parents (diffusers.models, scipy): needed anyway
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return None
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    ran = False

    def __getattr__(attr: str) -> object:  # PEP 562: called only for names the module lacks
        nonlocal ran
        with lock:
            if not ran:
                ran = True  # first: a name read while the __init__ runs is not there yet, as in a plain import
                spec.loader.exec_module(module)
                if attr in module.__dict__:
                    return module.__dict__[attr]
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    module.__getattr__ = __getattr__
    return module


def defer_package_inits(names: tuple[str, ...] = DEFERRED) -> list[str]:
    """Defer each package's `__init__` (see the module docstring); returns the names deferred.
    A package already imported, or missing, is left as it is."""
    done = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            module = _deferred(name)
        except ImportError:  # an optional package that is not installed
            continue
        if module is None:
            continue
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
        done.append(name)
    return done
