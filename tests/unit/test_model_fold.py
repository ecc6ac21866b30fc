"""The reference model against the pure fold: thousands of histories in seconds, no server.

Each drawn history is applied to the model (`support.model`, plain dicts sharing no code
with the fold) and, as events, to `projections.state.fold`: the destroy rule is the
product's own `shred_plan`, the other checks are those the admin actors make. Every
reply (revisions, destroyed versions, refusals) must agree, then what the fold holds
must mean what the model holds (`Projection`), and a refold of the log as the shredder
leaves it (destroyed entries erased) must equal the live fold.

The run has teeth: the same property with a deliberately broken fold planted (undelete
restoring the oldest value, destroy forgetting a copy) must fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import projections.state as state_module
from events.types import (
    Event,
    FenceLifted,
    MappingAdded,
    MappingRemoved,
    SecretDeleted,
    SecretDestroyed,
    SecretPut,
    SecretUndeleted,
    WritesFenced,
)
from projections.state import EraseEvents, ViewState, fold, shred_plan
from secrets_nats_kv.errors import SecretNotFound
from support.model import Model, Outcome, Projection, Refusal, concrete_version, outcome
from support.strategies import WRITE_HISTORIES, write_operation

AT = 1_700_000_000.0


class Unsealed:
    """Values stored as they are: the fold never opens them, and crypto would cost the run
    most of its time (the sealing itself is the store actor's, run in test_model_actors)."""

    @staticmethod
    def seal(plain: bytes) -> bytes:
        return plain

    @staticmethod
    def open(sealed: bytes) -> bytes:
        return sealed


AT_REST: Any = Unsealed()

Operation = tuple[object, ...]


@dataclass
class FoldedLog:
    """The log as events, folded as the live view folds it; erasures as the shredder does."""

    state: ViewState = field(default_factory=ViewState)
    log: list[Event | None] = field(default_factory=list)

    def append(self, event: Event) -> int:
        self.log.append(event)
        seq = len(self.log)
        for effect in fold(self.state, seq, event):
            if isinstance(effect, EraseEvents):
                for erased in effect.seqs:
                    self.log[erased - 1] = None
        return seq

    def refold(self) -> ViewState:
        state = ViewState()
        for seq, event in enumerate(self.log, start=1):
            fold(state, seq, event)
        return state


def _existing(state: ViewState, name: str) -> state_module.SecretRecord:
    record = state.secrets.get(name)
    if record is None:
        raise Refusal("SecretNotFound")
    return record


def _shred(state: ViewState, name: str, version: int | None) -> tuple[tuple[int, ...], ...]:
    try:
        return shred_plan(_existing(state, name), version)
    except SecretNotFound:
        raise Refusal("SecretNotFound") from None


def apply_to_fold(folded: FoldedLog, op: Operation) -> object:
    """The event the admin actors would append for `op`, folded; the reply they would give."""
    state = folded.state
    match op:
        case ("fence",):  # what `rotate-key --online` appends, not an admin's write
            folded.append(WritesFenced(new_key="XNEW", rotation="r1", at=AT))
            return None
        case ("lift",):
            folded.append(FenceLifted(rotation="r1", at=AT))
            return None
    if state.fence is not None:  # the decider's check, before any decision
        raise Refusal("RotationInProgress")
    match op:
        case ("put", str(name), value):
            assert isinstance(value, str | bytes)
            plain = value.encode() if isinstance(value, str) else value
            kind = "string" if isinstance(value, str) else "binary"
            seq = folded.append(SecretPut(name=name, sealed=AT_REST.seal(plain), kind=kind, at=AT))
            return state.revision_of_seq[seq]
        case ("map", str(entity), list(names), bool(add)):
            event_type = MappingAdded if add else MappingRemoved
            folded.append(event_type(entity=entity, secrets=tuple(names), at=AT))
            return None
        case ("delete", str(name)):
            if _existing(state, name).latest() is None:
                raise Refusal("SecretNotFound")
            return state.revision_of_seq[folded.append(SecretDeleted(name=name, at=AT))]
        case ("undelete", str(name)):
            record = _existing(state, name)
            if record.newest_readable() is None:
                raise Refusal("SecretNotFound")
            if not record.deleted:
                raise Refusal("InvalidRequest")
            return state.revision_of_seq[folded.append(SecretUndeleted(name=name, at=AT))]
        case ("destroy", str(name), int(version)):
            versions, seqs = _shred(state, name, version)
            event = SecretDestroyed(name=name, versions=versions, erased_seqs=seqs, at=AT)
            return sorted(state.destroyed[folded.append(event)])
        case ("destroy_all", str(name)):
            versions, seqs = _shred(state, name, None)
            event = SecretDestroyed(name=name, versions=versions, erased_seqs=seqs, all=True, at=AT)
            return sorted(state.destroyed[folded.append(event)])
    raise AssertionError(f"not a fold operation: {op}")


def apply_to_model(model: Model, op: Operation) -> object:
    match op:
        case ("fence",):
            model.fence()
            return None
        case ("lift",):
            model.lift()
            return None
        case ("put", str(name), value):
            assert isinstance(value, str | bytes)
            return model.put(name, value)
        case ("map", str(entity), list(names), bool(add)):
            model.map(entity, names, add=add)
            return None
        case ("delete", str(name)):
            return model.delete(name)
        case ("undelete", str(name)):
            return model.undelete(name)
        case ("destroy", str(name), int(version)):
            return model.destroy(name, version, False)
        case ("destroy_all", str(name)):
            return model.destroy(name, None, True)
    raise AssertionError(f"not a fold operation: {op}")


def concrete(op: Operation, model: Model) -> Operation:
    """A destroy's drawn version made concrete once, before the model or the fold moves."""
    if op[0] == "destroy":
        _, name, choice = op
        assert isinstance(name, str)
        return ("destroy", name, int(concrete_version(model, choice, name) or 0))  # type: ignore[arg-type]
    return op


def check_history(history: list[Operation]) -> None:
    model, folded = Model(), FoldedLog()
    for drawn in history:
        op = concrete(drawn, model)
        expected: Outcome = outcome(lambda op=op: apply_to_model(model, op))  # type: ignore[misc]
        actual: Outcome = outcome(lambda op=op: apply_to_fold(folded, op))  # type: ignore[misc]
        assert actual == expected, f"{op[0]}: fold {actual}, model {expected}"
    # Every reply agreed; what is left must mean the same too (a state that went wrong
    # without a reply showing it yet is caught here).
    diff = Projection.of(folded.state, AT_REST).differences(model.projection())
    assert not diff, "fold != model:\n" + "\n".join(diff)
    refolded = Projection.of(folded.refold(), AT_REST, as_kept=True)
    diff = refolded.differences(Projection.of(folded.state, AT_REST, as_kept=True))
    assert not diff, "refold of the erased log != live fold:\n" + "\n".join(diff)


def _fenced_operation(code: int) -> Operation:
    """A write, or (one code in eight) an online rotation fencing or lifting the fence."""
    if code % 8 == 7:
        return ("fence",) if code & 8 else ("lift",)
    return write_operation(code)


FENCED_HISTORIES = st.binary(min_size=10, max_size=30).map(
    lambda codes: [_fenced_operation(code) for code in codes]
)


def run(examples: int, *, find_bugs: bool = False, fenced: bool = False) -> None:
    chosen = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=find_bugs,  # a planted bug is found the same way every run
        phases=[Phase.generate] if find_bugs else list(Phase),
        suppress_health_check=[HealthCheck.too_slow],
    )

    @chosen
    @given(FENCED_HISTORIES if fenced else WRITE_HISTORIES)
    def each(history: list[Operation]) -> None:
        check_history(history)

    each()


def test_the_fold_means_what_the_model_says() -> None:
    run(2000)


def test_writes_are_refused_while_fenced_as_the_model_says() -> None:
    run(1000, fenced=True)


# --- planted bugs: the run must find them ---------------------------------------------------


def _undelete_restores_the_oldest(
    state: ViewState, seq: int, event: SecretUndeleted
) -> list[state_module.Effect]:
    record = state.secrets.get(event.name)
    readable = record.live_versions() if record is not None else []
    if record is None or len(readable) < 2:
        return _real_undelete(state, seq, event)
    source = readable[0]  # the bug: the oldest value comes back, not the newest
    revision = state_module._next_secret_revision(state, seq, record, event.at)
    record.versions[revision] = state_module.Version(
        revision, source.origin, source.event_seq, source.kind, source.sealed, event.at
    )
    assert source.sealed is not None
    return [state_module.PutSecretEntry(event.name, revision, source.sealed, source.kind)]


def _destroy_forgets_copies(
    state: ViewState, seq: int, event: SecretDestroyed
) -> list[state_module.Effect]:
    # The bug: only the first of the versions sharing a value is shredded.
    return _real_destroy(state, seq, msgspec.structs.replace(event, versions=event.versions[:1]))


_real_undelete = state_module._undelete
_real_destroy = state_module._destroy
PLANTED: dict[str, tuple[str, Callable[..., list[state_module.Effect]]]] = {
    "undelete restores the oldest value": ("_undelete", _undelete_restores_the_oldest),
    "destroy forgets the copies of a value": ("_destroy", _destroy_forgets_copies),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_the_run_finds_a_planted_fold_bug(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, broken = PLANTED[bug]
    monkeypatch.setattr(state_module, name, broken)
    with pytest.raises(AssertionError):
        run(1000, find_bugs=True)


def _lifting_keeps_the_fence(
    state: ViewState, seq: int, event: state_module.Event
) -> list[state_module.Effect]:
    if isinstance(event, FenceLifted):  # the bug: a rotation that gave up leaves writes fenced
        return []
    return _real_rotation(state, seq, event)


_real_rotation = state_module._rotation


def test_the_fenced_run_finds_a_fence_that_is_never_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "_rotation", _lifting_keeps_the_fence)
    with pytest.raises(AssertionError):
        run(1000, find_bugs=True, fenced=True)
