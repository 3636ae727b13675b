"""What a heal can train, as data free of torch and peft, so the CLI builds its ``--train`` choice
without loading them (``heal/targets.py`` says what each one trains)."""

from __future__ import annotations

MODES = ("all", "changed", "lora", "qlora")
