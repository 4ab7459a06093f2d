"""Offline model knowledge: diffusers-format configs of the published SD1.5 / SD2.1 / SDXL models
(one folder per family), the CLIP BPE vocabulary, and the LDM checkpoint key layout (ldm_layout)."""
