"""The documentation stays true: the generated config reference, the executable tutorial, the CSV
example, plain-text `--help`, and no development history in the docs or the code."""
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Phrases that narrate the project's development rather than describe it. "session" and "round"
# alone have proper uses (a Ray session, the budget search's rounds), so only their narrating
# forms are listed: numbered sessions or rounds of work, days, earlier runs, quoted numbers, issues.
HISTORY = re.compile(
    r"\bthis session\b|\ban? (?:earlier|previous|later) session\b|\bsession \d|\buntil session\b"
    r"|\b(?:work|review|development) round \d|\bround \d+ of (?:work|development)\b"
    r"|\bslow day\b|\bfast day\b|\bearlier runs?\b|\bearlier measurements?\b"
    r"|\bonce quoted\b|\b(?:because|as) (?:it was|they were) quoted\b|\bissue \d+'s\b|\bthe issue's\b",
    re.IGNORECASE,
)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_is_what_the_generator_writes():
    expected = _generator().render()
    committed = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    assert committed == expected, "docs/config-reference.md is out of date: run python docs/gen_config_reference.py"


def test_the_config_reference_lists_every_registered_kind():
    from poison import ATTACKS, DEFENSES, TRIGGERS

    page = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    for path, registry in (("attack", ATTACKS), ("attack.trigger", TRIGGERS), ("defense", DEFENSES)):
        for name in registry.names():
            assert f"### `{path}.kind: {name}`" in page, (path, name)


def _section(page: str, heading: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    assert heading in text, f"{page} has no section {heading!r}"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_the_add_an_attack_tutorial_runs(capsys):
    from poison import ATTACKS

    blocks = re.findall(r"```python\n(.*?)```", _section("development.md", "## How to add an attack"), re.S)
    assert len(blocks) >= 2
    namespace = {"__name__": "docs_tutorial"}
    try:
        for block in blocks:
            exec(compile(block, "docs/development.md", "exec"), namespace)  # noqa: S102  (the page's own code)
    finally:
        ATTACKS._items.pop("example-relabel", None)  # leave the registry as the other tests know it
    assert "{'attack_success': 1.0}" in capsys.readouterr().out


def test_the_csv_example_config_validates():
    from sweeps.config import validate_config

    match = re.search(r"<!-- csv-example[^>]*-->\n```yaml\n(.*?)```",
                      (DOCS / "data-formats.md").read_text(encoding="utf-8"), re.S)
    assert match, "docs/data-formats.md lost its csv-example block"
    raw = yaml.safe_load(match.group(1))
    sweep = validate_config(raw, check_data=False)
    assert raw["data"]["dataset"] == "csv" and "attack.poison_count" in sweep.dimensions


def _help_texts():
    from sweeps.cli import _parser

    parser = _parser()
    yield "poisonsweep", parser.format_help()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            yield name, sub.format_help()


@pytest.mark.parametrize("name, text", list(_help_texts()))
def test_help_reads_as_plain_text(name, text):
    assert "``" not in text and ":class:" not in text and ":func:" not in text, name


def _scanned_files():
    yield ROOT / "README.md"
    yield from sorted(DOCS.rglob("*.md"))
    for package in ("poison", "trainers", "sweeps", "tests", "benchmarks"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_development_history_in_the_docs_or_the_code():
    me = Path(__file__).resolve()
    found = []
    for path in _scanned_files():
        if path.resolve() == me:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "development history:\n" + "\n".join(found)


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
