"""Integrations with training frameworks (TRL)."""
