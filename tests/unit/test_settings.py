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
