"""The README is the newcomer's manual: it must not drift from the code."""

from flexoraa.settings import PROJECT_ROOT, Settings

README = (PROJECT_ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert missing == []


def test_the_two_commands_are_make_targets() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "make run" in README
    assert "make test" in README
    assert "\nrun:" in makefile
    assert "\ntest:" in makefile
    assert (PROJECT_ROOT / ".ci" / "run").read_text().strip().endswith("make test")
