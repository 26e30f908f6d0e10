"""The provider-key table (agentspace/providers/litellm_keys.py) says what the installed litellm says: for every
provider litellm lists, in the environments that tell the ways to supply its key apart, "a key is missing"
is the same answer as litellm's ``validate_environment`` (the gateway reads only its ``*_API_KEY`` names)."""

from __future__ import annotations

import pytest

from agentspace.providers.litellm_keys import KEY_VARIABLES, LITELLM_VERSION, key_missing

litellm = pytest.importorskip("litellm")
from litellm.utils import validate_environment  # noqa: E402

from scripts.provider_keys import claimed_prefixes, key_reported_missing, variable_names  # noqa: E402

# The providers an operator is likely to name, beyond OpenAI and Gemini: each needs its key, and the table
# knows where litellm looks for it. Bedrock and Vertex take other credentials: never "missing" beforehand.
NAMED = ("groq", "mistral", "deepseek", "together_ai", "openrouter", "cohere", "xai", "perplexity", "fireworks_ai")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    names = variable_names(validate_environment) | {n for ways in KEY_VARIABLES.values() for w in ways for n in w}
    for name in names:
        monkeypatch.delenv(name, raising=False)
    return names


def test_the_table_was_generated_from_the_installed_litellm() -> None:
    from importlib.metadata import version

    assert LITELLM_VERSION == version("litellm"), "run: python scripts/provider_keys.py"
    assert set(KEY_VARIABLES) == claimed_prefixes(litellm), "run: python scripts/provider_keys.py"


def test_the_named_providers_need_their_key_and_bedrock_and_vertex_do_not(clean_env: set[str]) -> None:
    for prefix in NAMED:
        assert KEY_VARIABLES[prefix] and key_missing(prefix) is True, prefix
    assert KEY_VARIABLES["together_ai"] == (("TOGETHERAI_API_KEY",),)  # not the gateway's TOGETHER_AI_API_KEY
    for prefix in ("bedrock", "vertex_ai", "sagemaker"):
        assert KEY_VARIABLES[prefix] == () and key_missing(prefix) is False
    assert key_missing("not-a-provider") is None  # litellm is asked


async def test_the_table_agrees_with_litellm_for_every_provider(
    clean_env: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asked as the gateway asks it (LitellmProvider.missing_key): on the running event loop, where litellm does
    # not start the device-code login of chatgpt and github_copilot (a network round per probe, half a minute
    # in all offline; a wait for a human online). Its answer for them is the same: no API key variable.
    singles = sorted(clean_env)
    checked = 0
    for prefix, ways in KEY_VARIABLES.items():
        # nothing set; each variable alone; each way; each way short of one of its variables
        probes: list[tuple[str, ...]] = [(), *((n,) for n in singles), *ways]
        probes += [tuple(n for n in way if n != left_out) for way in ways if len(way) > 1 for left_out in way]
        for probe in probes:
            for name in probe:
                monkeypatch.setenv(name, "x")
            assert key_missing(prefix) == key_reported_missing(validate_environment, prefix), (prefix, probe)
            for name in probe:
                monkeypatch.delenv(name)
            checked += 1
    assert checked > 1000
    # an empty variable supplies no key (where litellm would let the call fail upstream instead)
    monkeypatch.setenv("GROQ_API_KEY", "")
    assert key_missing("groq") is True
