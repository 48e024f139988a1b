import pytest

from safethink_server.evaluation.runner import Completion, split_inline_reasoning


@pytest.mark.parametrize(("content", "split"), [
    ("<think>First, 2+2=4.\n\nSo 4.</think>\n\nThe answer is 4.", ("First, 2+2=4.\n\nSo 4.", "The answer is 4.")),
    ("  <think>cut off while reasoning", ("cut off while reasoning", "")),
    ("No reasoning at all.", ("", "No reasoning at all.")),
])
def test_inline_reasoning_is_split_out(content, split):
    assert split_inline_reasoning(content) == split


def test_tokens_per_s_counts_the_whole_request():
    done = Completion(prompt_id="p", set="s", kind="benign", arm="a", completion_tokens=100, ttft_s=4.0, duration_s=5.0)
    assert done.tokens_per_s == 20.0  # not 99 / 1 s: a held-back step released at once is not decode speed
    assert Completion(prompt_id="p", set="s", kind="benign", arm="a", error="boom").tokens_per_s is None
