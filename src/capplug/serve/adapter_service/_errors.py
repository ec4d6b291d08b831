"""The errors a store or runtime failure on one adapter becomes in the adapter service."""

from __future__ import annotations

from capplug.adapters.store import (
    CorruptAdapterError,
    NoGeneratorError,
    UnknownAdapterError,
)
from capplug.models.adapter_folder import AdapterFileError, WrongBaseModelError
from capplug.serve._http import APIError


def shown(name: str) -> str:
    """A client's adapter id or name as an error repeats it: at most 64 characters."""
    return name if len(name) <= 64 else name[:64] + "..."


def not_found(adapter_id: str) -> APIError:
    return APIError(
        404,
        f"no adapter {shown(adapter_id)!r} in this service's store; GET /v1/adapters lists the ids there "
        f"are, POST /v1/adapters makes one",
        code="adapter_not_found",
    )


def store_failure(exc: Exception, adapter_id: str) -> APIError:
    """The error a store or runtime failure on one adapter is answered with."""
    if isinstance(exc, UnknownAdapterError):
        return not_found(adapter_id)
    if isinstance(exc, NoGeneratorError):
        corrupt = ""
        if exc.set_aside:
            corrupt = (
                f"the stored adapter {', '.join(exc.set_aside)} for this instruction is corrupt "
                f"(its files fail their sha256): it was set aside in the store's .corrupt folder "
                f"and is not used again; import it again (`capplug store import`) or "
            )
        return APIError(
            503,
            f"{corrupt}no stored adapter is similar enough to this instruction and this service "
            "cannot make new ones (it runs without a hypernetwork: start it with --hypernet REF); "
            "stored adapters still answer by id ('<base>@<id>') or by an instruction that hits",
            param="instruction",
            code="no_generator",
            kind="server_error",
        )
    if isinstance(exc, WrongBaseModelError):
        return APIError(409, str(exc), code="wrong_base_model")
    if isinstance(exc, CorruptAdapterError):
        # The service is fine; this adapter's files are not (503, not a bare 500). A chat that
        # names it is answered by one made again from its instruction, where it has one.
        return APIError(
            503,
            f"adapter {adapter_id} is corrupt (its files are missing or fail their sha256): "
            f"{exc}. `capplug store verify --repair` sets it aside; make it again from its "
            f"instruction (POST /v1/adapters) or import it again",
            code="corrupt_adapter",
            kind="server_error",
        )
    if isinstance(exc, AdapterFileError):
        return APIError(
            500,
            f"adapter {adapter_id} cannot be attached to the model: {exc}",
            code="adapter_unloadable",
            kind="server_error",
        )
    raise exc
