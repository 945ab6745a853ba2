"""Topic names, derived from one prefix so a test or a second deployment can run beside another."""

from __future__ import annotations

from dataclasses import dataclass

# The workers' Faust tables. Each has a compacted changelog topic, created with the others:
# Faust creating it at a worker's first start raced its own metadata (the table's first write
# failed with PartitionsMismatch: "the changelog topic has 0 partitions").
TABLES = (
    "sessions",
    "deadlines",
    "deferred_ai",
    "token_accounts",
    "token_seen",
    "scheduled",
    "outbound_sent",
    "qualification",
    "leakage",
    "recovery",
    "sla_windows",
)


@dataclass(frozen=True, slots=True)
class TopicNames:
    prefix: str

    @property
    def inbound_messages(self) -> str:
        return f"{self.prefix}.inbound-messages"

    @property
    def outbound_commands(self) -> str:
        return f"{self.prefix}.outbound-commands"

    @property
    def outbound_messages(self) -> str:
        return f"{self.prefix}.outbound-messages"

    @property
    def delivery_status(self) -> str:
        return f"{self.prefix}.delivery-status"

    @property
    def lead_events(self) -> str:
        return f"{self.prefix}.lead-events"

    @property
    def token_usage(self) -> str:
        return f"{self.prefix}.token-usage"

    @property
    def token_credits(self) -> str:
        return f"{self.prefix}.token-credits"

    @property
    def latency(self) -> str:
        return f"{self.prefix}.latency"

    @property
    def notifications(self) -> str:
        return f"{self.prefix}.notifications"

    @property
    def deadlines(self) -> str:
        """Internal: "deadline reached" commands from the timers, keyed by lead."""
        return f"{self.prefix}.deadlines"

    @property
    def tenant_status(self) -> str:
        """Compacted: each tenant's latest balance and paused flag, read by every worker."""
        return f"{self.prefix}.tenant-status"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def dead_letters_replayed(self) -> str:
        """The dead letters `flexoraa dead-letters replay` put back, by position (a topic of its
        own: the dead-letter topic holds nothing but dead letters). Kept as long as they are."""
        return f"{self.prefix}.dead-letters-replayed"

    def changelog(self, table: str) -> str:
        """Faust's name for a table's changelog (the app id is the prefix)."""
        return f"{self.prefix}-{table}-changelog"

    def changelogs(self) -> list[str]:
        return [self.changelog(table) for table in TABLES]

    def all(self) -> list[str]:
        return [
            self.inbound_messages,
            self.outbound_commands,
            self.outbound_messages,
            self.delivery_status,
            self.lead_events,
            self.token_usage,
            self.token_credits,
            self.latency,
            self.notifications,
            self.deadlines,
            self.tenant_status,
            self.dead_letters,
            self.dead_letters_replayed,
            *self.changelogs(),
        ]

    def compacted(self) -> frozenset[str]:
        """Topics whose latest record per key is all that matters."""
        return frozenset({self.tenant_status, *self.changelogs()})
