"""`edgellm finetune --qat` end to end on the tiny chat model (no download): the run exports a model and its
quantized stage, which loads with the project's loader and generates the fake-quant model's greedy tokens, also
through `edgellm generate`; full fine-tuning of a layer range; bad combinations refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_LAYERS
from edgellm.cli.main import main
from edgellm.lora.inject import inject_lora, load_adapter_state
from edgellm.lora.peft_io import load_peft_adapter
from edgellm.model.prompt import encode_prompt
from edgellm.model.stage import StageSpec
from edgellm.qat import apply_qat
from edgellm.qat.export import ORIGIN
from edgellm.quant.scheme import parse_quant
from edgellm.quant.stage_files import load_stage
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config, load_tokenizer

TEXT = Path(__file__).parent / "data" / "eb1911_shakespeare.txt"
FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "48", "--lr", "1e-2", "--json"]
PROMPT = "The plays of Shakespeare"
WHOLE = StageSpec(0, TINY_LAYERS, embed=True, head=True)


def finetune(capsys, args: list[str]) -> tuple[int, dict | None, str]:
    code = main(["finetune", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


def greedy(stage, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, each by a full forward pass (no cache: nothing but the weights in play)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([out])
            logits = stage(x, torch.arange(len(out)).unsqueeze(0))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_qat_lora_run_exports_a_stage_that_generates_the_fake_quant_tokens(
    tiny_chat_dir, tmp_path, capsys, monkeypatch, scheme
):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["--model", str(tiny_chat_dir), "--data", str(TEXT), "--qat", scheme, "--output", str(out), *FAST]
    code, report, err = finetune(capsys, args)
    assert code == 0, err
    (export,) = report["exports"]
    assert export["model"] == str(out / "model") and export["quant"] == scheme
    (stage_file,) = export["stage_files"]
    record = json.loads((out / "model" / "qat.json").read_text())
    assert record["origin"] == ORIGIN and record["qat"] == scheme and record["lora"]["r"] == 8

    # The fake-quant model as it trained: the float base, the trained adapter, QAT's walker.
    qat_stage = load_stages(tiny_chat_dir, [WHOLE])[0]
    spec, tensors = load_peft_adapter(out / "adapter")
    inject_lora(qat_stage, "model.layers", spec, "device")
    load_adapter_state(qat_stage, "device", tensors)
    apply_qat(qat_stage, parse_quant(scheme))
    # The export, read by the loader every command uses, and by `edgellm generate`.
    exported = load_stage(Path(stage_file), load_config(out / "model"), WHOLE)
    from safetensors import safe_open

    with safe_open(stage_file, framework="pt") as f:
        assert f.metadata()["origin"] == ORIGIN and f.metadata()["quant"] == scheme
    ids = encode_prompt(load_tokenizer(tiny_chat_dir), PROMPT, chat=False)
    want = greedy(qat_stage, ids, 8)
    base = greedy(load_stages(tiny_chat_dir, [WHOLE])[0], ids, 8)
    assert want != base, "training must change the greedy tokens, or this test proves nothing"
    assert greedy(exported, ids, 8) == want
    code = main(["generate", "--model", str(out / "model"), "--quant", scheme, "--no-chat", "--json",
                 "--max-new-tokens", "8", PROMPT])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["new_tokens"] == want


def test_full_fine_tuning_of_a_layer_range_with_qat(tiny_chat_dir, tmp_path, capsys, monkeypatch):
    """--train-layers 1:3 --no-lora: layers 1 and 2 change (every weight), the others stay bit for bit; no adapter
    is written; the export is the QAT model."""
    from safetensors.torch import load_file

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["--model", str(tiny_chat_dir), "--data", str(TEXT), "--qat", "int4-g32,head=int8", "--train-layers",
            "1:3", "--no-lora", "--output", str(out), *FAST]  # fmt: skip
    code, report, err = finetune(capsys, args)
    assert code == 0, err
    assert report["adapters"] == [] and not (out / "adapter").exists()
    trainable = report["device_trainable_params"]
    per_layer = sum(p.numel() for n, p in load_stages(tiny_chat_dir, [WHOLE])[0].blocks[0].named_parameters())
    assert trainable == 2 * per_layer
    before, after = load_file(tiny_chat_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():
        changed = not torch.equal(after[name].to(tensor.dtype), tensor)
        in_range = name.startswith(("model.layers.1.", "model.layers.2."))
        assert changed == in_range, name
    ids = encode_prompt(load_tokenizer(tiny_chat_dir), PROMPT, chat=False)
    qat_stage = load_stages(out / "model", [WHOLE])[0]  # the trained float weights, fake-quantized
    apply_qat(qat_stage, parse_quant("int4-g32,head=int8"), (1, 3))
    (stage_file,) = report["exports"][0]["stage_files"]
    exported = load_stage(Path(stage_file), load_config(out / "model"), WHOLE)
    assert greedy(exported, ids, 8) == greedy(qat_stage, ids, 8)


def test_resume_continues_full_fine_tuning_from_its_checkpoint(tiny_chat_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    base = ["--model", str(tiny_chat_dir), "--data", str(TEXT), "--train-layers", "0:2", "--no-lora",
            "--checkpoint-every", "2", "--batch-size", "2", "--seq-len", "48", "--json"]  # fmt: skip
    code, whole, err = finetune(capsys, [*base, "--steps", "4", "--output", str(tmp_path / "a")])
    assert code == 0, err
    assert whole["exports"][0]["stage_files"] == []  # no --qat: a float model only
    trained = load_file(tmp_path / "a" / "model" / "model.safetensors")
    (tmp_path / "a" / "client-0" / "step-00000004.pt").unlink()  # as if killed after the step-2 checkpoint
    code, resumed, err = finetune(capsys, [*base, "--steps", "4", "--output", str(tmp_path / "a"), "--resume"])
    assert code == 0, err
    assert resumed["losses"]["0"] == whole["losses"]["0"][2:]
    again = load_file(tmp_path / "a" / "model" / "model.safetensors")
    assert set(again) == set(trained) and all(torch.equal(again[k], trained[k]) for k in trained)


def test_bad_qat_options_are_refused_with_one_line(tiny_chat_dir, tmp_path, capsys):
    from test_finetune import topology

    common = ["--model", str(tiny_chat_dir), "--data", str(TEXT), "--steps", "2", "--output", str(tmp_path / "o")]
    cases = [
        (["--qat", "int4-g32", "--quant", "nf4"], "drop --quant"),
        (["--qat", "int3"], "unknown quantization scheme"),
        (["--train-layers", "3"], "--train-layers takes A:B"),
        (["--train-layers", "2:2"], "0 <= A < B"),
        (["--train-layers", "2:9"], "--train-layers 2:9 needs layer"),
        (["--no-lora"], "nothing to train"),
        (["--no-lora", "--train-layers", "0:1", "--init-adapter", str(tmp_path)], "drop one of them"),
        (["--qat", "int8", "--lora-dropout", "0.1"], "drop --lora-dropout"),
        (["--train-layers", "0:2", "--clients", "2"], "use one client"),
        (["--qat", "int4-g64"], "group size 64 does not divide"),
        (["--no-lora", "--train-layers", "0:1", "--topology", str(topology(tiny_chat_dir, tmp_path, servers=1))],
         "--no-lora needs a run without --topology"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = finetune(capsys, [*common, *args])
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


@pytest.mark.multiprocess
def test_qat_through_the_split_exports_the_model_it_trained(tiny_chat_dir, tmp_path):
    """Real node processes (device [0,1) + head, edge1 [1,3), edge2 [3,4)): LoRA-QAT on every side and layer 0
    fully trained on the device; the export generates what a fake-quant rebuild of the run generates."""
    from test_finetune import finetune as finetune_split
    from test_finetune import topology

    from edgellm.model.arch import arch_for
    from edgellm.qat import train_parameters

    out = tmp_path / "run"
    args = ["--topology", str(topology(tiny_chat_dir, tmp_path)), "--data", str(TEXT), "--qat", "int4-g32",
            "--train-layers", "0:1", "--lora-rank", "4", "--output", str(out), *FAST]  # fmt: skip
    result = finetune_split(args, tmp_path / "home")
    assert sorted(result["server_trainable_params"]) == ["edge1", "edge2"]
    (export,) = result["exports"]
    (stage_file,) = export["stage_files"]

    stage = load_stages(tiny_chat_dir, [WHOLE])[0]  # the run rebuilt: float base, every side's adapter, layer 0
    spec, tensors = load_peft_adapter(out / "adapter")
    inject_lora(stage, "model.layers", spec, "device")
    load_adapter_state(stage, "device", tensors)
    layer0 = torch.load(out / "client-0" / "step-00000003.pt", weights_only=True)["weights"]
    params = train_parameters(stage, arch_for(load_config(tiny_chat_dir)), (0, 1))
    assert set(layer0) == set(params) and all(k.startswith("model.layers.0.") for k in layer0)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(layer0[name])
    apply_qat(stage, parse_quant("int4-g32"), (0, 1))
    exported = load_stage(Path(stage_file), load_config(out / "model"), WHOLE)
    ids = encode_prompt(load_tokenizer(tiny_chat_dir), PROMPT, chat=False)
    want = greedy(stage, ids, 8)
    assert want != greedy(load_stages(tiny_chat_dir, [WHOLE])[0], ids, 8)
    assert greedy(exported, ids, 8) == want
