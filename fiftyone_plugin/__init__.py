"""FiftyOne entry point of the fairbalance plugin: registers its operators and panels.

FiftyOne loads this file under a synthetic module name, so the plugin's
``operators/`` and ``panels/`` packages are imported as subpackages of a
private ``_fairbalance_plugin`` package rooted at the plugin folder. If the
``fairbalance`` library is not installed, the copy in ``python_lib/`` is used.
"""

import importlib
import os
import sys
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = "_fairbalance_plugin"


def _import_plugin_package(name):
    for key in [k for k in sys.modules if k == _PACKAGE or k.startswith(_PACKAGE + ".")]:
        del sys.modules[key]  # FiftyOne re-registers after edits: load fresh code
    pkg = types.ModuleType(_PACKAGE)
    pkg.__path__ = [_ROOT]
    sys.modules[_PACKAGE] = pkg
    return importlib.import_module(f"{_PACKAGE}.{name}")


def register(p):
    try:
        import fairbalance  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(_ROOT, "python_lib"))

    operators = _import_plugin_package("operators")
    panels = importlib.import_module(f"{_PACKAGE}.panels")
    for cls in operators.OPERATORS + panels.PANELS:
        p.register(cls)
