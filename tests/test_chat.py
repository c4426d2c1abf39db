"""`edgellm chat`: the conversation kept within the context (pure, with literals), the model loaded once for every
turn with the history in each prompt (a tiny chat model, in this process), the same chat through a deployment's
device node (every node in this process, real gRPC), and the real model answering a piped chat."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.serve.conversation import Conversation, Message, Turn, parse_messages

SYSTEM = "Be brief."


def words(messages: list[dict[str, str]]) -> int:
    """A stand-in token count: one per word, plus two per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


# -- the conversation (pure) ------------------------------------------------------------------------------------


def test_messages_lay_out_system_turns_and_the_next_user_message():
    chat = Conversation(SYSTEM).add("hi", "hello").add("how are you", "fine")
    assert chat.messages("bye") == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "bye"},
    ]
    assert Conversation().add("hi", "hello").messages() == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]  # no system message: the template's default applies


def test_fit_drops_the_oldest_turns_and_keeps_the_system_prompt():
    chat = Conversation(SYSTEM).add("one two three", "four").add("five six", "seven").add("eight", "nine")
    assert words(chat.messages("ten")) == 2 + 2 + 8 + 7 + 6 + 3  # system, turns of 8, 7 and 6, the message
    same, dropped = chat.fit("ten", words, 28)
    assert (same, dropped) == (chat, 0)
    fitted, dropped = chat.fit("ten", words, 27)
    assert dropped == 1 and fitted.system == SYSTEM
    assert fitted.turns == (Turn("five six", "seven"), Turn("eight", "nine"))
    fitted, dropped = chat.fit("ten", words, 13)
    assert dropped == 2 and fitted.turns == (Turn("eight", "nine"),)
    fitted, dropped = chat.fit("ten", words, 7)
    assert (fitted, dropped) == (Conversation(SYSTEM), 3)
    with pytest.raises(
        ConfigError, match="the system prompt and this message take 7 tokens in the chat template, over the 6 "
    ):
        chat.fit("ten", words, 6)
    with pytest.raises(ConfigError, match="this message takes 3 tokens"):
        Conversation().fit("ten", words, 2)


def test_reset_forgets_the_turns_not_the_system_prompt():
    chat = Conversation(SYSTEM).add("hi", "hello")
    assert chat.reset() == Conversation(SYSTEM)
    assert chat.turns == (Turn("hi", "hello"),)  # frozen: reset returned a new conversation


def test_parse_messages_names_what_is_wrong():
    good = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert parse_messages(good) == (Message("system", "s"), Message("user", "u"))
    for bad, why in [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user"}], r"message 0 must be an object with exactly \['role', 'content'\]"),
        ([{"role": "user", "content": 3}], "must be strings"),
        ([{"role": "bot", "content": "x"}], "message 0: unknown role 'bot'; choose from"),
        ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], "message 1: a system message"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "last message must be the user"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_messages(bad)


def test_generate_request_takes_exactly_one_of_prompt_and_messages():
    from edgellm.serve.generate_request import GenerateRequest

    messages = [{"role": "user", "content": "hi"}]
    assert GenerateRequest.from_json({"messages": messages}).messages == (Message("user", "hi"),)
    assert GenerateRequest.from_json({"prompt": "hi"}).messages is None
    for bad, why in [
        ({}, "exactly one of 'prompt', 'messages' and 'prompt_ids'"),
        ({"prompt": "hi", "prompt_ids": [1]}, "exactly one of"),
        ({"prompt": "hi", "messages": messages}, "exactly one of"),
        ({"messages": "hi"}, "'messages' must be list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role"),
        ({"messages": messages, "chat": False}, "'chat' must be true with 'messages'"),
    ]:
        with pytest.raises(ConfigError, match=why):
            GenerateRequest.from_json(bad)


class EchoBackend:
    """A chat backend without a model: one token per word, and the answer repeats the user's last message."""

    context_tokens = 30
    max_new_tokens = 5

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return words(messages)

    def generate(self, messages: list[dict[str, str]], on_text) -> dict:
        return {"text": f"you said {messages[-1]['content']}", "new_tokens": [1, 2], "ttft_ms": 1.0,
                "decode_tok_per_s": 1.0, "messages": messages}  # fmt: skip


def test_chat_loop_keeps_resets_and_ends_and_on_a_terminal_survives_a_message_too_long(capsys):
    from edgellm.cli.chat import Display, chat_loop
    from edgellm.serve.chat_session import ChatConfig, ChatSession

    session = ChatSession(EchoBackend(), ChatConfig(SYSTEM))
    lines = ["hi", "", "/help", "word " * 30, "again", "/reset", "third", "/exit", "never"]
    assert chat_loop(session, lines, Display(json=True, interactive=True)) == 3
    out, err = capsys.readouterr()
    turns = [json.loads(line) for line in out.splitlines()]
    assert [t["user"] for t in turns] == ["hi", "again", "third"]
    assert [len(t["messages"]) for t in turns] == [2, 4, 2]  # system + user; + the first turn; after /reset
    assert "unknown command /help" in err and "error: the system prompt and this message take" in err
    assert session.conversation.turns == (Turn("third", "you said third"),)
    with pytest.raises(ConfigError, match="this message take"):  # not on a terminal: the error ends the chat
        chat_loop(session, ["word " * 30], Display(json=True, interactive=False))
    with pytest.raises(ConfigError, match="no room for the conversation beside --max-new-tokens 5"):
        ChatSession(EchoBackend(), ChatConfig(max_context=5))


# -- the chat command, in this process --------------------------------------------------------------------------


def chat(monkeypatch, capsys, args: list[str], lines: str) -> tuple[int, list[dict], str]:
    """Run `edgellm chat ARGS --json` with `lines` on stdin (not a terminal): exit code, JSON turns, stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", *args, "--json"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_chat_loads_the_model_once_and_keeps_the_history(tiny_chat_dir, monkeypatch, capsys):
    from edgellm.serve import local_engine
    from edgellm.store.weights import load_tokenizer

    loads = []
    real_load = local_engine.load_split
    monkeypatch.setattr(local_engine, "load_split", lambda config: loads.append(config) or real_load(config))
    args = ["--model", str(tiny_chat_dir), "--max-new-tokens", "6", "--system", SYSTEM]

    code, turns, err = chat(
        monkeypatch, capsys, args, "hello there\n\nwhat did I say?\n/reset\nagain\n/exit\nnot read\n"
    )

    assert code == 0 and len(loads) == 1 and len(turns) == 3, err
    tokenizer = load_tokenizer(tiny_chat_dir)
    prompts = [tokenizer.decode(t["prompt_tokens"]) for t in turns]
    first = turns[0]["text"]
    assert first and [t["user"] for t in turns] == ["hello there", "what did I say?", "again"]
    assert prompts[0] == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )  # --system replaced the template's default
    assert prompts[1].startswith(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
        f"<|im_start|>assistant\n{first}<|im_end|>\n<|im_start|>user\nwhat did I say?<|im_end|>\n"
    )
    assert "hello there" not in prompts[2] and prompts[2].startswith(f"<|im_start|>system\n{SYSTEM}")  # /reset
    assert "history cleared" in err and "dropped" not in err


def test_chat_drops_the_oldest_turns_to_fit_the_context(tiny_chat_dir, monkeypatch, capsys):
    from edgellm.store.weights import load_tokenizer

    lines = "".join(f"tell me about the number {n} please\n" for n in range(4))
    args = ["--model", str(tiny_chat_dir), "--max-new-tokens", "4", "--system", SYSTEM, "--max-context", "70"]

    code, turns, err = chat(monkeypatch, capsys, args, lines)

    assert code == 0 and len(turns) == 4, err
    assert [t["dropped_turns"] for t in turns][:2] == [0, 0] and sum(t["dropped_turns"] for t in turns) >= 1
    assert "oldest turn" in err
    assert all(len(t["prompt_tokens"]) + 4 <= 70 for t in turns)
    last = load_tokenizer(tiny_chat_dir).decode(turns[-1]["prompt_tokens"])
    assert last.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")  # the system turn is never dropped
    assert "number 0" not in last and "number 2" in last and "number 3" in last


def test_chat_refuses_what_cannot_fit_or_contradicts(tiny_chat_dir, monkeypatch, capsys):
    base = ["--model", str(tiny_chat_dir), "--max-new-tokens", "4"]
    code, _, err = chat(monkeypatch, capsys, [*base, "--system", "word " * 40, "--max-context", "30"], "hi\n")
    assert code == 2 and "the system prompt takes" in err and len(err.splitlines()) == 1
    code, _, err = chat(monkeypatch, capsys, [*base, "--max-context", "20"], "hi\n")
    assert code == 2 and "the chat template's default system prompt takes" in err
    code, _, err = chat(monkeypatch, capsys, [*base, "--system", SYSTEM, "--max-context", "30"], "word " * 40 + "\n")
    assert code == 2 and "the system prompt and this message take" in err
    code, _, err = chat(monkeypatch, capsys, ["--topology", "t.toml", "--cuts", "2"], "hi\n")
    assert code == 2 and "--cuts set the model loaded here" in err


# -- through a deployment (every node in this process, real gRPC) ------------------------------------------------


@pytest.fixture
def deployment(tiny_chat_dir, tmp_path):
    from edgellm.deploy.local_deployment import free_port
    from edgellm.deploy.node_builder import build_node, channel_config
    from edgellm.deploy.topology import write_topology
    from edgellm.net.rpc import serve

    names = ["device", "edge1"]
    path = tmp_path / "t.toml"
    topology = write_topology(path, {
        "model": {"name": str(tiny_chat_dir), "cuts": [2], "head": "device"},
        "deployment": {"route": names, "mode": "chain", "token": "chat-test", "deadline_s": 20.0},
        "nodes": [{"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{free_port()}"}
                  for n in names],
        "links": [{"between": names, "profile": "none", "codec": "none"}],
    })  # fmt: skip
    threads = torch.get_num_threads()  # build_node sets the node's own thread count
    try:
        built = [build_node(topology, name) for name in reversed(names)]
    finally:
        torch.set_num_threads(threads)
    servers = [serve(b.handler, b.address, channel_config(topology))[0] for b in built]
    yield path
    for server in servers:
        server.stop(grace=0)


def test_chat_through_a_deployment_matches_the_chat_in_this_process(deployment, tiny_chat_dir, monkeypatch, capsys):
    lines = "hello there\nwhat did I say?\n"
    args = ["--max-new-tokens", "5", "--system", SYSTEM]
    code, remote, err = chat(monkeypatch, capsys, [*args, "--topology", str(deployment)], lines)
    assert code == 0 and len(remote) == 2, err
    code, local, err = chat(monkeypatch, capsys, [*args, "--model", str(tiny_chat_dir)], lines)
    assert code == 0, err
    assert [t["prompt_tokens"] for t in remote] == [t["prompt_tokens"] for t in local]  # the history went along
    assert [t["new_tokens"] for t in remote] == [t["new_tokens"] for t in local]
    assert remote[0]["nodes"] and remote[0]["mode"] == "chain"  # the device node's report


# -- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_chat_answers_on_stdout_and_stats_on_stderr(real_model_dir):
    script = Path(sys.executable).with_name("edgellm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "edgellm"]
    done = subprocess.run(
        [*command, "chat", "--max-new-tokens", "8"],
        input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.splitlines()[0]
    stats = [line for line in done.stderr.splitlines() if "TTFT" in line]
    assert len(stats) == 2 and "TTFT" not in done.stdout
