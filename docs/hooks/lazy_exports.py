"""griffe extension: document the names `ia3_trainer` exports lazily (through its module `__getattr__`).

`ia3_trainer/__init__.py` imports the trainer, the predictor and the other torch-heavy names only when asked for, so
`ia3-trainer --help` starts at once; griffe reads the source and does not see them. This extension imports the
package, and for every name of `__all__` that griffe did not find, adds an alias to the object's real location, so
`::: ia3_trainer.IA3Seq2SeqTrainer` works wherever the class is defined.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import griffe


ROOT = Path(__file__).resolve().parents[2]


class LazyExports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "ia3_trainer":
            return
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        module = importlib.import_module("ia3_trainer")
        for name in module.__all__:
            if name in pkg.members or name.startswith("__"):
                continue
            obj = getattr(module, name)
            if not hasattr(obj, "__qualname__"):  # a constant: nothing to document beyond its name
                continue
            target = f"{obj.__module__}.{obj.__qualname__}"
            pkg.set_member(name, griffe.Alias(name, target, parent=pkg))
