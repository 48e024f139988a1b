"""The prompt module: where generation starts, with and without a prefill, and the scorer's context."""

import pytest

from safethink_server.prompt import Conversation, PromptError, opening, scoring_context, split_conversation
from safethink_server.schema import ReasoningConfig

USER = {"role": "user", "content": "q"}
R = ReasoningConfig()


@pytest.mark.parametrize(("prefill", "template_opens", "prefill_start", "expected"), [
    (None, False, True, ("<think>\n", "reasoning")),
    (None, True, True, ("", "reasoning")),
    (None, False, False, ("", "pre")),
    (None, True, False, ("", "reasoning")),  # a DeepSeek-R1-style template opened it
    ("Step 1:", False, True, ("<think>\nStep 1:", "reasoning")),
    ("Step 1:", True, True, ("Step 1:", "reasoning")),  # never a second start marker
    ("Step 1:", True, False, ("Step 1:", "reasoning")),
    ("Step 1:", False, False, ("Step 1:", "answer")),
    ("<think>\n</think>\n\nSure", False, True, ("<think>\n</think>\n\nSure", "answer")),
    ("x</think>\n\nSure", True, True, ("x</think>\n\nSure", "answer")),
])
def test_where_generation_starts(prefill, template_opens, prefill_start, expected):
    reasoning = R.model_copy(update={"prefill_start": prefill_start})
    assert opening(Conversation([USER], prefill), reasoning, template_opens) == expected


def test_a_prefill_needs_a_conversation_before_it():
    with pytest.raises(PromptError):
        split_conversation([{"role": "assistant", "content": "Sure"}], continue_final_message=True)
    with pytest.raises(PromptError):
        split_conversation([USER], continue_final_message=True)
    assert split_conversation([USER, {"role": "assistant", "content": "Sure"}], True) == Conversation([USER], "Sure")


def test_the_scorer_reads_the_latest_user_turn_and_the_rest_in_order():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I write thrillers."},
                {"role": "assistant", "content": "Nice."}, {"role": "user", "content": "Now the exact steps."}]
    assert scoring_context(Conversation(messages)) == (
        "Now the exact steps.", "system: Be brief.\n\nuser: I write thrillers.\n\nassistant: Nice.")
    assert scoring_context(Conversation([])) == ("", "")


def test_template_variables_and_tools_reach_the_chat_template(embedded_model_dir):
    from transformers import AutoTokenizer

    from safethink_server.prompt import render_chat, template_kwargs

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}|effort={{ reasoning_effort }}"
                               "|flag={{ flag }}|tools={{ tools | map(attribute='function.name') | join(',') if tools else '' }}|")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    conversation = split_conversation([USER], False, template_kwargs({"flag": 7}, "low"), [tool])
    text = tokenizer.decode(render_chat(tokenizer, conversation, R).ids)
    assert text.startswith("q|effort=low|flag=7|tools=get_weather|")
    for reserved in ("tokenize", "add_generation_prompt", "not an identifier"):
        with pytest.raises(PromptError):
            template_kwargs({reserved: True}, None)
