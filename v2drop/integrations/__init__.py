"""Bridges to other evaluation harnesses (imported only by them)."""
