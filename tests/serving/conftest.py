"""Fixtures shared by the HTTP tests: one copy of the built-in model with a chat template (the built-in model
has none), loaded once per session on the CPU."""
from __future__ import annotations

import pytest

# HF-style: raises for a role it does not know, as many real templates do (tests/serving/test_hostile.py)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
                 "{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")


@pytest.fixture(scope="session")
def chat_engine(tmp_path_factory):
    from qsparse_infer.engine import BUILTIN_MODEL, Engine
    from qsparse_infer.model.format import read_engine, write_engine

    ef = read_engine(BUILTIN_MODEL)
    path = write_engine(tmp_path_factory.mktemp("chat-model") / "bard.qsp", ef.config, ef.sparsity, ef.tensors,
                        {**ef.tokenizer_info, "chat_template": CHAT_TEMPLATE}, ef.tokenizer_bytes)
    return Engine.load(path, device="cpu")
