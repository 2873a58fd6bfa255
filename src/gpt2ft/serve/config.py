"""What one server serves and how: its limits and access (ServeConfig), and the models it answers for."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..templates import Template, as_template


@dataclass
class ServeConfig:
    """Limits and access of one server."""

    api_key: str | None = None
    """Bearer token every route but / and /health requires (None: open); printable ASCII."""
    max_batch: int = 8
    """Most completions of one model decoded together."""
    max_queue: int = 64
    """Most completions waiting for a decode slot; past it requests get 429 with Retry-After."""
    max_tokens: int = 1024
    """Cap on a request's max_tokens (also the default, within the context)."""
    max_n: int = 8
    """Cap on a request's n (choices per prompt)."""
    max_body: int = 1 << 20
    """Largest request body in bytes (413 past it)."""
    timeout: float = 300.0
    """Seconds a request may take before it is cancelled (503)."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the API from a browser (CORS; "*": any); none: same origin only."""

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        self.allowed_origins = tuple(self.allowed_origins)
        for origin in self.allowed_origins:
            check_origin(origin)


@dataclass
class ServedModel:
    """One model the server answers for, chosen by the request's `model` field."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    template: Template | None = None
    info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


def served_model(name: str, model, tokenizer, template: Template | None = None, info: dict | None = None) -> ServedModel:
    info = {"context_length": model.config.block_size, "parameters": model.num_params(),
            "template": template.name if template else None, **(info or {})}
    return ServedModel(name, model, tokenizer, template, info)


def share_base(base, adapter_folder) -> tuple[torch.nn.Module, Template | None]:
    """A copy of `base` with the LoRA adapter in `adapter_folder` applied, whose base weights are the
    same tensors as base's (only the adapter's small matrices take new memory); and the adapter's
    template, if it records one."""
    from ..checkpoint import attach_adapter, read_meta, resolve

    folder = resolve(adapter_folder)
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # shares base's parameters
    attach_adapter(model, folder)
    model.to(base.lm_head.weight.device, base.lm_head.weight.dtype).eval()
    return model, as_template(read_meta(folder).get("template"))


def check_api_key(key: str | None, source: str = "--api-key") -> None:
    """A key a client can send: printable ASCII (HTTP headers carry nothing else), not empty, no
    surrounding spaces (a client's header loses them)."""
    if key is None:
        return
    if not key or key != key.strip() or not all(" " <= ch <= "~" for ch in key):
        bad = next((ch for ch in key if not " " <= ch <= "~"), None)
        why = f"it contains {bad!r}" if bad else ("it is empty" if not key else "it has surrounding spaces")
        raise UserError(f"{source} must be printable ASCII (letters, digits, punctuation) that an HTTP header "
                        f"can carry, but {why}: choose another key")


def check_origin(origin: str) -> None:
    """A CORS origin as browsers send it: "*", or scheme://host[:port] with no path (http://localhost:3000)."""
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
        port_ok = True
    except ValueError:
        port_ok = False
    if origin != "*" and not (parts.scheme in ("http", "https") and parts.hostname and port_ok
                              and parts.path == "" and not parts.query and not parts.fragment
                              and origin == f"{parts.scheme}://{parts.netloc}"):
        raise UserError(f"--allowed-origins: {origin!r} is not an origin: give scheme://host[:port] with no path "
                        "(e.g. http://localhost:3000), or * for any")


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse a non-loopback address without an API key unless --insecure."""
    import ipaddress

    if api_key or insecure or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(f"--host {host} makes the server reachable from other machines: give --api-key KEY "
                        "(or --insecure to serve without one)")
