"""`edgellm calc`: parameter counts equal transformers' and peft's, memory equals hand-computed cases, the two
published figures come out exactly, the split follows `chain_stages`, and the CLI reports bad input clearly."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from edgellm.calc.config import (
    CalcConfig,
    LoraSetup,
    Precision,
    Split,
    Workload,
    get_method,
    parse_format,
)
from edgellm.calc.layout import chain_layout, node_holdings
from edgellm.calc.memory import adapted_linears, calculate, fits_at_weight_bits
from edgellm.calc.presets import PRESETS, get_preset
from edgellm.calc.shape import MODEL_TYPES, TIED_BY_DEFAULT, shape_from_config
from edgellm.cli.main import main
from edgellm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HF_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2"]


def config_for(
    method: str = "full",
    rank: int | None = None,
    targets: tuple[str, ...] | None = None,
    weights: str | None = None,
    act_bits: int = 16,
    batch: int = 1,
    seq_len: int = 8,
    checkpointing: bool = False,
    cuts: tuple[int, ...] = (),
) -> CalcConfig:
    m = get_method(method)
    lora = LoraSetup(rank or m.lora_rank or 8, targets or m.lora_targets) if m.trains == "adapters" else None
    return CalcConfig(
        m,
        lora,
        Precision(parse_format(weights or m.weights), act_bits=act_bits),
        Workload(batch, seq_len, checkpointing),
        Split(cuts),
    )


def hf_model(config_dict: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config_dict["model_type"], **fields))


# --- parameter counts against transformers and peft ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", HF_TYPES)
def test_params_equal_transformers(model_type: str) -> None:
    config = tiny_config(model_type).to_dict()
    model = hf_model(config)
    assert shape_from_config(config, model_type).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
        ("qwen3", {"attention_bias": True}),
        ("gemma3_text", {"attention_bias": True, "tie_word_embeddings": False}),
        ("gpt2", {"n_inner": 48, "tie_word_embeddings": False}),
    ],
)
def test_params_equal_transformers_with_biases_and_untied_heads(model_type: str, extra: dict) -> None:
    config = {**tiny_config(model_type).to_dict(), **extra}
    model = hf_model(config)
    assert shape_from_config(config, model_type).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", HF_TYPES)
def test_tied_defaults_are_transformers_defaults(model_type: str) -> None:
    from transformers import AutoConfig

    assert AutoConfig.for_model(model_type).tie_word_embeddings == TIED_BY_DEFAULT[model_type]


@pytest.mark.parametrize(
    ("model_type", "targets"),
    [
        ("llama", ("q_proj", "v_proj")),
        ("llama", ("all-linear",)),
        ("qwen2", ("k_proj", "down_proj")),
        ("gpt2", ("c_attn",)),
        ("gpt2", ("c_proj",)),
        ("phi3", ("qkv_proj", "gate_up_proj")),
    ],
)
def test_lora_trainable_equals_peft(model_type: str, targets: tuple[str, ...]) -> None:
    from peft import LoraConfig, get_peft_model

    config = tiny_config(model_type).to_dict()
    target_modules = "all-linear" if targets == ("all-linear",) else list(targets)
    peft_model = get_peft_model(hf_model(config), LoraConfig(r=4, target_modules=target_modules))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    report = calculate(shape_from_config(config, model_type), config_for("lora", rank=4, targets=targets))
    assert report.whole.trainable_params == trainable


def test_preset_params_equal_released_models() -> None:
    # sum(p.numel()) of the released checkpoints (Hugging Face transformers' LlamaForCausalLM of each size)
    expected = {
        "llama-7b": 6_738_415_616,
        "llama-13b": 13_015_864_320,
        "llama-33b": 32_528_943_616,
        "llama-65b": 65_285_660_672,
        "smollm2-135m": 134_515_008,
    }
    assert {name: PRESETS[name].shape.params for name in expected} == expected


@pytest.mark.real_model
def test_default_preset_is_the_default_models_config(real_model_dir: Path) -> None:
    real = shape_from_config(json.loads((real_model_dir / "config.json").read_text()), "smollm2-135m")
    assert real == get_preset("smollm2-135m").shape


# --- the two published figures ---------------------------------------------------------------------------------------


def test_65b_full_finetuning_in_16_bits_is_780_gb() -> None:
    # QLoRA paper (Dettmers et al. 2023, §1): "more than 780 GB". 2 B fp16 weights + 2 B fp16 gradients + 8 B for
    # Adam's two fp32 states = 12 B per parameter, no fp32 master copy, no activations: 65e9 x 12 = 780e9 exactly.
    report = calculate(get_preset("llama-65b").shape, config_for("full", weights="fp16"))
    assert report.bytes_per_trainable_param == 12
    assert report.bytes_per_trainable_param * get_preset("llama-65b").nominal_params == 780 * 10**9
    assert report.whole.memory.model_state_bytes == 12 * 65_285_660_672 == 783_427_928_064  # "more than 780 GB"
    fp16 = config_for("full", weights="fp16")
    with_master = calculate(
        get_preset("llama-65b").shape, replace(fp16, precision=replace(fp16.precision, master_weights=True))
    )
    assert with_master.bytes_per_trainable_param == 16  # ZeRO's mixed-precision Adam: 1,044.6 GB instead


def test_lora_on_gpt3_trains_37_7_million() -> None:
    # LoRA paper (Hu et al. 2021, Table 4): r = 8 on W_q and W_v of GPT-3's 96 layers, d_model 12288
    report = calculate(get_preset("gpt3-175b").shape, config_for("lora"))
    assert [lin.name for lin in report.adapted] == ["attn.q_proj", "attn.v_proj"]
    assert report.whole.trainable_params == 96 * 2 * (2 * 8 * 12288) == 37_748_736
    # from GPT-3 paper's sizes; the LoRA paper's Table 4 reports 175,255.8M (an untied head: 175,221,817,344)
    assert report.whole.params == 174_604_259_328
    assert get_preset("gpt3-175b").published_params == 175_255_800_000


def test_24_gb_holds_33b_not_65b_under_qlora() -> None:
    budget = 24 * 10**9
    sizes = {
        n: calculate(get_preset(n).shape, config_for("qlora", seq_len=512, checkpointing=True))
        for n in ("llama-33b", "llama-65b")
    }
    assert sizes["llama-33b"].whole.memory.total_bytes <= budget < sizes["llama-65b"].whole.memory.total_bytes
    bits = fits_at_weight_bits(sizes["llama-65b"], budget)
    assert bits is not None and 1 < bits < 2  # 65B in 24 GB would need under 2 bits per linear weight


# --- hand-computed memory ----------------------------------------------------------------------------------------------

# tiny llama: d 32, MLP 64, 4 layers, 4 heads of 8, 2 KV heads, vocab 97, untied. One layer: q 32x32 + k 16x32 +
# v 16x32 + o 32x32 + gate, up 64x32 + down 32x64 = 9216, + 2 norms of 32 = 9280. All: 4 layers + embedding 97 x 32
# + final norm 32 + LM head 97 x 32.
TINY_PARAMS = 4 * 9280 + 97 * 32 + 32 + 97 * 32
# saved per token and layer: 2 norm inputs 64, attention input 32, q 32, k and v 16 each, attention output 32,
# MLP input 32, gate, up, act(gate), product 4 x 64
TINY_ACTS = 64 + 32 + 32 + 16 + 16 + 32 + 32 + 4 * 64
TINY_HEAD_BITS = 2 * 32 * 16 + 97 * 32  # final norm and LM head inputs at 16 bits, fp32 log-softmax


def tiny_shape():
    return shape_from_config(tiny_config("llama").to_dict(), "tiny")


def test_full_finetuning_bytes_by_hand() -> None:
    report = calculate(tiny_shape(), config_for("full", batch=2, seq_len=4))
    assert (report.whole.params, TINY_ACTS) == (43360, 480) == (TINY_PARAMS, 480)
    m = report.whole.memory
    assert (m.weights_bytes, m.gradients_bytes, m.optimizer_bytes) == (2 * 43360, 2 * 43360, 8 * 43360)
    assert m.activations_bytes == 8 * (4 * 480 * 16 + TINY_HEAD_BITS) // 8
    assert m.kv_cache_bytes == 0


def test_checkpointing_keeps_layer_inputs_and_one_layer() -> None:
    m = calculate(tiny_shape(), config_for("full", seq_len=8, checkpointing=True)).whole.memory
    assert m.activations_bytes == 8 * ((4 * 32 + 480) * 16 + TINY_HEAD_BITS) // 8


def test_lora_and_qlora_bytes_by_hand() -> None:
    report = calculate(tiny_shape(), config_for("lora", rank=2, seq_len=8))
    adapters = 4 * 2 * ((32 + 32) + (32 + 16))  # q [32x32] and v [16x32]: r x (in + out) each, 4 layers
    assert report.whole.trainable_params == adapters == 896
    m = report.whole.memory
    assert m.weights_bytes == 2 * 43360 + 2 * adapters
    assert (m.gradients_bytes, m.optimizer_bytes) == (2 * adapters, 8 * adapters)
    assert m.activations_bytes == 8 * (4 * (480 + 2 * 2) * 16 + TINY_HEAD_BITS) // 8  # + r per adapted module
    q = calculate(tiny_shape(), config_for("qlora", rank=2, seq_len=8)).whole.memory
    linear_bits = 4 * 9216 * (4 + 8 / 64 + 32 / (64 * 256))  # NF4 + double quantization
    qlora_adapters = 4 * 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # all-linear: r x (in + out) of the 7 modules
    assert q.weights_bytes == -(-int(linear_bits + 16 * (43360 - 4 * 9216) + 16 * qlora_adapters) // 8)


def test_inference_kv_cache_by_hand() -> None:
    m = calculate(tiny_shape(), config_for("inference", batch=3, seq_len=10)).whole.memory
    assert m.kv_cache_bytes == 3 * 10 * 4 * (2 * 2 * 8) * 2  # tokens x layers x (K, V of 2 heads x 8) x 2 B
    assert (m.gradients_bytes, m.optimizer_bytes, m.activations_bytes) == (0, 0, 0)


def test_activation_model_against_what_autograd_keeps() -> None:
    """The fused-kernel count (Korthikanti et al.) against transformers' eager llama in fp32: its RMSNorm and
    rotary keep a few extra intermediates, so it keeps more, within a stated bound."""
    config = tiny_config("llama")
    model = hf_model(config.to_dict()).train()
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(n for ptr, n in seen.items() if ptr not in params)
    ours = calculate(tiny_shape(), config_for("full", weights="fp32", act_bits=32, seq_len=64))
    assert 1.0 <= kept / ours.whole.memory.activations_bytes <= 1.25


def test_split_nodes_add_up_to_the_whole() -> None:
    shape = shape_from_config({**tiny_config("llama").to_dict(), "tie_word_embeddings": True}, "tied")
    report = calculate(shape, config_for("lora", rank=2, cuts=(1, 3)))
    assert [
        (n.holding.node, n.holding.start, n.holding.end, n.holding.embed, n.holding.head) for n in report.nodes
    ] == [("device", 0, 1, True, True), ("edge1", 1, 3, False, False), ("edge2", 3, 4, False, False)]
    assert sum(n.params for n in report.nodes) == report.whole.params  # head with the embedding: one tied copy
    assert sum(n.memory.total_bytes for n in report.nodes) == report.whole.memory.total_bytes
    server_head = calculate(shape, replace(config_for("lora", rank=2), split=Split((2,), "server")))
    assert sum(n.params for n in server_head.nodes) == server_head.whole.params + 97 * 32  # a copy of the tied table


# --- the split mirrors chain_stages ------------------------------------------------------------------------------------


def _all_cuts(num_layers: int):
    for k in range(4):
        yield from itertools.permutations(range(-1, num_layers + 1), k)


@pytest.mark.parametrize("head", ["device", "server"])
def test_layout_mirrors_chain_stages(head: str) -> None:
    from edgellm.model.stage import HEAD_PLACEMENTS, chain_stages

    assert HEAD_PLACEMENTS == ("device", "server")
    for cuts in _all_cuts(5):
        servers = tuple(f"s{i}" for i in range(len(cuts)))
        try:
            expected = [(o, s.start, s.end, s.embed, s.head) for o, s in chain_stages(5, cuts, "dev", servers, head)]
        except ConfigError as exc:
            with pytest.raises(ConfigError, match=re.escape(str(exc))):
                chain_layout(5, cuts, "dev", servers, head)
            continue
        got = [(o, h.start, h.end, h.embed, h.head) for o, h in chain_layout(5, cuts, "dev", servers, head)]
        assert got == expected, cuts


def test_mirrored_names_match_their_sources() -> None:
    from edgellm.calc.config import ALL_LINEAR
    from edgellm.lora.config import ALL_LINEAR as LORA_ALL_LINEAR

    assert ALL_LINEAR == LORA_ALL_LINEAR
    assert node_holdings(4, Split((0,), "server"))[0].num_layers == 0  # a thin device holds nothing


# --- bad input -----------------------------------------------------------------------------------------------------------


def test_bad_library_input_names_what_was_wrong() -> None:
    with pytest.raises(ConfigError, match="unknown LoRA target module.*'w_q'.*q_proj"):
        adapted_linears(tiny_shape(), LoraSetup(8, ("w_q",)))
    with pytest.raises(ConfigError, match="unsupported model_type 'bert'"):
        shape_from_config({"model_type": "bert"}, "x")
    with pytest.raises(ConfigError, match="'hidden_size' must be a positive integer"):
        shape_from_config({**tiny_config("llama").to_dict(), "hidden_size": 0}, "x")
    assert set(MODEL_TYPES) == {*HF_TYPES, "gpt3"}


# --- the CLI -----------------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["calc", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_for_the_default_model(capsys) -> None:
    code, out, _ = run_cli(capsys, "--json", "--cuts", "10,20", "--budget", "3GB")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"]["name"] == "smollm2-135m" and doc["params"] == 134_515_008
    assert [n["node"] for n in doc["nodes"]] == ["device", "edge1", "edge2"]
    assert [n["layers"] for n in doc["nodes"]] == [[0, 10], [10, 20], [20, 30]]
    assert doc["budget"]["fits"] is True and doc["assumptions"]


def test_cli_config_file_and_model_dir(capsys, tiny_llama_dir: Path) -> None:
    for spec in (str(tiny_llama_dir), str(tiny_llama_dir / "config.json")):
        code, out, _ = run_cli(capsys, "--model", spec, "--method", "qlora", "--json")
        assert code == 0 and json.loads(out)["params"] == TINY_PARAMS


def test_cli_compares_presets(capsys) -> None:
    code, out, _ = run_cli(capsys, "--preset", "llama-33b,llama-65b", "--method", "qlora", "--budget", "24GB")
    assert code == 0
    assert re.search(r"llama-33b .* yes", out) and re.search(r"llama-65b .* no", out)
    code, out, _ = run_cli(capsys, "--preset", "llama-7b,gpt3", "--json")
    assert [d["model"]["name"] for d in json.loads(out)] == ["llama-7b", "gpt3-175b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "llama-64b"], "unknown preset 'llama-64b'; choose from"),
        (["--method", "lora", "--lora-rank", "0"], "LoRA rank must be an integer >= 1, got 0"),
        (["--method", "lora", "--target-modules", "q_proj,wq"], "unknown LoRA target module(s) ['wq']"),
        (["--cuts", "10,40"], "cut 40 is out of range: cuts must lie in 1..29 for 30 layers"),
        (["--cuts", "20,10"], "cuts must be strictly increasing"),
        (["--cuts", "a"], "--cuts must be comma-separated layer indices"),
        (["--nodes", "a,b"], "2 node name(s) for 0 cut(s)"),
        (["--method", "full", "--weights", "nf4"], "full fine-tuning updates floating-point weights"),
        (["--lora-rank", "4"], "apply to lora and qlora, not to method 'full'"),
        (["--method", "sft"], "unknown method 'sft'"),
        (["--weights", "int3"], "unknown weight format 'int3'"),
        (["--budget", "lots"], "cannot read the size 'lots'"),
        (["--preset", "llama-7b", "--model", "x"], "give --preset or --model, not both"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_line(capsys, argv: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("edgellm: error: ") and message in err and err.count("\n") == 1


def test_help_names_every_preset_method_and_format() -> None:
    script = Path(sys.executable).with_name("edgellm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "edgellm"]
    done = subprocess.run([*command, "calc", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: edgellm calc") and not done.stderr
    text = " ".join(done.stdout.split())
    for name in (*PRESETS, "full, lora, qlora, inference", "fp32, bf16, fp16, int8, int4, nf4, nf4-dq"):
        assert name in text


def test_building_the_calc_parser_and_library_import_no_torch() -> None:
    code = "import sys, edgellm.cli.calc, edgellm.calc.report, edgellm.calc.layout; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_docs_show_the_commands_real_output(capsys) -> None:
    """Every `$ edgellm calc ...` block of docs/CALC.md is what the command prints today."""
    blocks = re.findall(r"```\n\$ edgellm calc (.*?)\n(.*?)```", (ROOT / "docs" / "CALC.md").read_text(), re.S)
    assert len(blocks) >= 3
    for argv, shown in blocks:
        code, out, _ = run_cli(capsys, *argv.split())
        assert code == 0 and out == shown, argv
