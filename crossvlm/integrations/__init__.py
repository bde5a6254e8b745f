"""Bridges to other tools' plugin interfaces (each needs its optional extra installed)."""
