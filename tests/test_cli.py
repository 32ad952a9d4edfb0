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
        assert "99.5% of messages" in text and "--precision {auto,fp32,bf16,onnx-fp32,onnx-int8}" in text


def test_list_options_take_several_values_and_optional_ones_their_type():
    from spamray.cli import build_parser, config_from_args
    from spamray.config import ScoreConfig

    args = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o",
                                      "--keep", "sender", "received_at", "--batch-size", "64"])
    cfg = config_from_args(ScoreConfig, args)
    assert cfg.keep == ["sender", "received_at"] and cfg.batch_size == 64 and cfg.retention_hours == 168.0


def test_spamray_errors_print_one_line_and_anything_else_its_traceback(monkeypatch, capsys):
    import spamray.cli
    from spamray.errors import SpamrayError

    def fails_with(error):
        def run(cfg):
            raise error
        return run

    monkeypatch.setitem(spamray.cli.VERBS, "classify", (spamray.cli.VERBS["classify"][0], fails_with(SpamrayError("the model is gone; train it again")), ""))
    assert main(["classify", "m", "hi"]) == 1
    assert capsys.readouterr().err == "spamray classify: error: the model is gone; train it again\n"
    for bug in (RuntimeError("CUDA out of memory"), KeyError("logits"), TypeError("unsupported operand")):
        monkeypatch.setitem(spamray.cli.VERBS, "classify", (spamray.cli.VERBS["classify"][0], fails_with(bug), ""))
        with pytest.raises(type(bug)):  # not caught: Python prints the traceback and exits 1
            main(["classify", "m", "hi"])
