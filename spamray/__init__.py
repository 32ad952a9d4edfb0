"""spamray: fine-tune GPT-2 into a text classifier and score message archives with it on Ray.

The public API (stable; later modules, jobs and users call these names):

- `get_tokenizer()`: GPT-2's tokenizer, offline (`encode`, `encode_batch`, `pad_id`).
- `load_gpt2(source, preset=None)`: a GPT-2 language model from a checkpoint folder or URL,
  a published name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or "random".
- `TextClassifier`: `from_gpt2(...)`, `predict(texts)`, `save(url)`, `load(url)`.

Importing spamray does not import Ray: the core is plain PyTorch.
"""

__version__ = "0.1.0"

from .classifier import Prediction, TextClassifier  # noqa: E402
from .model import PRESETS, GPTConfig, GPTModel  # noqa: E402
from .tokenizer import get_tokenizer  # noqa: E402
from .weights import load_gpt2  # noqa: E402

__all__ = ["GPTConfig", "GPTModel", "PRESETS", "Prediction", "TextClassifier", "get_tokenizer", "load_gpt2", "__version__"]
