"""The proxy's token ids: the UTF-8 bytes of the upstream's text (0-255), and 256 for its end."""

from __future__ import annotations

END = 256  # the end-of-sequence id of the byte stream


BYTES_PER_TOKEN = 4  # to turn token-denominated limits into byte counts where no tokenizer is at hand


class ByteTokenizer:
    """Tokens are UTF-8 bytes: exact round trips, and no tokenizer of the upstream model needed here."""

    eos_token_id = END
    model_max_length = 1 << 30

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
        # (both options are the upstream's: it gets them with the request, and the bytes are its text)
        try:
            data = bytes(ids)
        except ValueError:  # the end id
            data = bytes(i for i in ids if i < END)
        return data.decode("utf-8", errors="replace")

