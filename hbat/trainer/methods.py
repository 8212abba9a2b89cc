"""The methods of the HBAT paper as presets of one loop: which stages run, and what regularises them.

Every method shares every line of the loop (hbat.trainer.algorithm); a method only decides
- the stage plan: alternating IFA / HPA over N parts, or one IFA then one HPA stage (N = 1), or IFA only;
- the regulariser: HybridEWC (eq. 5/8), none, HBAT-Freeze, or the per-element Fisher EWC;
- a mixed-in loss: RLHF+pt mixes the SFT loss into HPA; SFT+hpa mixes the HPA (DPO) loss into SFT.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    alternate: bool          # N parts alternating IFA/HPA (else: every IFA stage, then every HPA stage)
    hpa: bool                # whether HPA stages run at all
    regularizer: str         # "hbat", "none", "freeze", "fisher"
    mix: str | None = None   # "sft_in_hpa" (RLHF+pt) or "hpa_in_sft" (SFT+hpa)
    description: str = ""


SPECS = {
    "hbat": MethodSpec(True, True, "hbat", description="HBAT: alternating IFA/HPA with the HybridEWC penalty"),
    "two_stage": MethodSpec(False, True, "none", description="SFT then DPO/PPO on all data (N = 1, no penalty)"),
    "sft_only": MethodSpec(False, False, "none", description="SFT only"),
    "no_ewc": MethodSpec(True, True, "none", description="ablation: alternation without the penalty"),
    "no_alternation": MethodSpec(False, True, "hbat", description="ablation: one IFA and one HPA stage, with EWC"),
    "rlhf_pt": MethodSpec(False, True, "none", "sft_in_hpa", "RLHF+pt: SFT loss mixed into the HPA stage"),
    "sft_hpa": MethodSpec(False, False, "none", "hpa_in_sft", "SFT+hpa: the DPO loss of the same part mixed into SFT (also with hpa: ppo)"),
    "freeze": MethodSpec(True, True, "freeze", description="HBAT-Freeze: freeze the most important tensors"),
    "fisher": MethodSpec(True, True, "fisher", description="HBAT with the original per-element Fisher EWC"),
}

# defaults a method implies (a config file or --set still overrides them)
PRESETS = {
    "two_stage": {"n_parts": 1},
    "sft_only": {"n_parts": 1},
    "no_alternation": {"n_parts": 1},
    "rlhf_pt": {"n_parts": 1},
    "sft_hpa": {"n_parts": 1},
}


def spec(method: str) -> MethodSpec:
    if method not in SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SPECS)}")
    return SPECS[method]


def preset(method: str) -> dict:
    spec(method)
    return dict(PRESETS.get(method, {}))
