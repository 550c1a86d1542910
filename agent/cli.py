"""The ``inferwatch`` command line (CONTRACT.md "Command line").

Exit status: 0 success; 1 a failure while running; 2 bad usage, bad
configuration or bad input files, with one ``FILE: PATH.TO.KEY: problem`` line
per problem on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("inferwatch")


def _load(path: str):
    from agent.config import load_config

    return load_config(path)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: ok ({len(cfg.detector_options)} detectors, {len(cfg.sink_options)} sinks, "
          f"source {cfg.source.type}/{cfg.source.format})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from agent.assemble import build_pipeline

    cfg = _load(args.config)
    try:
        pipeline = build_pipeline(cfg)
    except (KafkaTimeoutError, KafkaConnectionError) as exc:  # TLS, SASL and network failures all look like this
        print(cfg.kafka.unreachable_hint(exc), file=sys.stderr)
        return EXIT_FAILURE
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pipeline.stop())
    try:
        counters = pipeline.run(until_idle_s=args.until_idle)
    except InterruptedError as exc:
        log.warning("%s", exc)
        counters = pipeline.counters
    log.info("consumed %d records (%d inference, %d feedback), dead-lettered %d, findings %d %s",
             counters.records, counters.inference, counters.feedback, counters.dead_lettered,
             counters.findings, counters.by_family)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from agent.artifacts import train

    cfg = _load(args.config)
    manifest = train(cfg, args.reference, args.model)
    print(f"artifacts written to {cfg.artifacts}: {', '.join(manifest['files'])} "
          f"(input shape {manifest['input_shape']}, {manifest['n_classes']} classes)")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from agent.eval import run_eval

    report = run_eval(device=args.device, quick=args.quick, families=args.family)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from agent.eval import print_report

        print_report(report)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(out_dir=args.out, duration_s=args.duration)


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.bench import run_bench

    return run_bench(events=args.events, device=args.device, features=args.features, as_json=args.json,
                     scale_out=not args.no_scale_out, detectors_only=args.detectors_only)


def cmd_audit(args: argparse.Namespace) -> int:
    from agent.audit import AuditInputError, run_audit

    try:
        return run_audit(args.old, args.new, args.reference, quarantine_path=args.quarantine, gates_path=args.gates,
                         config_path=args.config, as_json=args.json, device=args.device)
    except AuditInputError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE


def cmd_broker(args: argparse.Namespace) -> int:
    from agent.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port).start()
    print(f"broker listening on {broker.bootstrap} (Ctrl-C to stop)", flush=True)
    try:
        return broker.wait()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        broker.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferwatch", description="Runtime security monitor for deployed ML models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run the agent")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--until-idle", type=float, metavar="SECONDS", help="exit 0 once caught up and idle this long")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("validate", help="check a configuration without connecting anywhere")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("train", help="fit the detectors on reference data and write artifacts + manifest")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--reference", required=True, help=".npz with X (and y), or JSONL of events")
    s.add_argument("--model", help="the monitored model as a torch.export program (.pt2)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="the whole thing on an embedded broker with simulated traffic and attacks")
    s.add_argument("--out", default="./inferwatch-demo")
    s.add_argument("--duration", type=float, default=None, metavar="SECONDS")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("eval", help="detection quality on the built-in scenarios")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quick", action="store_true", help="smaller scenarios (for tests)")
    s.add_argument("--family", action="append", choices=["evasion", "extraction", "drift", "poisoning"])
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("bench", help="throughput and latency against a real broker")
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--events", type=int, default=200_000)
    s.add_argument("--features", type=int, default=64)
    s.add_argument("--no-scale-out", action="store_true", help="skip the two-process consumer-group measurement")
    s.add_argument("--detectors-only", action="store_true",
                   help="only the detectors on decoded batches, no broker (best of 5 passes, about 30 s)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("audit", help="compare two model versions offline; exit 1 when a gate fails")
    s.add_argument("--old", required=True, help="the serving version, a torch.export program (.pt2)")
    s.add_argument("--new", required=True, help="the candidate version, a torch.export program (.pt2)")
    s.add_argument("--reference", required=True, help="labelled clean data: .npz with X (its shape is the input "
                                                      "shape) and y, or JSONL of events")
    s.add_argument("--quarantine", help="quarantine JSONL (the quarantine sink's output): trigger candidates")
    s.add_argument("--gates", help="YAML of gate limits (configs/audit.example.yaml); built-in defaults without")
    s.add_argument("-c", "--config", help="agent configuration whose sinks receive the finding of a failed audit")
    s.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("broker", help="run the embedded Kafka-compatible broker in the foreground")
    s.add_argument("--port", type=int, default=9092)
    s.set_defaults(func=cmd_broker)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    from agent.config import ConfigError
    from agent.reference import ReferenceError
    from agent.signing import SigningKeyError
    from agent.state import ArtifactError

    try:
        return args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except (ReferenceError, ArtifactError, SigningKeyError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        log.exception("failed: %s", exc)
        return EXIT_FAILURE
