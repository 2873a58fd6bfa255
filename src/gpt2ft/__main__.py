"""`python -m gpt2ft` is the `gpt2ft` command."""
from .cli import main

raise SystemExit(main())
