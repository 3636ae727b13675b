"""Healing after merging: a short distillation of the merged model from the original one.

targets.py   what to train: all parameters, the changed layers and their neighbours, or LoRA
distill.py   the loop (KL(reference || student) on calibration text), checkpoints and resume
footprint.py memory a heal needs, on paper, for each training choice
"""
