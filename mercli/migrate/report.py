"""What a conversion could not carry over, changed, or leaves for the admin to do."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CHANGED", "DROPPED", "TODO", "Finding", "Report"]

DROPPED = "dropped"  # not carried over: behaviour mercli will not have (exit 1)
CHANGED = "changed"  # carried over with a documented difference
TODO = "todo"  # carried over; the admin must do something before switching over


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str  # 'rule "x"', 'target "y"', "settings"
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.message}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, kind: str, where: str, message: str) -> None:
        finding = Finding(kind, where, message)
        if finding not in self.findings:
            self.findings.append(finding)

    def dropped(self, where: str, message: str) -> None:
        self.add(DROPPED, where, message)

    def changed(self, where: str, message: str) -> None:
        self.add(CHANGED, where, message)

    def todo(self, where: str, message: str) -> None:
        self.add(TODO, where, message)

    def of(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    @property
    def anything_dropped(self) -> bool:
        return bool(self.of(DROPPED))
