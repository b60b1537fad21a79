"""torchvision's classification builders by name, read from torchvision's source without importing it.

Importing torchvision takes seconds (it imports torch), so a mistyped --arch would be answered only after
them. Its builders are the functions that its `models/*.py` files decorate with `@register_model`: the same
list as `torchvision.models.list_models(module=torchvision.models)` (tests/test_models.py compares them),
found in a tenth of a second. Where that reading finds none (torchvision laid out another way), the import
answers.
"""

import ast
import importlib.util
from functools import cache
from pathlib import Path

from train.errors import UsageError, did_you_mean


@cache
def classification_builders() -> tuple:
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent / "models" if spec and spec.origin else None
    names = [name for file in sorted(folder.glob("*.py")) for name in _registered(file)] if folder else []
    if not names:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    return tuple(sorted(names))


def _registered(file: Path) -> list:
    """The names `@register_model` gives the functions of one source file: its `name=`, else the function's."""
    names = []
    for node in ast.parse(file.read_text()).body:
        for decorator in getattr(node, "decorator_list", []) if isinstance(node, ast.FunctionDef) else []:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_model":
                given = [k.value.value for k in decorator.keywords if k.arg == "name"]
                names.append(given[0] if given else node.name)
    return names


def check_arch(arch: str) -> None:
    known = classification_builders()
    if arch not in known:
        hint = did_you_mean(arch, known, cutoff=0.5) or "; see torchvision.models.list_models()"
        raise UsageError(f"unknown --arch '{arch}'{hint}")
