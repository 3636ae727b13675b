"""What a heal can train, as data free of torch and peft at the bottom of the package, so the CLI
builds its ``--train`` choice and a recipe is checked
without loading them (``heal/targets.py`` says what each one trains)."""

from __future__ import annotations

MODES = ("all", "changed", "lora", "qlora")
