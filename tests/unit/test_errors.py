"""Every exception and warning capplug raises on purpose is defined in capplug.errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import capplug
import capplug.errors as errors


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(capplug.__path__, prefix="capplug."):
        if info.name == "capplug.errors" or any(p.startswith("_") for p in info.name.split(".")):
            continue  # private modules keep private signals (an HTTP error carrier, say)
        names.append(info.name)
    return names


def test_no_public_module_defines_an_exception_of_its_own():
    strays = []
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                strays.append(f"{name}.{attr}")
    assert strays == [], f"define these in capplug.errors: {strays}"


def test_the_hierarchy_in_the_docstring_names_every_class():
    for name in errors.__all__:
        if inspect.isclass(getattr(errors, name)):
            assert name in errors.__doc__


def test_errors_can_be_caught_by_kind():
    from capplug.adapters.store import UnknownAdapterError
    from capplug.data.rows import RowError
    from capplug.llms.retry import UpstreamHTTPError

    assert issubclass(UnknownAdapterError, errors.CapplugError)
    assert issubclass(UnknownAdapterError, KeyError)
    assert issubclass(RowError, errors.CapplugError) and issubclass(RowError, ValueError)
    assert UpstreamHTTPError is errors.UpstreamHTTPError
    assert str(UnknownAdapterError("no adapter abc")) == "no adapter abc"
    assert "... and 5 more" in str(RowError("f.jsonl", [f"row {i}" for i in range(25)], 30))
