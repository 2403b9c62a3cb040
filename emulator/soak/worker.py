"""One soak worker process: its share of the fleet against the TMS, then its partial verdict.

Started by emulator/soak/processes.py as ``python -m emulator.soak.worker SPEC.json``. The
spec names the TMS and Archive, the fleet members this worker runs and where it reports:
a progress file rewritten every second (the coordinator's live summary) and a result file
at the end (its verdict, with the raw latency samples so the coordinator's percentiles are
over every request, not an average of averages). Its /metrics, when asked for, is one
scrape target of the fleet's metrics view.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from emulator.config import network_settings
from emulator.interrupts import GracefulStop
from emulator.metrics import Metrics
from emulator.net.peers import Peer
from emulator.soak.fleet import FleetMember
from emulator.soak.runner import Progress, SoakConfig, SoakRun

# SoakConfig fields a spec carries as plain JSON; the rest are rebuilt from their text.
# Not sent as JSON: rebuilt from the spec, or (limits) judged by the coordinator only, over
# every worker's samples merged.
REBUILT = ("tms", "archive", "members", "network", "seed_options", "data_dir", "limits")


def spec_config(config: SoakConfig) -> dict:
    """The JSON-able part of a SoakConfig."""
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in REBUILT
    }


def write_json(path: Path, value: dict) -> None:
    """Replaces ``path`` whole, so a reader never sees half a file."""
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def config_from_spec(spec: dict) -> SoakConfig:
    return SoakConfig(
        **spec["config"],
        tms=Peer.parse(spec["tms"]),
        archive=Peer.parse(spec["archive"]),
        members=[FleetMember(*member) for member in spec["members"]],
        network=network_settings(spec["network"]),
        data_dir=Path(spec["data_dir"]),
    )


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The verdict counts interruptions and retries; a warning per UPS would flood the log.
    logging.getLogger("tdw.device").setLevel(logging.ERROR)
    config = config_from_spec(spec)
    metrics = Metrics()
    server = None
    if spec.get("metrics_port") is not None:
        server = metrics.serve(spec.get("metrics_host") or "127.0.0.1", spec["metrics_port"])
        print(f"metrics on {server.url}", flush=True)
    progress_path = Path(spec["progress"])

    def report(progress: Progress) -> None:
        write_json(progress_path, dataclasses.asdict(progress))

    run = SoakRun(config, metrics)
    stop = GracefulStop(signals_to_exit=3)
    stop.on_stop(run.stop)
    try:
        with stop.installed():  # the parent's SIGTERM (or the terminal's SIGINT): drain
            verdict = run.run(on_progress=report)
    finally:
        if server is not None:
            server.stop()
    result = verdict.as_json() | {"latency_samples": metrics.latencies.export()}
    write_json(Path(spec["result"]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
