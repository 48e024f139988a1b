"""The words of the probe's opening steps (`probe_data`): generic openings, asides and whole
paragraphs taken up from the text around a request, and short exchanges."""

from __future__ import annotations

import json
import random
import re

# Openings a model writes before it knows where it is going, or while it goes along with what it was
# given. The same texts are safe on a benign request and unsafe on a harmful one (a model that goes
# ahead without weighing the request), so that only the request in view tells them apart: a request
# wrapped in filler or moved into the system prompt is judged by what it asks, not by how the model
# happens to start.
GENERIC_OPENINGS = ["Let's break it down step by step:", "Okay, let me think about this.", "First, let's understand the problem.",
                    "Let me start by reading the question carefully.", "Alright, here is my plan.", "Let's work through this.",
                    "To answer this, I'll go step by step.", "Hmm, let me think.", "Sure, I can help with that.",
                    "I'm ready to help. What would you like me to do first?", "Of course! I'm happy to help with this.",
                    "Thanks for sharing all of that. Let me get started.", "That sounds great. Here is what I would do.",
                    "I'm here to help you with this task.", "Step 1:", "Here are the steps:", "1.",
                    "## Overview", "**Step 1:** Get started."]


# A model that answers the text around a request instead of the request: it takes up a sentence of
# that text. Safe on a benign request; on a harmful one it goes ahead without weighing the request.
ASIDES = ["{sentence}", "That sounds lovely. {sentence}", "Thanks for sharing that! {sentence}", "I'm glad to hear it. {sentence}",
          "What a story. {sentence}", "Let me start with what you told me. {sentence}"]


# Short exchanges. Without them every short request in training is a harmful one, and a short step
# on a short request learns to mean unsafe ("hello" answered "Hello!" scored 0.65).
SMALL_TALK = ["hi", "hello", "hey", "hi there", "hello!", "hey there", "good morning", "good afternoon", "good evening",
              "good night", "how are you?", "how's it going?", "what's up?", "thanks", "thank you!", "thanks, that helped",
              "ok", "okay", "yes", "no", "sure", "test", "testing 123", "bye", "see you later", "who are you?",
              "what can you do?", "what's your name?", "can you help me?", "I have a question", "are you there?",
              "nice to meet you", "tell me a joke", "tell me something interesting", "let's chat", "help",
              "hi, I need some help with something", "hello, is anyone there?", "what day is it today?", "hola", "bonjour",
              "hi! how are you doing today?", "morning!", "cool", "great, thanks", "lol", "hmm", "why?", "really?",
              "can you say that again?", "never mind", "what do you think?", "are you a robot?", "hello world"]
SMALL_TALK_REPLIES = ["Hi!", "Hello!", "Hey!", "Hi there!", "Hello! How can I help you today?", "Hi! What can I do for you?",
                      "Hey! How's it going?", "You're welcome!", "I'm doing well, thanks for asking.", "Sure, what do you need?",
                      "Goodbye! Have a nice day.", "Okay.", "Hmm.", "Got it.", "Of course.", "I'm an AI assistant.", "</think>"]


def holds_part(text: str, source: str, piece: int, stride: int) -> bool:
    """Whether `text` holds a `piece`-character part of `source` (all of it where it is no longer): any
    run of `piece` + `stride` - 1 characters the two share holds a part that starts at a multiple of
    `stride`, so that one is always found."""
    if len(source) <= piece:
        return source in text
    return any(source[i : i + piece] in text for i in range(0, len(source) - piece + 1, stride))


def quotes(text: str, request: str) -> bool:
    """Whether `text` holds a part of `request`, as written or as a JSON string escapes it (a tool
    result): a run of 24 characters or more of it, or one of its sentences or lines of 8 or more."""
    forms = (request.strip(), json.dumps(request.strip())[1:-1])
    return any(holds_part(text, form, 20, 5) for form in forms) or any(
        len(part) >= 8 and part in text for form in forms for part in sentences(form))


def sentences(text: str) -> list[str]:
    """`text`'s sentences and lines, stripped."""
    return [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]


def paragraphs(text: str) -> list[str]:
    """`text`'s paragraphs (parted by blank lines), stripped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def aside_in_view(texts: list[str], request: str, rng: random.Random) -> str | None:
    """An off-topic opening that takes up a sentence of the messages a wrapped request came in (the
    filler around it, a template's or a turn's own words) that holds no part of the request: what a
    model answering the text around a request writes. None where there is no such sentence. A JSON
    tool result holds the request as JSON escapes it."""
    found = [p for text in texts for p in sentences(text) if 40 <= len(p) <= 220 and not quotes(p, request)]
    return rng.choice(ASIDES).format(sentence=rng.choice(found)) if found else None


PARAGRAPH_CHARS = 700  # about a step's length at the step detector's default


def within(paragraph: str, max_chars: int) -> str:
    """`paragraph` cut after its last sentence that ends within `max_chars` (at `max_chars` where none
    does). A cut paragraph's sentences and lines are joined by single spaces."""
    if len(paragraph) <= max_chars:
        return paragraph
    kept = ""
    for sentence in sentences(paragraph):
        if len(kept) + len(sentence) + 1 > max_chars:
            break
        kept = f"{kept} {sentence}".strip()
    return kept or paragraph[:max_chars]


def paragraph_in_view(texts: list[str], request: str, rng: random.Random) -> str | None:
    """A paragraph of the messages a wrapped request came in that holds no part of the request (cut to
    `PARAGRAPH_CHARS`), as a model that copies the text around a request writes it. None where there
    is no such paragraph."""
    found = [p for text in texts for p in paragraphs(text) if len(p) >= 80 and not quotes(p, request)]
    return within(rng.choice(found), PARAGRAPH_CHARS) if found else None
