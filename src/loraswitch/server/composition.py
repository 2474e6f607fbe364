"""Which model a request body asks for, once composition is allowed: `model` (an adapter, "auto",
"base" or a mixture string such as "iso_date:0.7+to_json:0.3"), or the extension object's
`loraswitch.adapters` ({name: weight}, with `model: "mixture"`), and for `auto` the
`loraswitch.allow` / `loraswitch.deny` lists. Parsing and checking are the library's
(`switch.mixture`, `Switch.resolve`); this module only says which field was wrong, as a 400.

A plain unknown model stays a 404 `model_not_found` (the OpenAI convention); an unknown name
inside a mixture or a list is a 400 that names the field, since the model itself was understood.
"""

from __future__ import annotations

from loraswitch.library import RESERVED_NAMES, AdapterError
from loraswitch.server import errors
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.protocol import _Common
from loraswitch.switch.mixture import MixtureError, mixture_of, parse_model

MIXTURE_MODEL = RESERVED_NAMES[2]  # "mixture": the `model` a body with `loraswitch.adapters` names


def resolve_body(st, body: _Common, known: list[str]) -> tuple[str, str | None, tuple[str, ...] | None, tuple[str, ...]]:
    """(model, route, allow, deny) of a body, validated against the adapters served now."""
    opts = body.loraswitch
    allow = tuple(opts.allow) if opts and opts.allow is not None else None
    deny = tuple(opts.deny or ()) if opts else ()
    adapters = opts.adapters if opts else None
    model, param = body.model, "model"
    try:
        if adapters is not None:
            param = "loraswitch.adapters"
            if body.model != MIXTURE_MODEL:
                raise MixtureError(f"with loraswitch.adapters, set model to {MIXTURE_MODEL!r} (got {body.model!r})",
                                   "conflicting_model")
            model = mixture_of(adapters).spec
        elif parse_model(body.model) is None and body.model == MIXTURE_MODEL:
            raise MixtureError(f"model {MIXTURE_MODEL!r} needs loraswitch.adapters ({{name: weight}})")
        model, route = st.switch.resolve(model, body.router(), allow, deny)
        named = parse_model(model)
    except MixtureError as exc:
        if exc.code == "invalid_allow":
            param = "loraswitch.allow" if allow is not None else "loraswitch.deny"
        raise bad_request(str(exc), param, exc.code) from None
    except AdapterError as exc:
        raise _unknown(exc, body.model, known, allow, deny, param, st.engine.errors.get(exc.name)) from None
    except ValueError as exc:
        raise bad_request(str(exc), "route", "invalid_route") from None
    for name in [model, *(named.names if named else ()), *(allow or ()), *deny]:
        if name in st.removing:  # DELETEd: leaving once in-flight work ends
            raise _unknown(AdapterError(name, f"adapter {name!r} is being removed"), body.model, known, allow, deny,
                           param)
    return model, route, allow, deny


def _unknown(exc: AdapterError, model: str, known: list[str], allow, deny, param: str,
             refused: AdapterError | None = None) -> APIError:
    """The error for an adapter the body names that is not served; `refused`: the library's
    refusal of it, if it refused it when it loaded."""
    if exc.name == model:
        return errors.model_not_found(model, known, refused.reason if refused else None)
    where = ("loraswitch.allow" if allow and exc.name in allow else "loraswitch.deny" if exc.name in deny else param)
    return bad_request(f"unknown adapter {exc.name!r} in {where}; available: {', '.join(known[2:]) or 'none'}", where,
                       "unknown_adapter")
