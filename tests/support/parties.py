"""The parties of a model run: components, a provider and the auditor, tokens minted once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from support.harness import Identity
from support.leakcheck import remember
from support.strategies import JwtCase


@dataclass
class Party:
    """A component, provider or the auditor, with its tokens minted once."""

    identity: Identity
    tokens: dict[JwtCase, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        now = int(time.time())
        valid_host = self.identity.host_jwt()
        self.tokens = {
            "valid": (self.identity.entity_jwt(), valid_host),
            "expired": (self.identity.entity_jwt(exp=now - 60), valid_host),
            "not_yet_valid": (self.identity.entity_jwt(nbf=now + 3600), valid_host),
            "expired_host": (self.identity.entity_jwt(), self.identity.host_jwt(exp=now - 60)),
        }
        for entity_jwt, host_jwt in self.tokens.values():
            remember(entity_jwt)
            remember(host_jwt)

    @property
    def key(self) -> str:
        return self.identity.entity_key
