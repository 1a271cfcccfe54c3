"""Chat: sandboxed template rendering, context-full policies, KV reuse across turns, ``edgellm chat``."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from edgellm import bundle as bundles
from edgellm.errors import ChatTemplateError, ContextOverflowError, InvalidMessagesError, NoChatTemplateError
from edgellm.runtime import Runtime
from edgellm.runtime.chat import drop_oldest_turn, fit_messages, render

# Gemma's turn format (the 270M GGUF ships without a template): the system text opens the first user turn.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set prefix = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

USER = {"role": "user", "content": "Hello there"}
SYSTEM = {"role": "system", "content": "Answer in one word."}


# ------------------------------------------------------------------------------------------- rendering

def test_render_matches_the_turn_format():
    text = render(GEMMA_TEMPLATE, [SYSTEM, USER], bos_token="<bos>")
    assert text == ("<bos><start_of_turn>user\nAnswer in one word.\n\nHello there<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert not render(GEMMA_TEMPLATE, [USER], add_generation_prompt=False).endswith("model\n")


def test_template_raise_exception_becomes_a_typed_error():
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render(GEMMA_TEMPLATE, [USER, USER])


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{{ messages[0].update({'role': 'system'}) }}",
])
def test_sandbox_refuses_internals_and_mutation(template):
    with pytest.raises(ChatTemplateError, match="sandbox|refused|rendering failed"):
        render(template, [USER])


def test_sandbox_hides_private_attributes():
    # reading an unsafe attribute gives an undefined value (renders empty); using it raises
    assert render("[{{ raise_exception.__globals__ }}][{{ messages.__class__ }}]", [USER]) == "[][]"
    with pytest.raises(ChatTemplateError):
        render("{{ raise_exception.__globals__['__builtins__'] }}", [USER])


def test_template_helpers_like_hugging_face():
    assert render("{{ messages | tojson }}", [{"role": "user", "content": "é<b>"}]) == \
        '[{"role": "user", "content": "é<b>"}]'                      # no HTML escaping, no \\u escapes
    assert render("{% for m in messages %}{% if loop.first %}{% break %}{% endif %}{% endfor %}ok", [USER]) == "ok"
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render("{% for %}", [USER])


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty"), ("hi", "non-empty"), ([["user", "hi"]], "not a dict"),
    ([{"content": "hi"}], "role"), ([{"role": "user", "content": None}], "content"),
])
def test_malformed_messages_are_refused(messages, problem):
    with pytest.raises(InvalidMessagesError, match=problem):
        render(GEMMA_TEMPLATE, messages)


# ------------------------------------------------------------------------------------------ context fit

def _conversation(turns: int) -> list[dict]:
    messages = [SYSTEM]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return messages + [{"role": "user", "content": "last question"}]


def test_drop_oldest_keeps_system_and_restarts_at_a_user_turn():
    messages = _conversation(3)
    shorter = drop_oldest_turn(messages)
    assert shorter[0] == SYSTEM and shorter[1] == {"role": "user", "content": "question 1"}
    assert drop_oldest_turn([SYSTEM, USER]) is None


def test_fit_messages_policies():
    count = len                                   # one "token" per message keeps the arithmetic visible
    messages = _conversation(3)                   # 8 messages
    assert fit_messages(messages, count, n_ctx=10, reserve=2, on_overflow="error") == (messages, 0)
    with pytest.raises(ContextOverflowError) as info:
        fit_messages(messages, count, n_ctx=9, reserve=2, on_overflow="error")
    assert info.value.n_tokens == 10 and info.value.n_ctx == 9
    kept, dropped = fit_messages(messages, count, n_ctx=6, reserve=2, on_overflow="drop_oldest")
    assert kept == [SYSTEM] + messages[5:] and dropped == 4
    with pytest.raises(ContextOverflowError):
        fit_messages(messages, count, n_ctx=2, reserve=2, on_overflow="drop_oldest")
    with pytest.raises(ValueError):
        fit_messages(messages, count, n_ctx=10, reserve=2, on_overflow="truncate")


# ------------------------------------------------------------------------------ with a tiny model

@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgellm import converters
    out = tmp_path_factory.mktemp("tiny-chat") / "tiny-gemma.gguf"
    converters.convert(tiny_checkpoint("gemma3_text"), out, "f32")
    return out


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> Runtime:
    with Runtime.load(tiny_gguf, n_ctx=256, n_threads=1) as runtime:
        yield runtime


def test_template_sources_in_order_of_precedence(tiny, tiny_gguf, tmp_path):
    assert tiny.info.chat_template_source == "model"          # the converter copied tokenizer_config's
    assert tiny.render_chat([USER]).startswith("<bos><start_of_turn>user\nHello there")
    with Runtime.load(tiny_gguf, n_ctx=256, n_threads=1, chat_template="[{{ messages[0].content }}]") as rt:
        assert rt.info.chat_template_source == "argument" and rt.render_chat([USER]) == "[Hello there]"
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    (folder / "chat.jinja").write_text("<{{ messages | length }}>")
    bundles.write_manifest(folder, bundles.Manifest(
        model="m.gguf", chat_template="chat.jinja",
        files=(bundles.describe_file(folder, "m.gguf"), bundles.describe_file(folder, "chat.jinja"))))
    with Runtime.load(folder, n_ctx=256, n_threads=1) as rt:
        assert rt.info.chat_template_source == "bundle" and rt.render_chat([USER, USER]) == "<2>"


def test_chat_prompt_has_one_bos(tiny):
    ids = tiny.chat_tokens([USER])
    bos = tiny.backend.special.bos
    assert ids[0] == bos and ids.count(bos) == 1


def test_chat_streams_the_same_and_reuses_the_previous_turn(tiny):
    messages = [SYSTEM, USER]
    tiny.reset()
    first = tiny.chat(messages, max_tokens=8)
    assert "".join(c.text for c in tiny.stream_chat(messages, max_tokens=8)) == first.text
    follow_up = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    reused = tiny.chat(follow_up, max_tokens=8)
    assert reused.stats.reused_prompt_tokens >= len(tiny.chat_tokens(messages)) - 1
    tiny.reset()
    fresh = tiny.chat(follow_up, max_tokens=8)
    assert fresh.stats.reused_prompt_tokens == 0 and fresh.tokens == reused.tokens


def test_context_full_policies_on_a_real_context(tiny):
    long = [SYSTEM] + [m for i in range(12) for m in ({"role": "user", "content": f"tell me about item {i} " * 3},
                                                       {"role": "assistant", "content": "it is fine " * 4})]
    long.append(USER)
    with pytest.raises(ContextOverflowError):
        tiny.chat(long, max_tokens=16)
    done = tiny.chat(long, max_tokens=16, on_overflow="drop_oldest")
    assert done.dropped_messages > 0 and done.stats.prompt_tokens + 16 <= tiny.info.n_ctx


def test_a_model_without_template_says_so(tiny_gguf):
    with Runtime.load(tiny_gguf, n_ctx=256, n_threads=1) as rt:
        rt.chat_template = None                     # as the Gemma 3 270M GGUF, which carries none
        with pytest.raises(NoChatTemplateError, match="no chat template") as info:
            rt.chat([USER])
        assert "--chat-template" in info.value.hint


def _chat_cli(argv: list[str], stdin: str, monkeypatch) -> int:
    from edgellm.cli import chat as chat_command

    parser = argparse.ArgumentParser()
    chat_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", *argv])
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return args.run(args)


def test_cli_chat_session(tiny, tiny_gguf, monkeypatch, capsys):
    tiny.reset()
    expected = tiny.chat([USER], max_tokens=6).text
    code = _chat_cli([str(tiny_gguf), "--ctx", "256", "--threads", "1", "-n", "6"],
                     "Hello there\n/stats\n/reset\nHello there\n/exit\nnot read\n", monkeypatch)
    assert code == 0
    out, err = capsys.readouterr()
    assert out.count(expected + "\n") == 2             # the same reply after /reset
    assert "tok/s" in out and "conversation cleared" in err and "> " in err


def test_cli_chat_template_file(tiny_gguf, tmp_path, monkeypatch, capsys):
    template = tmp_path / "t.jinja"
    template.write_text(GEMMA_TEMPLATE)
    assert _chat_cli([str(tiny_gguf), "--ctx", "256", "--threads", "1", "-n", "4", "--chat-template", str(template),
                      "--system", "Be brief."], "hi\n", monkeypatch) == 0
    assert capsys.readouterr().out.endswith("\n")


# ------------------------------------------------------------------------------------ the real model

@pytest.mark.gemma
def test_gemma_needs_a_template_then_chats(gemma_gguf, monkeypatch):
    with pytest.raises(NoChatTemplateError, match="Gemma 3 270m"):
        _chat_cli([str(gemma_gguf), "--threads", "1"], "hi\n", monkeypatch)
    with Runtime.load(gemma_gguf, n_ctx=512, n_threads=1, chat_template=GEMMA_TEMPLATE) as rt:
        first = rt.chat([USER], max_tokens=24)
        assert first.text.strip() and first.finish_reason in ("stop", "length")
        second = rt.chat([USER, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Why?"}],
                         max_tokens=16)
        assert second.stats.reused_prompt_tokens > 0
