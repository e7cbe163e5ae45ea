"""Checkpoints: our format (safetensors + JSON config + training state) and the official release import.

Sections: generic save/load helpers; official tokenizer names; official world-action model names.
"""

from __future__ import annotations

# --- official tokenizer names (owned by the tokenizer work) ------------------------------------

# --- official world-action model names (owned by the world-action model work) ------------------
