"""Tactician: an AI-driven task scheduler."""
