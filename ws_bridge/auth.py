"""Who may see what: static bearer tokens and HS256 JWTs whose claims list room grants.

A read grant is a room pattern: "*" (everything), "workflow:<id>", "user:<id>" or
"execution:<id>". Joining a room needs a grant that covers it, and every event
is checked against the grants again before it is sent, so a principal never
receives an event outside them whichever room it arrived through.

Writing telemetry (OTLP) needs the "ingest" grant, which no read grant implies —
not even "*": a dashboard's token cannot forge events. "admin" implies both.

Steering runs (docs/control.md) needs a control grant, which no read grant implies either:
"control:*" (every workflow) or "control:workflow:<id>" (one workflow's runs). An engine
connecting to the control channel needs "engine", which implies nothing else. "admin"
implies every grant; with auth off, everyone is "admin".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from flowscope.collector.receiver import Forbidden, Unauthenticated

_SCOPED = ("workflow", "user", "execution")
INGEST = "ingest"
ADMIN = "admin"
ENGINE = "engine"
CONTROL_ALL = "control:*"
CONTROL_WORKFLOW = "control:workflow:"
_WRITE_GRANTS = frozenset({INGEST, ADMIN})
# Grants that say nothing about what may be read.
_NOT_READ = frozenset({INGEST, ADMIN, ENGINE})


class AuthError(Exception):
    """Missing or invalid credentials (HTTP 401 / WebSocket close 4401)."""


@dataclass(frozen=True)
class Principal:
    subject: str
    grants: frozenset[str]
    # When the credentials stop being valid (a JWT's `exp`, unix seconds); None: never.
    expires_at: float | None = None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at

    @property
    def unrestricted(self) -> bool:
        return "*" in self.grants or ADMIN in self.grants

    @property
    def may_ingest(self) -> bool:
        return not self.grants.isdisjoint(_WRITE_GRANTS)

    def may_join(self, room: str) -> bool:
        if self.unrestricted:
            return True
        if room == "all":
            return False
        if room.startswith("execution:"):
            # Which workflow an execution belongs to is known per event: filtered there.
            return any(g not in _NOT_READ and not g.startswith("control:") for g in self.grants)
        return room in self.grants

    def watched_rooms(self) -> list[str]:
        """The rooms that together carry every live event this principal may see."""
        if self.unrestricted:
            return ["all"]
        return sorted(g for g in self.grants if g.partition(":")[0] in _SCOPED and g.partition(":")[2])

    def may_see(self, event: Mapping[str, Any], user_id: str | None) -> bool:
        if self.unrestricted:
            return True
        return (
            f"workflow:{event.get('workflowId')}" in self.grants
            or f"execution:{event.get('executionId')}" in self.grants
            or (user_id is not None and f"user:{user_id}" in self.grants)
        )

    # -- steering (docs/control.md) ---------------------------------------------------------

    @property
    def may_serve_engine(self) -> bool:
        return ENGINE in self.grants or ADMIN in self.grants

    def may_control(self, workflow_id: str) -> bool:
        return ADMIN in self.grants or CONTROL_ALL in self.grants or f"{CONTROL_WORKFLOW}{workflow_id}" in self.grants

    @property
    def controls(self) -> list[str]:
        """What this principal may steer: ["*"] for every workflow, else the workflow ids (maybe none)."""
        if ADMIN in self.grants or CONTROL_ALL in self.grants:
            return ["*"]
        prefix = len(CONTROL_WORKFLOW)
        return sorted(g[prefix:] for g in self.grants if g.startswith(CONTROL_WORKFLOW) and len(g) > prefix)

    @property
    def may_control_any(self) -> bool:
        return bool(self.controls)


# Auth off (loopback only, or --no-auth): whoever connects may do anything, steering included.
ANONYMOUS = Principal("anonymous", frozenset({"*", ADMIN}))


@dataclass(frozen=True)
class AuthConfig:
    """`tokens` maps a static bearer token to (subject, grants); `jwt_secret` enables HS256 JWTs."""

    tokens: Mapping[str, tuple[str, frozenset[str]]] | None = None
    jwt_secret: str | None = None
    jwt_audience: str | None = None
    disabled: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.tokens) or bool(self.jwt_secret)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    @property
    def enabled(self) -> bool:
        # Unconfigured auth is only allowed on loopback (checked at start-up).
        return self.config.configured and not self.config.disabled

    def authenticate(self, header: str | None, query_token: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = None
        if header and header.lower().startswith("bearer "):
            token = header[7:].strip()
        token = token or query_token
        if not token:
            raise AuthError("missing credentials: send 'Authorization: Bearer <token>' or ?token=")
        return self._principal(token)

    def authorize_ingest(self, header: str | None) -> None:
        """The OTLP receivers' hook (flowscope.collector.receiver.Authorize): a bearer token with "ingest"."""
        if not header or not header.lower().startswith("bearer ") or not header[7:].strip():
            raise Unauthenticated(
                "missing credentials: send 'Authorization: Bearer <token>' "
                "(OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20<token>)"
            )
        try:
            principal = self._principal(header[7:].strip())
        except AuthError as exc:
            raise Unauthenticated(str(exc)) from exc
        if not principal.may_ingest:
            raise Forbidden(f"{principal.subject!r} may not write telemetry: the token needs the 'ingest' grant")

    def _principal(self, token: str) -> Principal:
        static = (self.config.tokens or {}).get(token)
        if static is not None:
            return Principal(static[0], static[1])
        if self.config.jwt_secret:
            return self._jwt(token)
        raise AuthError("invalid token")

    def _jwt(self, token: str) -> Principal:
        assert self.config.jwt_secret is not None
        try:
            claims = jwt.decode(
                token,
                self.config.jwt_secret,
                algorithms=["HS256"],
                audience=self.config.jwt_audience,
                options={"require": ["sub", "exp"], "verify_aud": self.config.jwt_audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        rooms = claims.get("rooms", [])
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise AuthError("invalid token: 'rooms' claim must be a list of strings")
        return Principal(str(claims["sub"]), frozenset(rooms), float(claims["exp"]))


def require_auth_on_public_bind(host: str, config: AuthConfig) -> None:
    """Auth may be off only on a loopback bind, unless explicitly disabled."""
    loopback = host in {"127.0.0.1", "localhost", "::1"} or host.startswith("127.")
    if not loopback and not config.configured and not config.disabled:
        raise ValueError(
            f"refusing to serve live events on {host} without authentication: configure tokens or a JWT secret "
            "(FLOWSCOPE_AUTH_TOKENS / FLOWSCOPE_JWT_SECRET), or disable auth explicitly (--no-auth)"
        )
