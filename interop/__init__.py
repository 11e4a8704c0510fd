"""The project against real third-party peers (`make interop`): an OpenAI-compatible proxy
(LiteLLM) as a provider, the MCP Inspector's CLI as an MCP client, and Arize Phoenix as the
OTLP receiver. peers.toml pins their versions; `python -m interop install` installs them."""
