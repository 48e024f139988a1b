"""`upstream`: a steering gateway in front of an OpenAI-compatible deployment (vLLM, SGLang,
llama.cpp's server, this project's own server).

The steering loop needs a token stream it can roll back and extend. Here the tokens are the UTF-8
bytes of the upstream's text (ids 0-255, 256 = end), which round-trip exactly whatever tokenizer the
upstream model uses; token counts for clients come from the upstream's own `usage`.

Two ways to talk to the upstream, chosen by `--upstream-mode` (`auto` detects):
- `token_ids` (vLLM, SGLang): the prompt is rendered by the upstream's `/tokenize` (it takes chat
  messages) and generated through `/v1/completions` with token ids. The text is the model's raw
  text, reasoning markers included, exactly as the local engines see it. A continuation after an
  injection sends `prompt ids + /tokenize(kept text)`, so the upstream's prefix cache serves it.
- `chat`: `/v1/chat/completions` (also, in token_ids mode, for a request with tools, which
  /v1/completions would ignore). Reasoning arrives as `delta.reasoning_content`, `delta.reasoning`
  or `<think>` text inside `content`; this engine folds the first two back into `<think>...</think>`
  text so that one splitter serves all three. A continuation resends the messages with the kept
  text as a final assistant message and `continue_final_message` (vLLM, SGLang, this server).
"""
