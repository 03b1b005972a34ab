"""Shared Python helpers: loading the compiled library, argument checks, op registration."""
