"""Detectors: one file per detector, all following :mod:`detectors.base`."""
