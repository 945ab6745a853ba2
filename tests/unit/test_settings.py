import pytest
from pydantic import ValidationError

from flexoraa.settings import Settings
from streams.rules.tokens import parse_prices


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-a:9092,broker-b:9092")
    monkeypatch.setenv("KAFKA_PARTITIONS", "12")
    monkeypatch.setenv("ENABLE_GMAIL_POLLING", "false")
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "broker-a:9092,broker-b:9092"
    assert settings.kafka_port == 9092
    assert settings.kafka_partitions == 12
    assert settings.enable_gmail_polling is False
    assert settings.enable_ai_qualification is True


def test_production_refuses_the_local_broker_default() -> None:
    with pytest.raises(ValidationError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Settings(environment="production")


def test_topic_prefix_is_validated() -> None:
    with pytest.raises(ValidationError):
        Settings(topic_prefix="has spaces")


def test_worker_advertised_url_defaults_to_its_bind_address() -> None:
    settings = Settings(worker_web_host="10.0.0.5", worker_web_port=6070)
    assert settings.worker_advertised_url == "http://10.0.0.5:6070"
    override = Settings(worker_canonical_url="http://worker-1:6066")
    assert override.worker_advertised_url == "http://worker-1:6066"


@pytest.mark.parametrize("every_interface", ["0.0.0.0", "::"])
def test_a_worker_bound_to_every_interface_advertises_its_own_address(
    monkeypatch: pytest.MonkeyPatch, every_interface: str
) -> None:
    """Replicas of one compose service: each reachable at its own container's address."""
    monkeypatch.setattr("socket.gethostname", lambda: "3f2a9c1b7d4e")
    monkeypatch.setattr("socket.gethostbyname", {"3f2a9c1b7d4e": "172.18.0.7"}.__getitem__)
    settings = Settings(worker_web_host=every_interface, worker_web_port=6066)
    assert settings.worker_advertised_url == "http://172.18.0.7:6066"


def test_a_name_resolving_to_loopback_is_advertised_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "debian-host")
    monkeypatch.setattr("socket.gethostbyname", lambda name: "127.0.1.1")
    assert Settings(worker_web_host="0.0.0.0").worker_advertised_url == "http://debian-host:6066"


def test_an_unresolvable_name_is_advertised_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    def unresolved(name: str) -> str:
        raise OSError(f"{name}: no address")

    monkeypatch.setattr("socket.gethostname", lambda: "worker-host")
    monkeypatch.setattr("socket.gethostbyname", unresolved)
    assert Settings(worker_web_host="0.0.0.0").worker_advertised_url == "http://worker-host:6066"


@pytest.mark.parametrize(
    "prices",
    [
        "qualifcation=1,reengagement=1,recovery=1",  # misspelt: qualification ran free
        "qualification=1,reengagement=1,recovery=1,recovery=2",
    ],
)
def test_token_prices_name_known_features_once(prices: str) -> None:
    with pytest.raises(ValidationError, match="each at most once"):
        Settings(token_prices=prices)


def test_a_feature_token_prices_leaves_out_costs_the_default_not_nothing() -> None:
    # It was charged 0; a deployment pricing only qualification still starts.
    prices = parse_prices(Settings(token_prices="qualification=2").token_prices)
    assert prices == {"qualification": 2, "reengagement": 1, "recovery": 1}
    assert parse_prices("qualification=2,recovery=0")["recovery"] == 0
