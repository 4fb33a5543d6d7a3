"""Helpers the tests share: references, generators, relay processes and clients. No tests live here."""
