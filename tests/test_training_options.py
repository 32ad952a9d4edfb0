"""The chapter's exercises and the book's experiments as options: first-token pooling (6.3),
padding to the context (6.1), no causal mask, gradient accumulation. Shapes, what depends on
padding and what does not, the saved settings, and that predict, classify and a scoring replica
honour them; no long training."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

import spamray
from spamray import TextClassifier
from spamray.cli import main
from spamray.config import TrainConfig
from spamray.train import build_classifier
from spamray.train_steps import TokenizeAndPad, training_steps

TEXTS = ["WINNER!! claim your free prize now, call 09061701461", "ok see you at 5",
         "Free entry to win a cash prize, text WIN to 80086 now", "sorry, I'll call later"]


def tiny(pooling="last_token", causal=True, **options) -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"], pooling=pooling,
                                    trainable="all", causal=causal, **options).eval()


def alone_and_padded(classifier: TextClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's logits on its own, and in one batch padded to 40 tokens."""
    ids = classifier.encode(TEXTS)
    alone = torch.cat([classifier(torch.tensor([row]), torch.tensor([len(row)])) for row in ids])
    padded, lengths = spamray.get_tokenizer().pad(ids, length=40)
    return alone, classifier(torch.from_numpy(padded), torch.from_numpy(lengths))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pooling", ["last_token", "first", "mean"])
def test_predictions_do_not_depend_on_padding_wherever_the_pooling_skips_it(pooling, causal):
    with torch.no_grad():
        alone, padded = alone_and_padded(tiny(pooling, causal))
    assert padded.shape == (len(TEXTS), 2)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_last_position_pooling_reads_the_padding_so_it_depends_on_it():
    with torch.no_grad():
        alone, padded = alone_and_padded(tiny("last"))
    assert not torch.allclose(padded, alone, atol=1e-3)


def test_the_first_token_sees_only_itself_causally_and_the_whole_message_without_the_mask():
    def first_logits(classifier, text):
        ids = classifier.encode([text])[0]
        with torch.no_grad():
            return classifier(torch.tensor([ids]), torch.tensor([len(ids)]))

    for causal in (True, False):
        classifier = tiny("first", causal)
        same_start = first_logits(classifier, "Free entry to win"), first_logits(classifier, "Free lunch at noon?")
        assert torch.equal(*same_start) == causal  # exercise 6.3's handicap, and what lifting the mask lifts


def test_the_settings_are_saved_and_every_path_scores_with_them(tmp_path, capsys):
    from spamray.replica import Scorer, tokenize_batch

    classifier = tiny("first", causal=False)
    classifier.save(str(tmp_path / "model"))
    metadata = json.loads((tmp_path / "model" / "spamray.json").read_text())
    assert (metadata["pooling"], metadata["causal_mask"], metadata["pad_to"]) == ("first", False, None)
    loaded = TextClassifier.load(str(tmp_path / "model"))
    assert (loaded.pooling, loaded.causal) == ("first", False)
    expected = [p.probs["spam"] for p in classifier.predict(TEXTS)]
    assert [p.probs["spam"] for p in loaded.predict(TEXTS)] == pytest.approx(expected, abs=1e-6)
    assert main(["classify", str(tmp_path / "model"), *TEXTS]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["probs"]["spam"] for row in printed] == pytest.approx(expected, abs=1e-6)
    scored = Scorer(str(tmp_path / "model"), threads=1, model_name="m", precision="fp32")(
        tokenize_batch(pa.table({"text": TEXTS, "status": pa.nulls(len(TEXTS), pa.string())}), max_length=1024,
                       keep_text=False))
    assert scored["p_spam"].to_pylist() == pytest.approx(expected, abs=1e-6)
    assert tiny().causal  # the default: GPT-2's causal attention


def test_padding_to_the_context_with_last_pooling_pads_every_message_as_training_did(tmp_path, prepared_sms):
    cfg = TrainConfig(data=prepared_sms, output=str(tmp_path), weights="random", preset="gpt2-tiny", pooling="last",
                      padding="context", max_length=48)
    classifier = build_classifier(cfg, ["not spam", "spam"], pad_to=48).eval()
    assert (classifier.max_length, classifier.pad_to) == (48, 48)
    ids, lengths, _ = TokenizeAndPad(48, 48)({"text": np.array(TEXTS + ["word " * 80]), "label": np.zeros(5)})
    assert ids.shape == (5, 48) and lengths[-1] == 48  # a longer message cut to it, as the book's test set
    with torch.no_grad():
        trained_view = classifier(ids[:4], lengths[:4])  # how training saw them
    probs = classifier.score_token_ids(classifier.encode(TEXTS))  # scoring: each padded to 48 again
    torch.testing.assert_close(torch.softmax(trained_view, dim=1), torch.from_numpy(probs).float(), rtol=1e-4, atol=1e-5)
    classifier.save(str(tmp_path / "model"))
    assert TextClassifier.load(str(tmp_path / "model")).pad_to == 48
    # Poolings that skip the padding keep no pad length: any padding gives their predictions.
    assert build_classifier(TrainConfig(**{**cfg.__dict__, "pooling": "last_token"}), ["a", "b"], 48).pad_to is None


def test_accumulated_gradients_make_the_same_step_as_one_larger_batch():
    def one_step(accumulation: int, batch_size: int) -> dict:
        torch.manual_seed(0)
        classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["a", "b"], trainable="all")
        # SGD: the update is the gradient itself (Adam's first step is about its sign, which
        # rounding flips on gradients near zero)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5)
        ids = classifier.encode(TEXTS * 2)
        batches = []
        for start in range(0, 8, batch_size):
            rows = ids[start:start + batch_size]
            padded, lengths = spamray.get_tokenizer().pad(rows, length=40)
            batches.append((torch.from_numpy(padded), torch.from_numpy(lengths), torch.tensor([0, 1] * (batch_size // 2) or [0])))
        losses = [loss.item() for _, loss in training_steps(classifier, optimizer, batches, "cpu", accumulation)]
        assert len(losses) == len(batches)
        return {name: t.detach().clone() for name, t in classifier.state_dict().items()}

    big, accumulated = one_step(1, 8), one_step(4, 2)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)
    moved = one_step(1, 2)  # four steps of two: not the same update
    assert any(not torch.allclose(moved[name], big[name], atol=1e-6) for name in big)


def test_a_grad_accumulation_below_one_is_refused_before_training(prepared_sms, tmp_path):
    from spamray.train import train

    with pytest.raises(ValueError, match="--grad-accumulation 0"):
        train(TrainConfig(data=prepared_sms, output=str(tmp_path / "m"), weights="random", preset="gpt2-tiny",
                          grad_accumulation=0))


def accumulate_on_one_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["a", "b"], trainable="all")
        model = DistributedDataParallel(classifier)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ids = classifier.encode(TEXTS)
        batches = []
        for step in range(5):  # five batches, three to a step: the last step has two, both under no_sync
            rows = [ids[(rank + step) % len(ids)], ids[(rank + step + 1) % len(ids)]]
            padded, lengths = spamray.get_tokenizer().pad(rows, length=40)
            batches.append((torch.from_numpy(padded), torch.from_numpy(lengths), torch.tensor([rank % 2, step % 2])))
        list(training_steps(model, optimizer, batches, "cpu", accumulation=3))
        results[rank] = [t.detach().clone() for t in classifier.state_dict().values()]
    finally:
        dist.destroy_process_group()


def test_workers_stay_identical_when_an_epoch_ends_between_accumulated_steps():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(accumulate_on_one_rank, args=(2, port, results), nprocs=2)
        first, second = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
