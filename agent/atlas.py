"""MITRE ATLAS techniques that inferwatch findings cite (ATLAS data v5.6.0).

Kept as data, not strings scattered through detectors, so every finding names a
technique that exists and its tactic comes along for free.
"""

from __future__ import annotations

from dataclasses import dataclass

ATLAS_VERSION = "5.6.0"


@dataclass(frozen=True, slots=True)
class Technique:
    uid: str
    name: str
    tactic_uid: str
    tactic_name: str

    @property
    def parent_uid(self) -> str | None:
        """``AML.T0024`` for ``AML.T0024.002``; None for a top-level technique."""
        parts = self.uid.split(".")
        return ".".join(parts[:2]) if len(parts) == 3 else None


_T = Technique
TECHNIQUES: dict[str, Technique] = {
    t.uid: t
    for t in (
        _T("AML.T0015", "Evade AI Model", "AML.TA0007", "Defense Evasion"),
        _T("AML.T0043", "Craft Adversarial Data", "AML.TA0001", "AI Attack Staging"),
        _T("AML.T0043.000", "White-Box Optimization", "AML.TA0001", "AI Attack Staging"),
        _T("AML.T0043.001", "Black-Box Optimization", "AML.TA0001", "AI Attack Staging"),
        _T("AML.T0043.002", "Black-Box Transfer", "AML.TA0001", "AI Attack Staging"),
        _T("AML.T0043.004", "Insert Backdoor Trigger", "AML.TA0001", "AI Attack Staging"),
        _T("AML.T0024", "Exfiltration via AI Inference API", "AML.TA0010", "Exfiltration"),
        _T("AML.T0024.000", "Infer Training Data Membership", "AML.TA0010", "Exfiltration"),
        _T("AML.T0024.001", "Invert AI Model", "AML.TA0010", "Exfiltration"),
        _T("AML.T0024.002", "Extract AI Model", "AML.TA0010", "Exfiltration"),
        _T("AML.T0020", "Poison Training Data", "AML.TA0003", "Resource Development"),
        _T("AML.T0018", "Manipulate AI Model", "AML.TA0006", "Persistence"),
        _T("AML.T0018.000", "Poison AI Model", "AML.TA0006", "Persistence"),
        _T("AML.T0031", "Erode AI Model Integrity", "AML.TA0011", "Impact"),
    )
}


def technique(uid: str) -> Technique:
    """Look up a technique; a typo here is a programming error, so fail loudly."""
    try:
        return TECHNIQUES[uid]
    except KeyError:
        raise KeyError(f"unknown MITRE ATLAS technique {uid!r}; known: {sorted(TECHNIQUES)}") from None
