"""Helpers every layer may use: atomic files, logging, CPU runtime, devices, provenance."""
