"""Connectors: sources (where records come from) and sinks (where findings go), one file per system."""
