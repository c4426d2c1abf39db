"""What each weight scheme and each smashed-data codec costs in perplexity, from the `eval ppl` harness, cached.

A scheme is scored on the whole model (every stage quantized); a codec at one cut in the middle of the model (the
planner adds one codec cost per hop that carries hidden states). The text is a public-domain article shipped with
the package (Encyclopaedia Britannica 1911, "Shakespeare", about 2,000 tokens), scored in windows of `ctx` tokens.
Results are cached per (model, text, window, scheme or codec, edgellm version) under `<home>/profiles/ppl/`.

An increase is never below `LOSSY_FLOOR_PCT` for a lossy scheme or codec, even where the text scored a hair better
(int8 weights or smashed data can): a cap of 0 then means lossless, the tokens of the whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgellm import __version__
from edgellm.eval.ppl import PplConfig
from edgellm.eval.ppl_engine import EvalConfig, run_ppl
from edgellm.net.codec import parse_codec
from edgellm.quant.scheme import parse_quant
from edgellm.store.paths import profiles_dir

log = logging.getLogger(__name__)

TEXT = Path(__file__).parent / "texts" / "eb1911_shakespeare.txt"
WINDOW = PplConfig(ctx=256)
LOSSY_FLOOR_PCT = 1e-4


def _cached_ppl(model: str, key: dict[str, Any], config: EvalConfig) -> float:
    digest = hashlib.sha256(json.dumps({**key, "v": __version__}, sort_keys=True).encode()).hexdigest()[:24]
    path = profiles_dir() / "ppl" / f"{digest}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["ppl"])
        except (OSError, ValueError, KeyError):
            pass
    log.info("scoring %s", key)
    ppl = float(run_ppl(config)["ppl"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**key, "ppl": ppl}))
    tmp.replace(path)
    return ppl


def ppl_costs(
    model: str, model_dir: Path, num_layers: int, schemes: Sequence[str], codecs: Sequence[str], text: Path = TEXT
) -> dict[str, Any]:
    """{"base_ppl", "schemes": {name: increase %}, "codecs": {name: increase %}, "text", "tokens_window"}."""
    text_sha = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16]
    base_key = {"model": config_sha, "text": text_sha, "ctx": WINDOW.ctx}
    base_cfg = EvalConfig(model=model, text=text, window=WINDOW)
    base = _cached_ppl(model, {**base_key, "scheme": "none", "codec": "none"}, base_cfg)
    out: dict[str, Any] = {"base_ppl": base, "schemes": {}, "codecs": {}, "text": text.name, "ctx": WINDOW.ctx}
    for scheme in schemes:
        quant = parse_quant(scheme)
        if quant is None:
            out["schemes"][scheme] = 0.0
            continue
        ppl = _cached_ppl(model, {**base_key, "scheme": quant.text, "codec": "none"},
                          EvalConfig(model=model, text=text, window=WINDOW, quant=quant))  # fmt: skip
        out["schemes"][scheme] = max(100.0 * (ppl / base - 1.0), LOSSY_FLOOR_PCT)
    cut = (max(num_layers // 2, 1),)
    for codec in codecs:
        if parse_codec(codec).codec == "none":  # lossless, compressed or not
            out["codecs"][codec] = 0.0
            continue
        ppl = _cached_ppl(model, {**base_key, "scheme": "none", "codec": codec, "cut": cut[0]},
                          EvalConfig(model=model, text=text, window=WINDOW, cuts=cut, act_codec=codec))  # fmt: skip
        out["codecs"][codec] = max(100.0 * (ppl / base - 1.0), LOSSY_FLOOR_PCT)
    return out
