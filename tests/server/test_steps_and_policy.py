from safethink_server.schema import Action, PolicyConfig
from safethink_server.steering.policy import decide, is_watching
from safethink_server.steering.steps import StepBoundaryDetector
from safethink_server.steering.text import SectionSplitter, StopMatcher


def feed_pieces(detector, pieces):
    text, n = "", 0
    for piece in pieces:
        text += piece
        n += 1
        if detector.is_complete(text, n):
            return n
    return None


def test_delimiter_split_across_tokens_ends_the_step_at_the_completing_token():
    assert feed_pieces(StepBoundaryDetector(), ["First", " we add", ".\n", "\n", "Then"]) == 4


def test_leading_blank_lines_do_not_end_an_empty_step():
    assert feed_pieces(StepBoundaryDetector(), ["\n\n", "Hello", " world", "\n\n"]) == 4


def test_no_delimiter_ends_at_max_step_tokens():
    assert feed_pieces(StepBoundaryDetector(max_step_tokens=5), ["word "] * 20) == 5


def test_delimiter_list_and_regex():
    assert feed_pieces(StepBoundaryDetector(["Step", "\n"]), ["a", " b", "\n", "c"]) == 3
    assert feed_pieces(StepBoundaryDetector(regex=r"\.\s"), ["One", ".", " Two"]) == 3


def test_markers_split_across_tokens_are_removed_and_sections_split():
    s = SectionSplitter("<think>", "</think>", "pre")
    out = []
    for piece in ["<", "th", "ink>", "\nreason", "ing</", "think", ">\n\nAnswer", "!"]:
        out += s.feed(piece)
    out += s.feed("", final=True)
    reasoning = "".join(x.text for x in out if x.section == "reasoning")
    answer = "".join(x.text for x in out if x.section == "answer")
    assert reasoning == "\nreasoning" and answer == "Answer!"


def test_text_without_a_start_marker_is_the_answer():
    s = SectionSplitter("<think>", "</think>", "pre")
    out = s.feed("Hello <") + s.feed("there", final=True)
    assert [(x.section, x.text) for x in out] == [("answer", "Hello <"), ("answer", "there")]


def test_stop_matcher_holds_back_a_partial_stop():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ([("abc ", None)], False)
    assert m.feed("N") == ([], False)
    assert m.feed("D more") == ([], True)


def test_policy_decisions():
    cfg = PolicyConfig()
    assert decide(cfg, 0.49, 0) is Action.RELEASED
    assert decide(cfg, 0.5, 0) is Action.REPLACED
    assert decide(PolicyConfig(mode="append"), 0.9, 0) is Action.APPENDED
    assert decide(cfg, 0.9, 2) is Action.REFUSED, "no intervention left: refuse by default"
    assert decide(PolicyConfig(on_budget_exhausted="release"), 0.9, 2) is Action.RELEASED
    assert decide(cfg, 0.0, 0, scorer_error=True) is Action.REFUSED
    assert decide(PolicyConfig(on_scorer_error="fail_open"), 0.0, 0, scorer_error=True) is Action.RELEASED
    assert is_watching(cfg, 3, 0) and not is_watching(cfg, 4, 0)
    assert is_watching(cfg, 1, 2), "refuse mode keeps watching after the budget is spent"
    assert not is_watching(PolicyConfig(on_budget_exhausted="release"), 1, 2), "paper mode stops watching"
    assert not is_watching(PolicyConfig(early_steps=0), 1, 0)


def test_text_before_a_start_marker_makes_the_output_an_answer():
    s = SectionSplitter("<think>", "</think>", "pre")
    out = s.feed("Hi <think>x") + s.feed("", final=True)
    assert [(x.section, x.text) for x in out] == [("answer", "Hi <think>x")]


def test_stop_matcher_releases_a_partial_match_at_the_end():
    m = StopMatcher(["END"])
    assert m.feed("abc EN") == ([("abc ", None)], False)
    assert m.feed("", final=True) == ([("EN", None)], False)


def test_stop_matcher_keeps_the_origin_of_what_it_holds_back():
    """A server text's tail held back as a possible stop goes out later as the server's, and model
    text held back goes out as the model's, whatever comes with it."""
    m = StopMatcher(["ENDING"])
    assert m.feed("Wait, EN", origin="prefix") == ([("Wait, ", "prefix")], False)
    assert m.feed("D", origin=None) == ([], False)
    assert m.feed(" go") == ([("EN", "prefix"), ("D go", None)], False)
    assert m.feed("x END", origin=None) == ([("x ", None)], False)
    assert m.feed("IN", origin="refusal") == ([], False)
    assert m.feed("G!", origin="refusal") == ([], True)
