"""klp-watch's machinery: the models of the two trampoline designs (model,
rfc_model), the breakpoints they check at (probes), the hand-off probes
(handoff), where their verdicts go (reporting), and how the guest is held
at the probe points (modes/).
"""
