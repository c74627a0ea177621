"""canfast: find the few feed-forward neurons a model cannot live without.

Implements CAN (Consistently Activated Neurons, arXiv 2512.00918): score every FFN neuron by
activation magnitude times gradient sensitivity, mask the top-k progressively until the model
collapses, and compare with random neuron sets.
"""

__version__ = "0.1.0"

from canfast.data import Sample, load_data  # noqa: E402
from canfast.errors import BadInput  # noqa: E402
from canfast.mask import masked  # noqa: E402
from canfast.model import Batch, Model, load  # noqa: E402
from canfast.objective import evaluate, generate_answers  # noqa: E402
from canfast.pipeline import (  # noqa: E402
    DataConfig,
    ModelConfig,
    ScoreConfig,
    SiteConfig,
    run,
)
from canfast.score import Scores, score  # noqa: E402
from canfast.sites import NeuronSet, Site  # noqa: E402
from canfast.sweep import SweepConfig, SweepResult, sweep  # noqa: E402

__all__ = [
    "BadInput",
    "Batch",
    "DataConfig",
    "Model",
    "ModelConfig",
    "NeuronSet",
    "Sample",
    "ScoreConfig",
    "Scores",
    "Site",
    "SiteConfig",
    "SweepConfig",
    "SweepResult",
    "__version__",
    "evaluate",
    "generate",
    "load",
    "load_data",
    "masked",
    "run",
    "score",
    "sweep",
]


def generate(model: Model, samples, neurons=None, max_new_tokens: int = 32, batch_size: int = 8):
    """Greedy answers of ``model`` for ``samples``; masked by ``neurons`` when given."""
    if neurons is None or len(neurons) == 0:
        return generate_answers(model, samples, max_new_tokens, batch_size)
    with masked(model, neurons):
        return generate_answers(model, samples, max_new_tokens, batch_size)
