"""How a record becomes model input: chat or plain prompts, tokenised examples whose labels mask the
prompt, and the number a generated answer ends in."""

from __future__ import annotations

import re
from decimal import Decimal

IGNORE_INDEX = -100


# A minus sign only when it is not a hyphen ("COVID-19", "5-3"); commas only as thousands groups
# ("1,234" but not the list "3,4"); "−" is the Unicode minus that models sometimes emit.
_NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The final numeric answer: the first number after the last '####' (the training format), else
    the last number in the text (a worked solution ends with its result)."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _canonical_number(found[0])
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def _canonical_number(s: str) -> str:
    """One spelling per value: no commas, no trailing zeros, no leading zeros, no '-0'."""
    value = Decimal(s.replace(",", "").replace("\u2212", "-"))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def build_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """The prompt format of base models without a chat template (e.g. Llama-2-7b-hf)."""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Question: {prompt}\nAnswer:"


def prompt_text(tokenizer, prompt: str, system_prompt: str | None) -> str:
    """What the model sees before its answer: the chat template's turn, or the plain format, with
    any BOS token the tokenizer adds (so tokenize it with add_special_tokens=False)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            build_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
        )
    return (tokenizer.bos_token or "") + plain_prompt(prompt, system_prompt)


def _encode_plain(tokenizer, prompt: str, response: str, system_prompt: str | None, max_length: int) -> dict:
    prompt_ids = tokenizer(prompt_text(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token; generation could not stop")
    full_ids = list(prompt_ids) + list(answer_ids) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids[:max_length], "labels": labels[:max_length], "length": len(full_ids)}


def encode_example(tokenizer, prompt: str, response: str, system_prompt: str | None, max_length: int) -> dict:
    """Token ids of the formatted pair and labels that score only the response tokens (and EOS).

    Chat models get their chat template; base models without one (no ``chat_template``) get
    ``plain_prompt`` followed by `` <response><eos>``."""
    if not has_chat_template(tokenizer):
        return _encode_plain(tokenizer, prompt, response, system_prompt, max_length)
    messages = build_messages(prompt, system_prompt)
    prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=True)
    if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt with the response; cannot mask the prompt")
    # Drop the template's trailing newline after the end-of-turn token: not part of the answer.
    while full_ids and tokenizer.decode(full_ids[-1:]).strip() == "":
        full_ids = full_ids[:-1]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids[:max_length], "labels": labels[:max_length], "length": len(full_ids)}
