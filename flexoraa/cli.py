"""`flexoraa`: the command-line entry point (stack, migrations, tenants, worker, API, run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

from flexoraa.logs import hold_back_repeated_lines
from flexoraa.settings import Settings, unused_standby_copies

logger = logging.getLogger("flexoraa")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "web_port", None) is not None:
        overrides["worker_web_port"] = args.web_port
    if getattr(args, "port", None) is not None:
        overrides["api_port"] = args.port
    return Settings(**overrides)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# --------------------------------------------------------------------------- commands


def cmd_stack(args: argparse.Namespace) -> int:
    from flexoraa import stack

    settings = _settings(args)
    actions = {"up": stack.stack_up, "stop": stack.stack_down, "status": stack.stack_status}
    try:
        statuses = actions[args.action](settings)
    except stack.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(stack.describe(statuses))
    if args.action == "up":
        return _migrate_and_create_topics(settings)
    return 0


def _migrate_and_create_topics(settings: Settings) -> int:
    from flexoraa.kafka import TopicMismatch, TopicsNotCreated, ensure_topics
    from schemas.migrate import migrate

    applied = asyncio.run(migrate(settings.database_url))
    try:
        topics = asyncio.run(ensure_topics(settings))
    except (TopicMismatch, TopicsNotCreated) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logger.info(
        "migrations applied: %s; topics created: %s; topics reconfigured: %s",
        applied or "none", topics.created or "none", topics.reconfigured or "none",
    )  # fmt: skip
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from schemas.migrate import migrate

    applied = asyncio.run(migrate(_settings(args).database_url))
    _print_json({"applied": applied})
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from flexoraa.kafka import TopicMismatch, TopicsNotCreated, ensure_topics

    try:
        topics = asyncio.run(ensure_topics(_settings(args)))
    except (TopicMismatch, TopicsNotCreated) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_json({"created": topics.created, "reconfigured": topics.reconfigured})
    return 0


def cmd_tenants_create(args: argparse.Namespace) -> int:
    import asyncpg

    from api.tenants import create_tenant

    async def create() -> dict[str, str]:
        settings = _settings(args)
        conn = await asyncpg.connect(settings.database_url)
        try:
            tenant = await create_tenant(
                conn, args.name, args.admin_email, trial_tokens=settings.token_trial_grant
            )
        finally:
            await conn.close()
        return {"tenant_id": tenant.tenant_id, "api_key": tenant.api_key}

    _print_json(asyncio.run(create()))
    return 0


def cmd_subscriptions_create(args: argparse.Namespace) -> int:
    import asyncpg

    from flexoraa.credits import create_subscription

    async def create() -> dict[str, str]:
        conn = await asyncpg.connect(_settings(args).database_url)
        try:
            start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
            if start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            subscription_id = await create_subscription(
                conn, args.tenant_id, args.plan, args.monthly_tokens, start
            )
        finally:
            await conn.close()
        return {"subscription_id": subscription_id, "period_start": start.isoformat()}

    _print_json(asyncio.run(create()))
    return 0


def cmd_gmail_poller(args: argparse.Namespace) -> int:
    from connectors.gmail import GMAIL_NOT_CONFIGURED
    from connectors.gmail_poller import GmailPoller
    from connectors.gmail_store import GmailStore
    from flexoraa.crypto import load_secret_box
    from flexoraa.db import create_pool
    from flexoraa.kafka import EventPublisher

    settings = _settings(args)
    if not settings.gmail_configured:
        # Refused at start, not at the first due mailbox (which crashed the poller then).
        print(f"error: {GMAIL_NOT_CONFIGURED}", file=sys.stderr)
        return 2

    async def run() -> None:
        pool = await create_pool(settings)
        publisher = EventPublisher(settings)

        async def pool_factory() -> Any:
            return pool

        poller = GmailPoller(
            settings, GmailStore(pool_factory, load_secret_box(settings)), publisher
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        logging.getLogger(__name__).info("gmail poller %s started", poller.owner)
        try:
            await poller.run(stop)
        finally:
            await publisher.close()
            await pool.close()

    asyncio.run(run())
    return 0


# How long a stopping worker may take beyond its drain (flushing, committing, leaving the group)
# before it exits regardless.
STOP_GRACE_S = 10.0


def exit_if_still_running_after(seconds: float) -> threading.Timer:
    """Ends the process with status 1 if it still runs `seconds` from now.

    A stopping worker whose broker is down waits in aiokafka's flush for batches that can only
    time out (Faust's producer request timeout is 20 minutes): SIGTERM took a kill. Exiting
    without the flush is what a kill -9 does, and is as safe: offsets are committed only past
    records whose effects were delivered, so a restart reads the rest again.
    """

    def give_up() -> None:
        # Straight to stderr, not through logging: the stuck main thread may hold a handler's
        # lock.
        try:
            os.write(
                2,
                f"stopping took longer than {seconds:.0f} s; exiting without finishing (what was "
                "not committed is read again after a restart)\n".encode(),
            )
        finally:
            os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def cmd_worker(args: argparse.Namespace) -> int:
    from faust import Worker

    from flexoraa.kafka import wait_for_topics
    from flexoraa.runtime import settle_collector
    from streams.app import create_worker_app

    settings = _settings(args)

    class QuietWorker(Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            # mode leaves the root logger at DEBUG and filters in the handler, so every debug
            # call of aiokafka and Faust built a record: 12 % of a busy worker's CPU.
            logger.setLevel(level or logging.INFO)
            # mode replaced the handlers main() set up.
            hold_back_repeated_lines(logger.handlers)

        _exit_timer: threading.Timer | None = None

        async def stop(self) -> None:
            if self._exit_timer is None:
                self._exit_timer = exit_if_still_running_after(
                    settings.worker_shutdown_drain_s + STOP_GRACE_S
                )
            await super().stop()

    if settings.worker_event_loop == "uvloop":
        # Before anything creates a loop: mode's Worker asks the policy for one.
        import mode.loop

        mode.loop.use("uvloop")
    if (unused := unused_standby_copies(settings)) is not None:
        logger.warning(unused)
    # On a loop of its own, closed before mode's Worker makes its own. A stop asked for while
    # waiting ends the wait: before mode installs its handlers, SIGTERM's default action is
    # ignored by a container's PID 1 (docker stop would wait, then kill).
    waiting = asyncio.new_event_loop()
    try:
        wait = waiting.create_task(wait_for_topics(settings))
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            waiting.add_signal_handler(stop_signal, wait.cancel)
        try:
            waiting.run_until_complete(wait)
        except asyncio.CancelledError:
            logger.info("worker stopped while waiting for its topics")
            return 0
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            waiting.remove_signal_handler(stop_signal)
    finally:
        waiting.close()
    app = create_worker_app(settings)
    worker = QuietWorker(app, loglevel=settings.log_level.lower())
    settle_collector(settings.gc_gen0_threshold)
    worker.execute_from_commandline()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.http_protocol import CoalescingHttpToolsProtocol
    from api.main import create_app

    settings = _settings(args)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        # A response's head and body in one socket write (api.http_protocol).
        http=CoalescingHttpToolsProtocol,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0


def ensure_demo_tenant(settings: Settings) -> dict[str, str]:
    """The demo tenant of `make run`; its key is kept in the stack directory for the next run."""
    import asyncpg

    from api.tenants import create_tenant, find_principal
    from flexoraa.credits import grant_trial

    path = settings.stack_dir / "demo-tenant.json"

    async def ensure() -> dict[str, str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            if path.exists():
                saved = json.loads(path.read_text())
                if await find_principal(conn, saved["api_key"]) is not None:
                    # A demo tenant from before the token economy gets its trial too (once).
                    await grant_trial(conn, saved["tenant_id"], settings.token_trial_grant)
                    return {"tenant_id": saved["tenant_id"], "api_key": saved["api_key"]}
            tenant = await create_tenant(
                conn, "Demo tenant", trial_tokens=settings.token_trial_grant
            )
        finally:
            await conn.close()
        saved = {"tenant_id": tenant.tenant_id, "api_key": tenant.api_key}
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, private from its first byte, and moved into place whole: a cut-short
        # write was unreadable JSON at every later run, and the key was readable by anyone
        # until the chmod.
        aside = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(saved))
        os.replace(aside, path)
        return saved

    return asyncio.run(ensure())


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} was not healthy after {timeout_s:.0f}s")


def run_commands(settings: Settings) -> list[str]:
    """The processes `flexoraa run` starts. A Gmail poller only with the OAuth client set: one
    without it stopped at the first connected mailbox, and took the whole run down with it."""
    commands = ["worker", "api"]
    if settings.enable_gmail_polling and settings.gmail_configured:
        commands.append("gmail-poller")
    return commands


def cmd_run(args: argparse.Namespace) -> int:
    """Everything `make run` promises: the stack, the schema, topics, a worker and the API."""
    from flexoraa import stack

    settings = _settings(args)
    print(stack.describe(stack.stack_up(settings)), flush=True)
    if _migrate_and_create_topics(settings):
        return 1
    demo = ensure_demo_tenant(settings)
    python = [sys.executable, "-m", "flexoraa"]
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop_children(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Before the children start: a SIGTERM between their start and the handler left them
    # running, orphaned, on the ports the next run needs.
    signal.signal(signal.SIGTERM, lambda *_: stop_children())
    try:
        for name in run_commands(settings):
            if stopping:
                return 0
            children[name] = subprocess.Popen([*python, name])
        if settings.enable_gmail_polling and "gmail-poller" not in children:
            print("Gmail polling is off: set GMAIL_CLIENT_ID and GMAIL_CLIENT_SECRET", flush=True)
        # Ready, not just up: tables are recovered and partitions assigned before we say so.
        worker_ready = f"http://127.0.0.1:{settings.worker_web_port}/ready"
        _wait_healthy(worker_ready, children["worker"], 180)
        base = f"http://127.0.0.1:{settings.api_port}"
        # Ready (Kafka's producer started, PostgreSQL answering), as the first request needs.
        _wait_healthy(f"{base}/ready", children["api"], 60)
        print(
            "\n"
            f"  Flexoraa Streams is running.\n"
            f"  API:          {base} (metrics at /metrics)\n"
            f"  API docs:     {base}/docs\n"
            f"  Worker:       http://127.0.0.1:{settings.worker_web_port} (metrics at /metrics)\n"
            f"  Demo tenant:  {demo['tenant_id']}\n"
            f"  Demo API key: {demo['api_key']}\n\n"
            f"  Try: curl -s -X POST {base}/api/events/inbound \\\n"
            f"         -H 'Authorization: Bearer {demo['api_key']}' \\\n"
            "         -H 'Content-Type: application/json' \\\n"
            '         -d \'{"channel": "whatsapp", "contact": "+919800000001", '
            '"text": "Hi, what does the Pro plan cost?"}\'\n'
            "  Stop with Ctrl-C.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children.values()):
            time.sleep(0.5)
        failed = [name for name, child in children.items() if child.returncode not in (None, 0)]
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_children()
        # One deadline for all: the children stop in parallel, and a stuck one is killed. A
        # worker may take its whole drain and grace: killed before that, it left its group
        # without a word, and the next run waited out the session timeout for its partitions.
        deadline = time.monotonic() + settings.worker_shutdown_drain_s + STOP_GRACE_S + 5
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _moment(text: str) -> datetime:
    """An ISO time (UTC unless it says otherwise) or a time ago: "90s", "30m", "2h", "7d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time nor a time ago like 30m, 2h or 7d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _letter_filter(args: argparse.Namespace) -> Any:
    from flexoraa.dead_letters import LetterFilter

    # The Kafka client's assignment lines would interleave with what the command prints.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)

    return LetterFilter(since=args.since, until=args.until, reason=args.reason,
                        source=args.source, key=args.key)  # fmt: skip


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return number


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    from flexoraa.dead_letters import key_text, read_letters

    settings = _settings(args)
    prefix = f"{settings.topic_prefix}."
    letters = asyncio.run(read_letters(settings, _letter_filter(args), limit=args.limit))
    for stored in letters:
        letter = stored.letter
        if args.json:
            print(json.dumps({
                "partition": stored.partition, "offset": stored.offset, "key": key_text(letter),
                "replayed_at": stored.replayed_at.isoformat() if stored.replayed_at else None,
                **letter.model_dump(mode="json"),
            }))  # fmt: skip
            continue
        source = letter.source_topic.removeprefix(prefix)
        if letter.offset is not None:
            source += f"[{letter.partition}]@{letter.offset}"
        replayed = (
            f"  (replayed {stored.replayed_at:%Y-%m-%d %H:%M:%S})" if stored.replayed_at else ""
        )
        print(f"{letter.dead_lettered_at:%Y-%m-%d %H:%M:%S}  {source:<36}  "
              f"{key_text(letter) or '-':<36}  {letter.reason}{replayed}")  # fmt: skip
    if not args.json:
        print(f"{len(letters)} dead letters", file=sys.stderr)
    return 0


def cmd_dead_letters_replay(args: argparse.Namespace) -> int:
    import asyncpg

    from flexoraa.dead_letters import MissingTopic, read_letters, replay

    letter_filter = _letter_filter(args)
    if not args.all and letter_filter.is_empty():
        print("error: say which dead letters to replay (--since, --until, --reason, --source, "
              "--key), or --all", file=sys.stderr)  # fmt: skip
        return 2
    settings = _settings(args)

    async def run() -> Any:
        letters = await read_letters(settings, letter_filter)
        return await replay(settings, letters, dry_run=args.dry_run, again=args.again,
                            to_all_readers=args.to_all_readers,
                            past_token_dedup=args.past_token_dedup)  # fmt: skip

    try:
        report = asyncio.run(run())
    except MissingTopic as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        # Commands are put back only once their scheduled messages are known not cancelled.
        print(f"error: PostgreSQL did not answer whether scheduled messages were cancelled: "
              f"{exc!r}; nothing was replayed", file=sys.stderr)  # fmt: skip
        return 1
    _print_json({"dry_run": args.dry_run, **report.as_dict()})
    return 1 if report.failed else 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexoraa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack_parser = commands.add_parser("stack", help="the local Kafka broker and PostgreSQL")
    stack_parser.add_argument("action", choices=["up", "stop", "status"])
    stack_parser.set_defaults(func=cmd_stack)

    commands.add_parser("migrate", help="apply the SQL schema").set_defaults(func=cmd_migrate)

    topics = commands.add_parser("topics", help="Kafka topics of the pipeline")
    topics.add_argument("action", choices=["create"])
    topics.set_defaults(func=cmd_topics)

    tenants = commands.add_parser("tenants", help="tenants and their API keys")
    tenant_commands = tenants.add_subparsers(dest="tenant_command", required=True)
    create = tenant_commands.add_parser("create", help="create a tenant and print its API key")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--admin-email",
        action="append",
        default=[],
        help="an admin notified of alerts (repeatable)",
    )
    create.set_defaults(func=cmd_tenants_create)

    subscriptions = commands.add_parser("subscriptions", help="monthly token plans")
    subscription_commands = subscriptions.add_subparsers(dest="subscription_command", required=True)
    subscribe = subscription_commands.add_parser(
        "create", help="give a tenant a plan with monthly included tokens"
    )
    subscribe.add_argument("--tenant-id", required=True)
    subscribe.add_argument("--plan", required=True)
    subscribe.add_argument("--monthly-tokens", type=int, required=True)
    subscribe.add_argument("--start", help="ISO time the first cycle starts (default: now)")
    subscribe.set_defaults(func=cmd_subscriptions_create)

    worker = commands.add_parser("worker", help="run a stream worker (Faust)")
    worker.add_argument("--web-port", type=int, help="port of the worker's web server")
    worker.set_defaults(func=cmd_worker)

    poller = commands.add_parser(
        "gmail-poller", help="poll connected Gmail mailboxes (run as many as you like)"
    )
    poller.set_defaults(func=cmd_gmail_poller)

    api = commands.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)

    letters = commands.add_parser(
        "dead-letters", help="list the records agents set aside, and replay them once mended"
    )
    letter_commands = letters.add_subparsers(dest="letters_command", required=True)
    listing = letter_commands.add_parser(
        "list", help="the dead letters, oldest first per partition"
    )
    replaying = letter_commands.add_parser(
        "replay", help="produce dead letters again to the topics they were read from"
    )
    for letters_command in (listing, replaying):
        letters_command.add_argument("--since", type=_moment, help="ISO time or ago: 30m, 2h, 7d")
        letters_command.add_argument("--until", type=_moment, help="ISO time or ago")
        letters_command.add_argument("--reason", help="a part of the reason, any case")
        letters_command.add_argument("--source", help="the source topic, e.g. inbound-messages")
        letters_command.add_argument("--key", help="the record's key: a lead or tenant id")
    listing.add_argument(
        "--limit", type=_positive, help="only this many, the oldest (oldest first)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_dead_letters_list)
    replaying.add_argument("--all", action="store_true", help="every dead letter, no filter")
    replaying.add_argument("--dry-run", action="store_true", help="count, produce nothing")
    replaying.add_argument(
        "--again", action="store_true", help="letters replayed before too (each is marked)"
    )
    replaying.add_argument(
        "--to-all-readers",
        action="store_true",
        help="also letters of older workers, which do not name the handler that set them "
        "aside: every reader of their topic takes them again",
    )
    replaying.add_argument(
        "--past-token-dedup",
        action="store_true",
        help="also inbound and token letters older than TOKEN_SEEN_KEPT_DAYS, whose tokens "
        "the workers no longer recognise: an AI action or credit may count twice",
    )
    replaying.set_defaults(func=cmd_dead_letters_replay)

    run = commands.add_parser("run", help="stack, schema, topics, a worker and the API")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per request from the API's worker client would drown the useful lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    hold_back_repeated_lines(logging.getLogger().handlers)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
