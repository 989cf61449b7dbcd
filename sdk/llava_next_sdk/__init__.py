"""Async client for LLaVA-NeXT, in-process or remote."""
