"""Harnesses for tests and tools only: a relay as a child process, a NATS cluster on loopback."""
