"""spamray: fine-tune GPT-2 into a text classifier and score message archives with it on Ray.

The public API (stable; later modules, jobs and users call these names):

- `get_tokenizer()`: GPT-2's tokenizer, offline (`encode`, `encode_batch`, `pad_id`).
- `load_gpt2(source, preset=None)`: a GPT-2 language model from a checkpoint folder or URL,
  a published name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or "random".
- `TextClassifier`: `from_gpt2(...)`, `predict(texts)`, `save(url)`, `load(url)`.

Importing spamray does not import Ray: the core is plain PyTorch.
"""

__version__ = "0.1.0"

# Where each public name lives. They are imported on first use (PEP 562), so that a process that
# needs only a light module (a Ray worker that reads files, the scoring turn's actor) does not
# pay for importing torch.
_PUBLIC = {"Prediction": "classifier", "TextClassifier": "classifier", "PRESETS": "model", "GPTConfig": "model",
           "GPTModel": "model", "get_tokenizer": "tokenizer", "load_gpt2": "weights"}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'spamray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
