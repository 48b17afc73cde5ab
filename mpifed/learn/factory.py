"""Loading the user's own code named in a job: `package.module:factory` or `path/to/file.py:factory`.

The code is the user's, named in their job file, and runs in every rank as a model or dataset factory
would in their own script. Nothing from a checkpoint, a run log or another rank is ever executed or
unpickled: checkpoints load with torch.load(weights_only=True), and every rank imports the factory
itself from the name in the job.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable

from mpifed.errors import InputError


class FactoryError(InputError, ValueError):
    """A factory named in the job does not import, raises, or returns the wrong thing."""


def is_factory(name: str) -> bool:
    """Whether a job's model.name or data.dataset names user code rather than a built-in."""
    return ":" in name


def absolute(name: str, base: Path) -> str:
    """`file.py:factory` relative to the job file's folder -> an absolute path, so the resolved job
    (stored in the run directory, read again on --resume) names the same file from anywhere."""
    path, sep, attr = name.rpartition(":")
    if sep and path.endswith(".py") and not Path(path).is_absolute():
        return f"{(base / path).resolve()}:{attr}"
    return name


def load_factory(name: str, field: str) -> Callable:
    """Import the callable named `name` ('pkg.mod:fn' or 'file.py:fn'); `field` names the job field
    in the messages."""
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise FactoryError(f"{field} = {name!r}: expected 'package.module:factory' or 'path/file.py:factory'")
    try:
        module = _import_file(where) if where.endswith(".py") else importlib.import_module(where)
    except FactoryError as err:
        raise FactoryError(f"{field} = {name!r}: {err}") from None
    except Exception as err:
        raise FactoryError(f"{field} = {name!r}: importing {where} failed: {described(err)}; fix that "
                           f"code, or the name (a file path is relative to the job file)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise FactoryError(f"{field} = {name!r}: {where} has no callable {attr!r}"
                           + (f"; it defines {', '.join(sorted(found))}" if found else ""))
    return fn


def call_factory(fn: Callable, declared: dict[str, Any], options: dict[str, Any], field: str, name: str) -> Any:
    """fn(**what it accepts of `declared`, **options). `declared` is what mpifed tells every factory
    (the data's shapes for a model; the seed and data root for a dataset): a factory takes the ones it
    names. The job's options must all be accepted."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not takes_any]
    if unknown:
        accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise FactoryError(f"{field} = {name!r} does not take option(s) {', '.join(unknown)} (from the job's "
                           f"options table); it takes {', '.join(accepted) or 'no keyword arguments'}")
    kwargs = {k: v for k, v in declared.items() if k in params or takes_any}
    kwargs.update(options)
    try:
        return fn(**kwargs)
    except Exception as err:
        raise FactoryError(f"{field} = {name!r}: the factory raised {described(err)}; fix the factory or "
                           f"the options it is given ({field.split('.')[0]}.options)") from None


def _import_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise FactoryError(f"no file {file} (a factory path is relative to the job file); check the path")
    module_name = f"mpifed_user_{file.stem}_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(file.parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(file.parent))
    return module


def described(err: BaseException) -> str:
    """'TypeError: message (file.py, line 12)': the error, on one line, and where in the user's code it came
    from: the innermost frame outside mpifed, the standard library and installed packages (so an error that
    torch raises for the user's arguments points at the user's line), else the innermost in an installed
    package (a factory of an installed package of the user's), else none."""
    mine = Path(__file__).resolve().parent.parent
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<")
              and not _under(f.filename, (mine,))
              and not (_under(f.filename, _STDLIB) and not _under(f.filename, _PACKAGES))]
    own = [f for f in frames if not _under(f.filename, _PACKAGES)] or frames
    at = f" ({Path(own[-1].filename).name}, line {own[-1].lineno})" if own else ""
    text = str(err)
    if isinstance(err, SyntaxError) and err.filename:
        text, at = err.msg, f" ({Path(err.filename).name}, line {err.lineno})"  # str(err) holds the place too
    return f"{type(err).__name__}: {one_line(text)}{at}"


def one_line(text: str) -> str:
    """A message of several lines (torch's often are) as one."""
    return " ".join(text.split())


def _under(filename: str, roots: tuple[Path, ...]) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(root) for root in roots)


_PACKAGES = tuple({Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")})
_STDLIB = tuple({Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")})
