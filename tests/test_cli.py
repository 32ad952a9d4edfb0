"""The one CLI, generated from the config dataclasses."""

import pytest

from spamray.cli import VERBS, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_prints_its_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: spamray {verb}")
    if verb == "score":  # a help text holding "%" once broke argparse's formatting
        assert "99.75%" in text and "--precision {auto,fp32,bf16}" in text
