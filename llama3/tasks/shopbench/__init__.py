"""ShopBench (Amazon KDD Cup 2024) multi-task shopping benchmark: routing, prompts, constrained decoding, scoring.

``ShopBenchModel`` keeps the seed's interface (``predict(prompt, is_multiple_choice)`` and
``batch_predict(prompts, is_multiple_choice)``); ``llama3 eval shopbench`` runs the whole harness.
"""

from .data import LineProblem, Question, load_questions
from .harness import aggregate, build_report, evaluate
from .metrics import Scorer
from .predictor import Prediction, ShopBenchModel
from .router import Route, route

__all__ = [
    "LineProblem",
    "Prediction",
    "Question",
    "Route",
    "Scorer",
    "ShopBenchModel",
    "aggregate",
    "build_report",
    "evaluate",
    "load_questions",
    "route",
]
