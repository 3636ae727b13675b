"""Healing after merging: a short distillation of the merged model from the original one.

(the training choices, as data the CLI and recipes read without torch: ../heal_modes.py)
targets.py   what to train: all parameters, the changed layers and their neighbours, LoRA, or
             QLoRA (LoRA over an NF4 base, nf4.py)
teacher.py   what the student learns from: the reference in memory, or its cached top-k log-probs
distill.py   the loop (KL(reference || student) on calibration text), checkpoints and resume
footprint.py memory a heal needs, on paper, for each training choice
"""

import logging

# bitsandbytes' CPU backend warns, once, when imported (peft imports it wherever it is installed),
# that an optional "kernels" package is absent; the fallback it then uses is the one QLoRA heals
# run on here, so the warning only alarms (and broke the CLI's one-line error output)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
