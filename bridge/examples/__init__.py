"""Worked examples of the bridge (docs/bring_your_own_vla.md)."""
