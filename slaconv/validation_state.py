"""Whether a work dir's validation measured the model it holds now.

``slaconv validate`` records what it measured (``reports/validation.json``'s ``weights``: the sha256 of every
file :meth:`WorkDir.weights_digest` covers, the SLA2 settings and their combined digest; the digest also goes
into ``sla2_config.json``'s validation summary).  Anything that changes those files or settings afterwards --
``calibrate``, a new ``convert``, an edit by hand -- leaves the verdict describing another model.  The states:

``current``    the model hashes to the recorded digest: the verdict is this model's
``stale``      it does not: the detail names the files or settings that changed
``unknown``    a validation written by an earlier slaconv, which recorded no digest
``none``       never validated
``unchecked``  a downloaded model whose weights are not here to hash and that has no ``checksums.sha256``

Only a current, passing validation lets a model be called validated (:attr:`ValidationState.earned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .checksums import CHECKSUMS_FILE, read_checksums
from .digest import weights_digest
from .errors import QualityGateError, UnvalidatedError
from .workdir import WorkDir

CURRENT, STALE, UNKNOWN, NONE, UNCHECKED = "current", "stale", "unknown", "none", "unchecked"


@dataclass(frozen=True)
class ValidationState:
    """A work dir's validation, as it stands against the model the folder holds now."""

    status: str
    """One of ``current``, ``stale``, ``unknown``, ``none``, ``unchecked`` (see the module docstring)."""
    passed: bool | None
    """The recorded verdict (None when never validated); it speaks for this model only when current."""
    detail: str
    """One line saying why the status is what it is."""

    @property
    def earned(self) -> bool:
        """A current validation whose gates passed: the only case in which the model may be called validated."""
        return self.status == CURRENT and self.passed is True

    def label(self) -> str:
        """What ``slaconv inspect`` prints."""
        if self.status == CURRENT:
            return f"{'passed' if self.passed else 'FAILED'} (current: measured these weights)"
        if self.status == STALE:
            return f"stale (weights changed since validation): {self.detail}"
        if self.status == NONE:
            return "not validated"
        return f"{self.status} freshness: {self.detail}"

    def to_dict(self) -> dict:
        """The fields, :attr:`earned` and :meth:`label` (what ``slaconv inspect --json`` prints)."""
        return {**asdict(self), "earned": self.earned, "label": self.label()}


def validation_state(work: WorkDir, file_hashes: Mapping[str, str] | None = None) -> ValidationState:
    """The state of ``work``'s validation.  ``file_hashes`` (hex sha256 by file name) replaces hashing the files
    themselves, e.g. from a downloaded ``checksums.sha256``; by default every measured file is read."""
    early, measured, recorded = _recorded(work)
    if early is not None:
        return early
    if file_hashes is None:
        file_hashes = work.file_hashes()
    settings = work.measured_settings()
    if weights_digest(file_hashes, settings) == recorded["digest"]:
        return ValidationState(CURRENT, recorded["passed"], "the validation measured exactly these weights and "
                                                            "settings")
    return ValidationState(STALE, recorded["passed"], _what_changed(measured, file_hashes, settings))


def hub_validation_state(work: WorkDir) -> ValidationState:
    """:func:`validation_state` of a downloaded model folder that holds ``checksums.sha256`` (which ``slaconv
    push`` uploads) instead of the weights."""
    if (work.path / CHECKSUMS_FILE).is_file():
        listed = read_checksums(work.path)
        return validation_state(work, file_hashes={name: listed[name] for name in WorkDir.measured_names(listed)})
    early, _, recorded = _recorded(work)
    return early or ValidationState(UNCHECKED, recorded["passed"], f"no {CHECKSUMS_FILE} to check the weights "
                                                                    "against")


def _recorded(work: WorkDir) -> tuple[ValidationState | None, Mapping, dict]:
    """(the state when it does not depend on the weights, else None; the report's ``weights`` record; the
    recorded verdict and digest)."""
    report = work.read_validation_report()
    summary = work.read_sla2_config().validation
    if report is None and summary is None:
        return ValidationState(NONE, None, "this model has not been validated"), {}, {}
    passed = (report if report is not None else summary).get("passed")
    measured = (report or {}).get("weights") or {}
    digest = measured.get("digest") or (summary or {}).get("weights_digest")
    if not digest:
        return ValidationState(UNKNOWN, passed, "validated by an earlier slaconv that did not record which "
                                                "weights it measured"), measured, {}
    return None, measured, {"passed": passed, "digest": digest}


def _what_changed(measured: Mapping, file_hashes: Mapping[str, str], settings: Mapping) -> str:
    before_files, before_settings = measured.get("files"), measured.get("settings")
    if not isinstance(before_files, Mapping) or not isinstance(before_settings, Mapping):
        return "the weights or SLA2 settings differ from those the validation measured"
    changes = [name for name in sorted(set(before_files) | set(file_hashes))
               if before_files.get(name) != file_hashes.get(name)]
    changes += [f"{key} (validated {before_settings.get(key)!r}, now {settings.get(key)!r})"
                for key in sorted(set(before_settings) | set(settings))
                if before_settings.get(key) != settings.get(key)]
    return "changed since validation: " + ", ".join(changes)


def require_validated(state: ValidationState, *, allow_unvalidated: bool = False,
                      allow_failed_validation: bool = False) -> None:
    """Refuse (before publishing, say) a model without a current validation (:class:`UnvalidatedError`, exit 9)
    unless ``allow_unvalidated``, and one whose current validation failed (:class:`QualityGateError`, exit 4)
    unless ``allow_failed_validation``."""
    if state.status != CURRENT:
        if allow_unvalidated:
            return
        what = state.detail if state.status == NONE else f"its validation is {state.status} ({state.detail})"
        raise UnvalidatedError(f"{what}: run `slaconv validate`, or pass --allow-unvalidated to push it anyway")
    if state.passed is not True and not allow_failed_validation:
        raise QualityGateError("this model failed validation; fix it or pass --allow-failed-validation to push anyway")
