"""Benchmark: signed WhatsApp webhook POSTs into one API process, to the 200.

Registers a channel, pre-signs one distinct payload per request (a real Meta shape, one text
message each, unique wamid) and drives the API with wrk (C, so the load generator does not
eat the CPU it measures). Prints requests per second and latency percentiles, writes JSON.

    .venv/bin/python -m bench.webhooks --seconds 10 --connections 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import bench_environment, wait_ready, write_result
from connectors.channels import register_channel
from connectors.meta import signature_for
from flexoraa.crypto import load_secret_box
from tests.fakes.meta_payloads import whatsapp_change, whatsapp_message, whatsapp_payload

PHONE_NUMBER_ID = "106540352242922"
APP_SECRET = "bench-app-secret"

_LUA = """
local bodies, signatures = {}, {}
for line in io.lines("%(path)s") do
  local signature, body = line:match("^(%%S+)\\t(.*)$")
  signatures[#signatures + 1] = signature
  bodies[#bodies + 1] = body
end
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/webhooks/whatsapp",
    {["Content-Type"] = "application/json", ["X-Hub-Signature-256"] = signatures[i]}, bodies[i])
end
"""


def write_payloads(path: Path, count: int) -> None:
    now = int(time.time())
    with path.open("w") as out:
        for i in range(count):
            payload = whatsapp_payload(
                [
                    whatsapp_change(
                        PHONE_NUMBER_ID,
                        [whatsapp_message(f"wamid.BENCH{i:08d}", f"9198{i % 50_000:08d}", now)],
                    )
                ]
            )
            body = json.dumps(payload, separators=(",", ":"))
            out.write(f"{signature_for(body.encode(), APP_SECRET)}\t{body}\n")


def parse_wrk(output: str) -> dict[str, float]:
    def to_ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    figures = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])}  # type: ignore[index]
    for label in ("50", "90", "99"):
        match = re.search(rf"\s{label}%\s+([\d.]+(?:us|ms|s))", output)
        if match:
            figures[f"p{label}_ms"] = round(to_ms(match[1]), 2)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    figures["non_2xx"] = float(errors[1]) if errors else 0.0
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--payloads", type=int, default=60_000)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk (make bench installs it)")

    with bench_environment() as environment, tempfile.TemporaryDirectory() as scratch:
        settings = environment.settings

        async def register() -> None:
            conn = await asyncpg.connect(settings.database_url)
            await register_channel(
                conn, load_secret_box(settings), tenant_id=environment.tenant_id,
                kind="whatsapp", external_id=PHONE_NUMBER_ID, app_secret=APP_SECRET,
                verify_token="bench", access_token="bench",
            )  # fmt: skip
            await conn.close()

        asyncio.run(register())
        payloads = Path(scratch) / "payloads.tsv"
        write_payloads(payloads, args.payloads)
        script = Path(scratch) / "post.lua"
        script.write_text(_LUA % {"path": payloads})
        api = environment.start("api")
        try:
            base = f"http://127.0.0.1:{settings.api_port}"
            wait_ready(f"{base}/ready")
            # Warm-up: connections, the channel cache, the producer's metadata.
            subprocess.run(
                [wrk, "-t1", "-c4", "-d2s", "-s", str(script), base],
                capture_output=True,
                check=True,
            )
            run = subprocess.run(
                [wrk, "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
                 "-s", str(script), base],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        finally:
            environment.stop(api)
    figures = parse_wrk(run.stdout)
    path = write_result(
        "webhooks", {"connections": args.connections, "seconds": args.seconds, **figures}
    )
    print(f"{'webhooks/s':>12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    print(
        f"{figures['requests_per_s']:>12.0f} {figures.get('p50_ms', 0):>8} "
        f"{figures.get('p90_ms', 0):>8} {figures.get('p99_ms', 0):>8} {figures['non_2xx']:>8.0f}"
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
