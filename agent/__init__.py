"""inferwatch agent: configuration, the pipeline that runs detectors on a Kafka
stream, the command line, state checkpoints and telemetry."""

__version__ = "0.1.0"
