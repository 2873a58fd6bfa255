"""The instruction-data formats every reader and verb knows (--format, --from, data convert's help), with
no heavy import, so that a verb's --help can name them."""

FORMATS = ("auto", "alpaca", "instruction-response", "messages", "prompt-completion", "sharegpt", "csv")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "system": "system"}  # ShareGPT's "from" names
