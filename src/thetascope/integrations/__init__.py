"""Integrations with trainers other than Lightning's (each imports its framework only when imported)."""
