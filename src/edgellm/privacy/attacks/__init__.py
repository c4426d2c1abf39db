"""Attacks on what an honest-but-curious edge server receives in split inference and split learning.

Threat model. The server follows the protocol but tries to learn the device's text. It knows the public base model's
weights: the device's layers [0, k) are the public base plus a LoRA adapter the server does not know (the attacks use
the base layers). It sees the smashed data at cut k: one row of hidden states per token, after the link's codec and
any DP mechanism the device applies (`edgellm.privacy.noise`: per-row clipping, then Gaussian noise). In training it
also sees the gradient the device returns: with the head on the device (U-shaped split), the device sends
d loss / d h for the last server's output rows, nonzero at the positions that carry a label (the answer's tokens).
It may own public text and run the public model on it at will.

Attacks (pure functions on tensors; the model is passed in as tables or callables):
    `nearest.nearest_neighbour`: each row named by the closest row of a reference table: the base model's cut-k
        output of every vocabulary token alone (`nearest.token_references`) or the embedding matrix;
    `learned.train_inversion` / `learned.learned_inversion`: a small MLP trained on the public model's smashed
        data of public text (and, against noise, on noised copies: the noise-aware attacker);
    `optimize.optimize_inversion`: UnSplit-style search for the input whose cut-k output matches the rows;
    `labels.recover_labels`: the answer's tokens from the returned gradient.
Scores: `metrics.recovery_rate` (exact tokens) and `metrics.rouge_l` (ROUGE-L F1 of the words).
The harness that runs them against the real model is `edgellm.eval.privacy_engine` (`edgellm eval privacy`).
"""

from edgellm.privacy.attacks.labels import label_directions, recover_labels
from edgellm.privacy.attacks.learned import LearnedConfig, learned_inversion, train_inversion
from edgellm.privacy.attacks.metrics import recovery_rate, rouge_l, words
from edgellm.privacy.attacks.nearest import nearest_neighbour, token_references
from edgellm.privacy.attacks.optimize import OptimizeConfig, optimize_inversion

__all__ = [
    "LearnedConfig",
    "OptimizeConfig",
    "label_directions",
    "learned_inversion",
    "nearest_neighbour",
    "optimize_inversion",
    "recover_labels",
    "recovery_rate",
    "rouge_l",
    "token_references",
    "train_inversion",
    "words",
]
